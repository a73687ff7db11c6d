"""Where the raw SuperGLUE records come from: the bundled samples, a folder of official JSONL, or the hub."""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path
from typing import Any

from smop.data.tasks import Task, check_fields, flatten

SOURCES = ("sample", "dir", "hub", "synthetic")
SPLIT_FILES = {"train": "train.jsonl", "test": "val.jsonl"}  # the official validation set is our test set


def read_jsonl(path: Path, task: Task) -> list[dict[str, Any]]:
    """Parse and check every line; a bad one stops the run with its file and line number."""
    if not path.is_file():
        raise FileNotFoundError(f"Missing data file {path}: a SuperGLUE folder holds train.jsonl and val.jsonl")
    records = []
    with path.open(encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
                if not isinstance(record, dict):
                    raise ValueError("a line must hold one JSON object")
                check_fields(task, record)
                list(flatten(task, [record]))  # labels, and MultiRC's nested questions and answers
            except KeyError as err:
                raise ValueError(f"{path}:{number}: malformed {task.name} record: missing field {err}") from err
            except (ValueError, TypeError) as err:
                raise ValueError(f"{path}:{number}: malformed {task.name} record: {err}") from err
            records.append(record)
    if not records:
        raise ValueError(f"{path}: no records")
    return records


def sample_dir(task_name: str) -> Path:
    """The small SuperGLUE-format samples bundled with the package (written for this project)."""
    return Path(str(resources.files("smop.data") / "samples" / task_name))


def load_split_records(
    task: Task, source: str, data_dir: str | None, hub_name: str, hub_config: str | None, split: str
) -> list[dict[str, Any]]:
    """Raw records of the official `train` split or of the official validation set (our `test`)."""
    if source == "sample":
        return read_jsonl(sample_dir(task.name) / SPLIT_FILES[split], task)
    if source == "dir":
        if not data_dir:
            raise ValueError("dataset.source=dir needs dataset.data_dir=/path/to/folder (train.jsonl, val.jsonl)")
        folder = Path(data_dir).expanduser()
        if not folder.is_dir():
            raise FileNotFoundError(f"dataset.data_dir={data_dir} is not a folder (expected train.jsonl, val.jsonl)")
        return read_jsonl(folder / SPLIT_FILES[split], task)
    if source == "hub":
        return _load_hub(hub_name, hub_config or task.name, "train" if split == "train" else "validation")
    raise ValueError(f"Unknown dataset.source '{source}'; allowed: sample, dir, hub")


def _load_hub(name: str, config: str, split: str) -> list[dict[str, Any]]:
    import datasets

    try:
        return list(datasets.load_dataset(name, config, split=split))
    except Exception as err:  # datasets raises many types for an unreachable hub
        cause = str(err).strip().splitlines()[0] if str(err).strip() else ""
        raise ConnectionError(
            f"Could not load {name}/{config} [{split}] from the Hugging Face hub: read the official SuperGLUE JSONL "
            f"files instead, dataset={config} dataset.source=dir dataset.data_dir=/path/to/folder (train.jsonl, "
            f"val.jsonl), or run the bundled sample, dataset.source=sample ({type(err).__name__}: {cause})"
        ) from err
