"""Where a task's raw records come from: the bundled samples, a folder of files named after the hub's splits, or the
Hugging Face hub. A split is named as on the hub (`train`, `validation`, `validation_matched`, ...); the dataset
config's `splits` says which one is trained on and which one is the test set.

A folder may hold a task's official distribution instead, when it is one JSON document per split (SQuAD's
train-v2.0.json): `dataset.official_files` names its file per hub split and `dataset.official_format` its reader
(smop.data.official). A folder holding both a hub-layout file and the official one for a split is refused: which
one was meant is not for us to guess."""

from __future__ import annotations

from importlib import resources
from pathlib import Path
from typing import Any

from smop.data.official import check_official_format, read_document
from smop.data.tasks import Task, check_fields, flatten, hub_layout
from smop.jsonl import json_lines

SOURCES = ("sample", "dir", "hub", "synthetic")
SUFFIXES = (".jsonl", ".json", ".parquet")  # .json: JSON lines, as the hub's exports write them
# Official distributions name some splits their own way: SuperGLUE's validation file is val.jsonl. A task adds its
# own (dataset.split_files): MBPP's one file of every problem is mbpp_release_v1.jsonl, CRUXEval's cruxeval.jsonl.
ALIASES = {"validation": ("val",)}
# the hub's files by role: the training split, the official validation split, another validation split (MNLI's
# mismatched), a labelled official test split, and one file of every problem that the split protocol divides
# (the code tasks'); a task names those it has (dataset.splits)
SPLIT_ROLES = ("train", "validation", "validation_alt", "test", "all")
DEFAULT_SPLITS = {"train": "train", "validation": "validation"}


def split_candidates(split: str, aliases: tuple[str, ...] = ()) -> list[str]:
    stems = (split, *aliases, *ALIASES.get(split, ()))
    return [f"{stem}{suffix}" for stem in dict.fromkeys(stems) for suffix in SUFFIXES]


def split_file(
    folder: Path, split: str, aliases: tuple[str, ...] = (), official_files: dict[str, str] | None = None
) -> Path:
    """The file of hub split `split` in `folder` (`<split>.jsonl|.json|.parquet`, the task's own name for it, an
    official alias, or the official document `official_files[split]`)."""
    found = [folder / name for name in split_candidates(split, aliases) if (folder / name).is_file()][:1]
    official = (official_files or {}).get(split)
    if official and (folder / official).is_file():
        if found:
            raise ValueError(
                f"{folder} holds both {found[0].name} (the hub's layout) and {official} (the official file) for the "
                f"{split!r} split: keep one of them"
            )
        found = [folder / official]
    if found:
        return found[0]
    expected = [*split_candidates(split, aliases), *([official] if official else [])]
    raise FileNotFoundError(f"{folder} holds no file for the {split!r} split: expected one of {', '.join(expected)}")


def check_official(official_files: dict[str, str] | None, official_format: str | None, name: str) -> None:
    """Official documents need their reader, and a reader needs the files it reads."""
    check_official_format(official_format)
    if bool(official_files) != bool(official_format):
        raise ValueError(
            f"dataset.official_files={official_files} and dataset.official_format={official_format} for {name}: "
            "give both (the official file per hub split, and its format) or neither"
        )


def file_aliases(split_files: dict[str, Any] | None, split: str) -> tuple[str, ...]:
    """The task's own file stems for hub split `split` (dataset.split_files: a name or a list of names)."""
    names = (split_files or {}).get(split) or ()
    return (names,) if isinstance(names, str) else tuple(names)


def check_record(task: Task, record: Any) -> None:
    """One record in the task's layout: an object with its fields and a valid label (MultiRC's nesting too)."""
    if not isinstance(record, dict):
        raise ValueError("a line must hold one JSON object")
    check_fields(task, record)
    list(flatten(task, [record]))  # labels, MultiRC's nested questions and answers, ReCoRD's passages


def _checked(task: Task, where: str, record: Any) -> dict[str, Any]:
    try:
        check_record(task, record)
    except KeyError as err:
        raise ValueError(f"{where}: malformed {task.name} record: missing field {err}") from err
    except (ValueError, TypeError) as err:
        raise ValueError(f"{where}: malformed {task.name} record: {err}") from err
    return record


def read_records(path: Path, task: Task, official_format: str | None = None) -> list[dict[str, Any]]:
    """Parse and check every record of a JSON-lines or Parquet file, or of an official JSON document; a bad one stops
    the run with its file and line (or row, or JSON path). Records come back in the hub's layout (a ReCoRD line: one
    row per question)."""
    if not path.is_file():
        raise FileNotFoundError(f"Missing data file {path}")
    if official_format is not None:
        rows = read_document(path, official_format)
        records = [_checked(task, f"{path}: {where}", row) for where, row in rows]
    elif path.suffix == ".parquet":
        import pyarrow.parquet as pq

        rows = pq.read_table(path).to_pylist()
        records = [_checked(task, f"{path}: row {number}", row) for number, row in enumerate(rows, start=1)]
    else:
        records = [_checked(task, f"{path}:{number}", record) for number, record in json_lines(path)]
    if not records:
        raise ValueError(f"{path}: no records")
    return [row for record in records for row in hub_layout(task, record)]


def read_split(
    task: Task,
    folder: Path,
    split: str,
    aliases: tuple[str, ...] = (),
    official_files: dict[str, str] | None = None,
    official_format: str | None = None,
) -> list[dict[str, Any]]:
    """The records of hub split `split` in `folder`, from its hub-layout file (or the task's own name for it,
    `aliases`) or its official document."""
    path = split_file(folder, split, aliases, official_files)
    is_official = official_files is not None and path.name == official_files.get(split)
    return read_records(path, task, official_format if is_official else None)


def sample_dir(task_name: str) -> Path:
    """The small samples bundled with the package (written for this project), in each task's hub layout (tasks that
    read the same problems, CRUXEval's two, share one folder: dataset.sample_folder)."""
    return Path(str(resources.files("smop.data") / "samples" / task_name))


def load_split_records(
    task: Task,
    source: str,
    data_dir: str | None,
    hub_name: str,
    hub_config: str | None,
    split: str,
    aliases: tuple[str, ...] = (),
    sample_folder: str | None = None,
    official_files: dict[str, str] | None = None,
    official_format: str | None = None,
) -> list[dict[str, Any]]:
    """Raw records of the hub split `split` (e.g. `train`, `validation`) from the task's source; `aliases`: the
    task's own file names for it in a folder (dataset.split_files)."""
    if source == "sample":
        return read_split(task, sample_dir(sample_folder or task.name), split, aliases)
    if source == "dir":
        if not data_dir:
            raise ValueError("dataset.source=dir needs dataset.data_dir=/path/to/folder (one file per split)")
        folder = Path(data_dir).expanduser()
        if not folder.is_dir():
            raise FileNotFoundError(f"dataset.data_dir={data_dir} is not a folder (one file per split)")
        return read_split(task, folder, split, aliases, official_files, official_format)
    if source == "hub":
        try:
            return _load_hub(hub_name, hub_config, split)  # null: the dataset's only (unnamed) config
        except Exception as err:  # datasets raises many types for an unreachable hub
            cause = str(err).strip().splitlines()[0] if str(err).strip() else ""
            where = f"{hub_name}/{hub_config}" if hub_config else hub_name
            raise ConnectionError(
                f"Could not load {where} [{split}] from the Hugging Face hub: read the official files from a folder "
                f"instead, dataset={task.name} dataset.source=dir dataset.data_dir=/path/to/folder (one file per "
                f"split: {', '.join(split_candidates(split, aliases)[:2])}, ...), or run the bundled sample, "
                f"dataset.source=sample ({type(err).__name__}: {cause})"
            ) from err
    raise ValueError(f"Unknown dataset.source '{source}'; allowed: sample, dir, hub")


def _load_hub(name: str, config: str | None, split: str) -> list[dict[str, Any]]:
    import datasets

    return list(datasets.load_dataset(name, config, split=split))
