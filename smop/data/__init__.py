"""Task data: record formats, sources (bundled samples, folders of split files, the hub), the DataModule."""

from smop.data.datamodule import TaskDataModule
from smop.data.tasks import Task

__all__ = ["TaskDataModule", "Task"]
