"""Official distributions that are one JSON document per split rather than JSON lines, read into the hub's flat rows.

`squad`: SQuAD's train-v2.0.json / dev-v2.0.json, {"version", "data": [{"title", "paragraphs": [{"context",
"qas": [{"id", "question", "answers": [{"text", "answer_start"}], "is_impossible", "plausible_answers"?}]}]}]},
as rajpurkar/squad_v2's rows: id, title, context, question, answers {text: [...], answer_start: [...]}. An
unanswerable question has empty answers (its plausible_answers are not gold). Each record is named by its JSON path
(`data[3].paragraphs[1].qas[0]`), so a malformed one can be found in the file.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

Row = tuple[str, dict[str, Any]]  # (JSON path, the hub's row)


def json_field(node: Any, key: str, kind: type | tuple[type, ...], where: str) -> Any:
    """`node[key]`, checked to be of `kind` (a bool is not an int here), or an error naming where it is: the official
    documents (SQuAD) and lines (ReCoRD) name a bad record by its JSON path."""
    if not isinstance(node, dict):
        raise ValueError(f"{where} is not a JSON object")
    if key not in node:
        raise ValueError(f"{where} has no {key!r}; it holds {sorted(node)}")
    value = node[key]
    kinds = kind if isinstance(kind, tuple) else (kind,)
    if not isinstance(value, kinds) or isinstance(value, bool) and bool not in kinds:
        raise ValueError(f"{where}.{key}={value!r} is not a {' or '.join(k.__name__ for k in kinds)}")
    return value


def squad_rows(document: Any) -> Iterator[Row]:
    """SQuAD's article > paragraph > question nesting as flat rows, each with its JSON path."""
    for a, article in enumerate(json_field(document, "data", list, "the document")):
        title = json_field(article, "title", str, f"data[{a}]")
        for p, paragraph in enumerate(json_field(article, "paragraphs", list, f"data[{a}]")):
            where = f"data[{a}].paragraphs[{p}]"
            context = json_field(paragraph, "context", str, where)
            for q, qa in enumerate(json_field(paragraph, "qas", list, where)):
                path = f"{where}.qas[{q}]"
                answers = json_field(qa, "answers", list, path)
                texts = [json_field(answer, "text", str, f"{path}.answers[{i}]") for i, answer in enumerate(answers)]
                starts = [
                    json_field(answer, "answer_start", int, f"{path}.answers[{i}]") for i, answer in enumerate(answers)
                ]
                if qa.get("is_impossible") and answers:
                    raise ValueError(f"{path} is_impossible but has {len(answers)} answer(s)")
                row = {
                    "id": json_field(qa, "id", str, path),
                    "title": title,
                    "context": context,
                    "question": json_field(qa, "question", str, path),
                    "answers": {"text": texts, "answer_start": starts},
                }
                yield path, row


OFFICIAL_FORMATS: dict[str, Callable[[Any], Iterator[Row]]] = {"squad": squad_rows}


def check_official_format(official_format: str | None) -> None:
    if official_format is not None and official_format not in OFFICIAL_FORMATS:
        raise ValueError(f"dataset.official_format={official_format}; allowed: {', '.join(OFFICIAL_FORMATS)}")


def read_document(path: Path, official_format: str) -> list[Row]:
    """The rows of one official JSON document; a malformed one names the file and the JSON path of its record."""
    check_official_format(official_format)
    try:
        document = json.loads(path.read_text(encoding="utf-8"))
    except ValueError as err:
        raise ValueError(f"{path}: not one JSON document ({official_format} format): {err}") from err
    try:
        return list(OFFICIAL_FORMATS[official_format](document))
    except ValueError as err:
        raise ValueError(f"{path}: malformed {official_format} document: {err}") from err
