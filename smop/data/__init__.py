"""SuperGLUE data: task formats, sources (bundled samples, official JSONL folders, the hub), the DataModule."""

from smop.data.datamodule import SuperGLUEDataModule
from smop.data.tasks import TASKS, Task

__all__ = ["TASKS", "SuperGLUEDataModule", "Task"]
