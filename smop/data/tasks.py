"""Tasks as text-to-text: reading records (SuperGLUE, GLUE, QA, summaries, code, ...) into flat examples with a label
index, a number, gold texts, or a program to complete (scored by running it: smop.code.evaluation).

Each task's fields, template, label words, splits and metrics live in its dataset config; this module knows only
what differs in the record formats: how labels and answers are written, MultiRC's nested paragraphs
(`format: multirc`), WSC's spans (`format: wsc`) and ReCoRD's passages and entities (`format: record`).
"""

from __future__ import annotations

import re
import string
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

from smop.data import record as record_format

# a record per example; MultiRC's paragraphs with nested questions and answers; WSC's text with its two spans marked;
# ReCoRD's questions over a passage and its entities (the hub's rows, or the official nested lines)
FORMATS = ("flat", "multirc", "wsc", "record")
# a label word per class, a number written as text (STS-B), free text, or code (MBPP, CRUXEval: run, not compared)
TARGETS = ("labels", "number", "text", "code")
GENERATED = ("text", "code")  # targets of free length: dataset.max_target_length bounds them
TRUNCATE_SIDES = ("right", "left")  # left: a too-long source keeps its end (code prompts end where the model writes)
NUMBER_METRICS = ("pearson", "spearman")
TEXT_METRICS = ("squad_em", "squad_f1", "rouge1", "rouge2", "rougeL")  # generated texts against gold texts
METRICS = ("accuracy", "f1_macro", "f1a", "f1", "mcc", "em", *NUMBER_METRICS, *TEXT_METRICS)
BINARY_METRICS = ("f1a", "f1", "mcc")  # of class 1 against class 0
CODE_METRIC = re.compile(r"pass@[1-9][0-9]*")  # pass@k of executed samples, k <= dataset.decoding.num_return_sequences
# a text target's training rows: one per example with its first gold, or one per unique gold (ReCoRD, as DePT and FPT
# train); evaluation keeps one row per example, scored against all its golds
TRAIN_TARGETS = ("first", "each")


@dataclass
class Task:
    """What the model and the metrics need to know about a task."""

    name: str
    template: str  # Python format string over the example's fields
    label_words: list[str]  # target text per label index
    label_names: list[Any] = field(default_factory=list)  # raw label values in index order (strings in JSONL)
    metrics: list[str] = field(default_factory=lambda: ["accuracy"])  # official metrics; their mean is `score`
    truncate_field: str | None = None  # the long field cut first when prompt + input exceed max_length
    fields: list[str] = field(default_factory=list)  # what a record must hold; empty: the template's fields + label
    format: str = "flat"
    target: str = "labels"
    number_range: list[float] = field(default_factory=lambda: [0.0, 5.0])  # a number target's range (STS-B: 0-5)
    label_field: str = "label"  # the record's field holding the label (WinoGrande: answer, SciTail: gold_label)
    # a text target: the field with its gold text(s) (a string, a list of strings, or SQuAD's {"text": [...]}),
    # and what the model writes for a record without any (SQuAD 2.0's unanswerable questions)
    target_field: str | None = None
    no_answer_text: str | None = None
    # a code target: what the model learns to write, a format string over the record (MBPP: the canonical solution;
    # CRUXEval: the completed assertion); the record itself is the problem its generations are run against
    target_template: str | None = None
    truncate_side: str = "right"  # where a source too long even without its truncate_field loses tokens

    def __post_init__(self) -> None:
        if self.format not in FORMATS:
            raise ValueError(f"dataset.format={self.format} for {self.name}; allowed: {', '.join(FORMATS)}")
        if self.target not in TARGETS:
            raise ValueError(f"dataset.target={self.target} for {self.name}; allowed: {', '.join(TARGETS)}")
        if self.truncate_side not in TRUNCATE_SIDES:
            raise ValueError(
                f"dataset.truncate_side={self.truncate_side} for {self.name}; allowed: {', '.join(TRUNCATE_SIDES)}"
            )
        if self.target == "code":
            self._check_code()
            return
        if self.target_template is not None:
            raise ValueError(f"dataset.target_template is for a code target; {self.name} has target={self.target}")
        fits = {"number": NUMBER_METRICS, "text": TEXT_METRICS}.get(
            self.target, tuple(m for m in METRICS if m not in NUMBER_METRICS + TEXT_METRICS)
        )
        wrong = [name for name in self.metrics if name in METRICS and name not in fits]
        if wrong:
            raise ValueError(
                f"metric(s) {wrong} do not score a {self.target} target ({self.name}); allowed: {', '.join(fits)}"
            )
        unknown = set(self.metrics) - set(METRICS)
        if unknown:
            raise ValueError(f"Unknown metric(s) {sorted(unknown)} for {self.name}; allowed: {', '.join(METRICS)}")
        binary = [name for name in self.metrics if name in BINARY_METRICS]
        if binary and self.target == "labels" and len(self.label_words) != 2:
            raise ValueError(
                f"metric(s) {binary} of {self.name} score two classes, but it has {len(self.label_words)} label words: "
                "use accuracy or f1_macro"
            )
        if self.target == "number" and (len(self.number_range) != 2 or self.number_range[0] >= self.number_range[1]):
            raise ValueError(
                f"dataset.number_range={self.number_range} for {self.name}: give [low, high] with low < high"
            )
        if self.target == "text" and not self.target_field:
            raise ValueError(f"{self.name} has a text target: set dataset.target_field (the field with its gold texts)")
        if self.target != "text" and (self.target_field or self.no_answer_text):
            raise ValueError(
                f"dataset.target_field/no_answer_text are for a text target; {self.name} has target={self.target}"
            )
        if self.format == "record" and self.target != "text":
            raise ValueError(f"dataset.format=record ({self.name}) answers with entity names: set target: text")
        if self.no_answer_text is not None and not self.no_answer_text.strip():
            raise ValueError(f"dataset.no_answer_text={self.no_answer_text!r} for {self.name}: give a non-empty text")
        if not self.fields:
            self.fields = [
                *template_fields(self.template),
                self.target_field if self.target == "text" else self.label_field,
            ]

    def _check_code(self) -> None:
        """A code task names its target template and pass@k metrics only; its fields are its templates' fields."""
        if not self.target_template:
            raise ValueError(f"{self.name} has a code target: set dataset.target_template (what the model writes)")
        wrong = [name for name in self.metrics if not CODE_METRIC.fullmatch(str(name))]
        if wrong or not self.metrics:
            raise ValueError(
                f"metric(s) {wrong or []} do not score a code target ({self.name}); allowed: pass@1, pass@k"
            )
        if self.format != "flat" or self.target_field or self.no_answer_text:
            raise ValueError(f"{self.name} has a code target: its format is flat, without target_field/no_answer_text")
        if not self.fields:
            self.fields = list(dict.fromkeys(template_fields(self.template) + template_fields(self.target_template)))

    def target_text(self, example: dict[str, Any]) -> str:
        """What the model learns to generate: the label word, the number rounded to one decimal (DePT's
        `str(round(y, 1))`), the first gold text (the no-answer text when there is none), or the code target's
        template over the record."""
        if self.target == "code":
            return self.target_template.format(**example)
        if self.target == "number":
            return str(round(example["value"], 1))
        if self.target == "text":
            return example["golds"][0] if example["golds"] else self.no_answer_text
        return self.label_words[example["label"]]

    def gold_texts(self, record: dict[str, Any]) -> list[str]:
        """A text target's non-blank golds in the record's order: the field holds a string (XSum's summary), a list
        of strings (MRQA's answers) or SQuAD's {"text": [...], "answer_start": [...]}. None (an unanswerable
        question) is refused unless the task has a no-answer text."""
        value = record[self.target_field]
        if isinstance(value, dict):
            if "text" not in value:
                raise ValueError(f"{self.target_field} holds {sorted(value)}, not SQuAD's 'text' list of answers")
            value = value["text"]
        texts = [value] if isinstance(value, str) else value
        if not isinstance(texts, list) or not all(isinstance(text, str) for text in texts):
            raise ValueError(f"{self.target_field}={value!r}: give a string or a list of strings")
        golds = [text for text in texts if text.strip()]
        if not golds and self.no_answer_text is None:
            raise ValueError(
                f"{self.target_field} has no non-empty gold text; for unanswerable questions set dataset.no_answer_text"
            )
        return golds

    def target_texts(self) -> list[str]:
        """Every text the task can ask for: the label words, or each number of the range in steps of 0.1. A text
        target has no closed set: `dataset.max_target_length` bounds it."""
        if self.target in GENERATED:
            raise ValueError(f"{self.name} has a free-length target: its length is dataset.max_target_length")
        if self.target == "number":
            low, high = self.number_range
            return [str(round(low + step / 10, 1)) for step in range(round((high - low) * 10) + 1)]
        return list(self.label_words)

    def label_index(self, raw: Any) -> int:
        """Official files write labels as strings (RTE, CB), booleans (BoolQ, WiC) or ints (COPA, MultiRC)."""
        if isinstance(raw, bool):
            index = int(raw)
        elif isinstance(raw, int):
            index = raw
        elif raw in self.label_names:
            index = self.label_names.index(raw)
        else:
            raise ValueError(f"label {raw!r} is not one of {self.label_names or list(range(len(self.label_words)))}")
        if not 0 <= index < len(self.label_words):
            raise ValueError(f"label {raw!r} is out of range for {len(self.label_words)} label words")
        return index


def template_fields(template: str) -> list[str]:
    """The fields a format string reads, in order."""
    return list(dict.fromkeys(name for _, name, _, _ in string.Formatter().parse(template) if name))


def choose_template(name: str, template: str | None, templates: dict[str, Any] | None, style: str | None) -> str:
    """The task's template: `dataset.template`, or, for a task with template styles (`dataset.templates`, a map of
    style -> template, e.g. DePT's and FPT's strings, or -> {template, label_words} where the styles' targets differ
    too: MNLI, QQP), the one of `dataset.template_style`. The configs choose it by interpolation (`template:
    ${oc.select:dataset.templates.${dataset.template_style},null}`), which leaves null for an unknown style: refused
    here naming the styles. A `dataset.template` given outright wins over the style."""
    if templates is None:
        if style is not None:
            raise ValueError(
                f"dataset.template_style={style} for {name}, but {name} has no template styles (dataset.templates)"
            )
    elif style not in templates:
        raise ValueError(
            f"dataset.template_style={style} for {name} is not one of: {', '.join(templates)} (dataset.templates)"
        )
    elif template is None:
        template = templates[style]
        template = template.get("template") if isinstance(template, dict) else template
    if not isinstance(template, str) or not template.strip():
        raise ValueError(f"dataset.template={template!r} for {name}: give a format string over the record's fields")
    return template


def check_train_targets(train_targets: str, name: str, target: str) -> None:
    """`each` (a training row per gold text) needs golds: a text target."""
    if train_targets not in TRAIN_TARGETS:
        raise ValueError(f"dataset.train_targets={train_targets} for {name}; allowed: {', '.join(TRAIN_TARGETS)}")
    if train_targets == "each" and target != "text":
        raise ValueError(f"dataset.train_targets=each trains on every gold text; {name} has target={target}: use first")


def each_gold(examples: Iterable[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    """A training row per unique gold text (its golds reordered so that it is first, the target), one row with
    the no-answer target for an example without golds."""
    for example in examples:
        golds = list(dict.fromkeys(example["golds"]))
        if not golds:
            yield example
        for gold in golds:
            yield {**example, "golds": [gold, *(other for other in golds if other != gold)]}


def hub_layout(task: Task, record: dict[str, Any]) -> list[dict[str, Any]]:
    """An official record as the hub's rows: a ReCoRD line (a passage and its questions) becomes one row per
    question, so that splits count questions whatever the layout; any other record stays one."""
    return record_format.hub_rows(record) if task.format == "record" else [record]


def check_fields(task: Task, record: dict[str, Any]) -> None:
    missing = [name for name in task.fields if record.get(name) is None]  # Parquet writes a missing value as null
    if missing:
        raise ValueError(f"missing field(s) {missing}; a {task.name} record needs {task.fields}")


def raw_label(task: Task, record: dict[str, Any]) -> Any:
    """The record's label value, read from `task.label_field`; a record without it is refused by that name (hub rows
    are not checked field by field before they are flattened)."""
    value = record.get(task.label_field)
    if value is None:
        raise ValueError(
            f"a {task.name} record has no label field {task.label_field!r} (dataset.label_field); "
            f"its fields: {sorted(record)}"
        )
    return value


def flatten(task: Task, records: Iterable[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    """Official records -> flat examples with `label` as an index (a number target: also `value`; a text target:
    `golds`, its gold texts) and `group` (MultiRC's question id). ReCoRD: one example per question, its passage
    cleaned and its entities joined (smop.data.record).

    The label is read from `task.label_field` and written to `label`. MultiRC holds paragraphs with nested questions
    and answers; each answer becomes one example, and its question's id becomes the group used for exact match. Hub
    MultiRC rows are already flat.
    """
    for position, record in enumerate(records):
        if task.target == "code":  # the record is the problem its generations are run against
            yield {**record, "label": -1, "problem": dict(record), "group": position}
        elif task.format == "record":  # either layout; a nested line gives one example per question
            rows = record_format.hub_rows(record)
            for number, row in enumerate(rows):
                group = position if len(rows) == 1 else position * 100_000 + number
                yield {**record_format.template_inputs(row), "label": -1, "golds": task.gold_texts(row), "group": group}
        elif task.target == "number":
            yield {**record, "label": -1, "value": float(raw_label(task, record)), "group": position}
        elif task.target == "text":
            yield {**record, "label": -1, "golds": task.gold_texts(record), "group": position}
        elif task.format == "wsc":
            text = mark_spans(record)
            yield {**record, "text": text, "label": task.label_index(raw_label(task, record)), "group": position}
        elif task.format != "multirc":
            yield {**record, "label": task.label_index(raw_label(task, record)), "group": position}
        elif "paragraph" in record:  # the hub's flat layout
            group = record["idx"]["paragraph"] * 100_000 + record["idx"]["question"]
            yield {**record, "label": task.label_index(raw_label(task, record)), "group": group}
        else:
            passage = record["passage"]
            for question in passage["questions"]:
                group = record["idx"] * 100_000 + question["idx"]
                for answer in question["answers"]:
                    yield {
                        "paragraph": passage["text"],
                        "question": question["question"],
                        "answer": answer["text"],
                        "label": task.label_index(answer["label"]),
                        "group": group,
                    }


def mark_spans(record: dict[str, Any]) -> str:
    """WSC's text with T5's marks: `* span1 *` around the noun phrase and `# span2 #` around the pronoun, placed by
    the records' word indices (the reference's regex over the span text is not used: an unescaped span breaks it).
    A span whose words are not at its index is refused, naming both."""
    words = record["text"].split(" ")
    for key, mark in (("span1", "*"), ("span2", "#")):
        index, span = record[f"{key}_index"], record[f"{key}_text"].split(" ")
        found = words[index : index + len(span)]
        if [w.strip(".,;:!?'\"").lower() for w in found] != [w.strip(".,;:!?'\"").lower() for w in span]:
            raise ValueError(f"{key}_text {record[f'{key}_text']!r} is not at word {index} of the text ({found})")
        words[index] = f"{mark} {words[index]}"
        last = index + len(span) - 1
        words[last] = f"{words[last]} {mark}"
    return " ".join(words)
