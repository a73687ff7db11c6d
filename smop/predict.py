"""python -m smop.predict prompt=PATH input=new.jsonl [output=PATH] [batch_size=32] [device=auto]: label new inputs.

`prompt` is an exported folder (python -m smop.export) or a train.py checkpoint. `input` is a JSONL file in
the official SuperGLUE schema of the prompt's task, labels not needed (ignored when present). Each input gets
one output line {"idx", "label" (the predicted label word, null when the output was none), "label_index" (-1
then), "output" (the generated text)}; with decoding.do_sample=true decoding.num_return_sequences=N (and
decoding.temperature, decoding.top_p, decoding.stop=[...]) it gets {"idx", "outputs", "labels", "label_indices"}
with N sampled outputs. MultiRC gets one line per answer, idx = {paragraph, question, answer}. The file is
streamed: read line by line, labelled a batch at a time and flushed, with the same formatting and truncation as
training. A malformed line stops it with `FILE:LINE:` and the reason, after the predictions of every line before
it are written.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import hydra
from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig, OmegaConf
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from smop.backbones.decoding import Decoding
from smop.data import Task
from smop.data import record as record_format
from smop.data.tasks import template_fields
from smop.loading import CLI_DEFAULTS, USER_ERRORS, LoadedModel, hydra_cli, load
from smop.metrics import read_outputs

log = logging.getLogger(__name__)
PLURAL = {"label": "labels", "label_index": "label_indices", "value": "values", "answer": "answers"}


def unlabeled_examples(task: Task, record: Any, position: int) -> list[tuple[Any, dict[str, Any]]]:
    """(idx, example) pairs of one official record, checked against the task's template.

    `idx` is the record's own (its position in the file when it has none); MultiRC's nested paragraphs give one
    example per answer, with idx {paragraph, question, answer} as in the official submission format; ReCoRD's
    lines one per question (idx {passage, query} on the hub's rows)."""
    if not isinstance(record, dict):
        raise ValueError("a line must hold one JSON object")
    if task.format == "record":  # either layout: a question per example, its passage and entities as trained on
        pairs = [
            (row.get("idx", position), record_format.template_inputs(row)) for row in record_format.hub_rows(record)
        ]
    elif task.format == "multirc" and "passage" in record and "paragraph" not in record:
        passage = record["passage"]
        pairs = [
            (
                {"paragraph": record.get("idx", position), "question": question["idx"], "answer": answer["idx"]},
                {"paragraph": passage["text"], "question": question["question"], "answer": answer["text"]},
            )
            for question in passage["questions"]
            for answer in question["answers"]
        ]
    else:
        pairs = [(record.get("idx", position), record)]
    needed = template_fields(task.template)
    for _, example in pairs:
        missing = [name for name in needed if name not in example]
        if missing:
            raise ValueError(f"missing field(s) {missing}; a {task.name} input needs {needed}")
    return pairs


class BadInputLine(ValueError):
    """A line of the input file that is not JSON or not an input of the task; the message starts `FILE:LINE:`."""


def read_inputs(path: Path, task: Task) -> Iterator[tuple[int, list[tuple[Any, dict[str, Any]]]]]:
    """Line number and examples of each non-empty line, one line at a time; a bad line names file and line."""
    with path.open(encoding="utf-8") as handle:
        position = 0
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                yield number, []
                continue
            try:
                pairs = unlabeled_examples(task, json.loads(line), position)
            except json.JSONDecodeError as err:  # json's own line is always 1 here: the column alone says where
                raise BadInputLine(f"{path}:{number}: not valid JSON ({err.msg} at column {err.colno})") from err
            except KeyError as err:
                raise BadInputLine(f"{path}:{number}: malformed {task.name} input: missing field {err}") from err
            except (ValueError, TypeError) as err:
                raise BadInputLine(f"{path}:{number}: malformed {task.name} input: {err}") from err
            position += 1
            yield number, pairs


def count_lines(path: Path) -> int:
    with path.open("rb") as handle:
        return sum(1 for _ in handle)


def write_predictions(
    loaded: LoadedModel, pairs: list[tuple[Any, dict[str, Any]]], out: IO[str], decoding: Decoding | None = None
) -> int:
    """Label one batch and write (and flush) its lines; returns how many outputs were no label word."""
    outputs = loaded.generate([example for _, example in pairs], decoding)
    misses = 0
    for (idx, _), texts in zip(pairs, outputs, strict=True):
        fields, missed = read_outputs(loaded.task, texts)  # label, value (STS-B) or answer (QA, summaries)
        misses += missed
        if len(texts) == 1:
            line = {"idx": idx, **{name: values[0] for name, values in fields.items()}, "output": texts[0]}
        else:  # decoding.num_return_sequences > 1: every sampled output and what it says
            line = {"idx": idx, **{PLURAL[name]: values for name, values in fields.items()}, "outputs": texts}
        out.write(json.dumps(line) + "\n")
    out.flush()
    return misses


def predict_file(
    loaded: LoadedModel,
    input_path: str | Path,
    output_path: str | Path,
    batch_size: int = 32,
    progress: bool = True,
    decoding: Decoding | None = None,
) -> dict[str, int]:
    """Stream `input_path` through the model into `output_path`; counts of inputs, lines and non-label outputs."""
    input_path, output_path = Path(input_path), Path(output_path)
    if not input_path.is_file():
        raise FileNotFoundError(f"No input file at {input_path}")
    if input_path.resolve() == output_path.resolve():
        raise ValueError(f"output={output_path} would overwrite the input")
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size} must be at least 1")
    counts = {"lines": 0, "predictions": 0, "no_label_word": 0}
    bar = Progress(
        TextColumn("[bold]labelling"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("lines"),
        TimeElapsedColumn(),
        console=Console(stderr=True),
        disable=not progress,
    )
    output_path.parent.mkdir(parents=True, exist_ok=True)
    pending: list[tuple[Any, dict[str, Any]]] = []

    def flush(out: IO[str]) -> None:
        if pending:
            counts["no_label_word"] += write_predictions(loaded, pending, out, decoding)
            counts["predictions"] += len(pending)
            pending.clear()

    with bar, output_path.open("w", encoding="utf-8") as out:
        lines = bar.add_task("labelling", total=count_lines(input_path))
        try:
            for number, pairs in read_inputs(input_path, loaded.task):
                pending += pairs
                while len(pending) >= batch_size:
                    counts["no_label_word"] += write_predictions(loaded, pending[:batch_size], out, decoding)
                    counts["predictions"] += batch_size
                    del pending[:batch_size]
                counts["lines"] = number
                bar.update(lines, completed=number)
        except BadInputLine as err:  # every line before the bad one is labelled, also inside the first batch
            flush(out)
            raise BadInputLine(
                f"{err}; the {counts['predictions']} predictions of the lines before it are in {output_path}"
            ) from err
        flush(out)
    return counts


@dataclass
class DecodingConfig:
    """smop.backbones.decoding.Decoding as command-line options (decoding.do_sample=true ...)."""

    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    num_return_sequences: int = 1
    stop: list[str] = field(default_factory=list)


@dataclass
class PredictConfig:
    defaults: list[Any] = field(default_factory=lambda: list(CLI_DEFAULTS))
    prompt: str = MISSING  # an exported folder (python -m smop.export) or a train.py checkpoint
    input: str = MISSING  # JSONL in the official SuperGLUE schema of the prompt's task; labels not needed
    output: str | None = None  # default: <input>.predictions.jsonl next to the input
    batch_size: int = 32
    device: str = "auto"  # auto: the GPU when there is one | cpu | cuda | cuda:1 ...
    model_path: str | None = None  # the backbone from another place (a local copy of the same weights)
    progress: bool = True  # the progress bar (on stderr)
    decoding: DecodingConfig = field(default_factory=DecodingConfig)  # greedy unless decoding.do_sample=true
    hydra: Any = field(default_factory=lambda: hydra_cli(__doc__))


ConfigStore.instance().store(name="smop_predict", node=PredictConfig)


@hydra.main(version_base="1.3", config_path=None, config_name="smop_predict")
def main(cfg: DictConfig) -> None:
    missing = [key for key in ("prompt", "input") if OmegaConf.is_missing(cfg, key)]
    if missing:
        raise SystemExit(f"{' and '.join(missing)} required: python -m smop.predict prompt=EXPORT_DIR input=FILE.jsonl")
    input_path = Path(cfg.input)
    output = Path(cfg.output) if cfg.output else input_path.with_name(f"{input_path.stem}.predictions.jsonl")
    try:
        decoding = Decoding(**OmegaConf.to_container(cfg.decoding))  # a bad option stops before the model loads
        loaded = load(cfg.prompt, cfg.model_path, cfg.device)
        log.info(
            f"{loaded.config['method']['name']} prompt for {loaded.task.name} from {cfg.prompt} on {loaded.device}"
        )
        counts = predict_file(loaded, input_path, output, cfg.batch_size, cfg.progress, decoding)
    except USER_ERRORS as err:  # a bad path, file or line: its message, without a traceback
        raise SystemExit(f"smop.predict: {err}") from err
    log.info(
        f"wrote {counts['predictions']} predictions for {counts['lines']} lines to {output} "
        f"({counts['no_label_word']} outputs were no label word)"
    )


if __name__ == "__main__":
    main()
