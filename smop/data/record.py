"""ReCoRD's two layouts as the hub's rows, and a row's passage and entities as the templates read them.

The hub (`aps/super_glue`, config `record`) has one flat row per question: passage, query, entities (the candidate
strings), entity_spans, answers (unique strings), idx {passage, query}. SuperGLUE's official JSONL has one line per
passage: {"idx", "passage": {"text", "entities": [{"start", "end"}]}, "qas": [{"idx" (or "id"), "query",
"answers": [{"start", "end", "text"}]}]}; an entity is `text[start:end + 1]` (inclusive end). Both references (DePT,
FPT) read the passage the same way; reading a nested line as the hub's rows keeps splits counted in questions, as
DePT's rule reads the hub.
"""

from __future__ import annotations

import re
from typing import Any

from smop.data.official import json_field

# a highlight after end punctuation keeps it (`Win!\n@highlight\nNext` -> `Win! Next`); any other becomes ". "
_CLOSED_HIGHLIGHT = re.compile(r"([.?!\"'])\n@highlight\n")
_HIGHLIGHT = re.compile(r"\n@highlight\n")
END_PUNCTUATION = (".", "?", "!", '"', "'")


def clean_passage(text: str) -> str:
    """The passage as both references write it: CNN/Daily Mail's `@highlight` lines joined into sentences, and a
    final "." when it lacks end punctuation (FPT's rule, kept for every template style: DePT's 256-token inputs cut
    the passage's end anyway)."""
    text = _HIGHLIGHT.sub(". ", _CLOSED_HIGHLIGHT.sub(r"\1 ", text))
    if text and not text.endswith(END_PUNCTUATION):
        text += "."
    return text


def unique(texts: list[str]) -> list[str]:
    """First occurrences, in order (a set would make the entity list, and so the input, depend on hashing)."""
    return list(dict.fromkeys(texts))


def _span(text: str, item: Any, where: str) -> tuple[int, int]:
    """An entity's or answer's inclusive offsets, checked against the passage."""
    if not isinstance(item, dict):
        raise ValueError(f"{where}={item!r} is not an object with start and end")
    start, end = json_field(item, "start", int, where), json_field(item, "end", int, where)
    if not 0 <= start <= end < len(text):
        raise ValueError(f"{where} has start={start}, end={end} outside the {len(text)}-character passage")
    return start, end


def nested_rows(record: dict[str, Any]) -> list[dict[str, Any]]:
    """One official SuperGLUE line (a passage and its questions) as the hub's rows, one per question: entities are the
    passage's spans `text[start:end + 1]`, de-duplicated in order; answers are their unique texts, in order."""
    passage = json_field(record, "passage", dict, "the record")
    text = json_field(passage, "text", str, "passage")
    items = json_field(passage, "entities", list, "passage")
    spans = [_span(text, item, f"passage.entities[{i}]") for i, item in enumerate(items)]
    entities = unique([text[start : end + 1] for start, end in spans])
    rows = []
    for number, question in enumerate(json_field(record, "qas", list, "the record")):
        where = f"qas[{number}]"
        if not isinstance(question, dict):
            raise ValueError(f"{where} is not an object")
        answers = (
            json_field(question, "answers", list, where) if "answers" in question else []
        )  # the test file has none
        if not all(isinstance(answer, dict) for answer in answers):
            raise ValueError(f"{where}.answers={answers!r}: give objects with start, end and text")
        texts = [json_field(answer, "text", str, f"{where}.answers[{i}]") for i, answer in enumerate(answers)]
        rows.append(
            {
                "passage": text,
                "query": json_field(question, "query", str, where),
                "entities": entities,
                "entity_spans": {
                    "text": [text[start : end + 1] for start, end in spans],
                    "start": [start for start, _ in spans],
                    "end": [end for _, end in spans],
                },
                "answers": unique(texts),
                "idx": {"passage": record.get("idx", 0), "query": question.get("idx", question.get("id", number))},
            }
        )
        try:
            check_answers(rows[-1])
        except ValueError as err:
            raise ValueError(f"{where}: {err}") from err
    return rows


def is_nested(record: dict[str, Any]) -> bool:
    """The official layout nests the text and entities in `passage`; the hub's row holds the text itself."""
    return isinstance(record.get("passage"), dict)


def hub_rows(record: dict[str, Any]) -> list[dict[str, Any]]:
    """A record of either layout as the hub's rows (a hub row: itself, its fields checked)."""
    if is_nested(record):
        return nested_rows(record)
    json_field(record, "passage", str, "the record")
    json_field(record, "query", str, "the record")
    entities = json_field(record, "entities", list, "the record")
    answers = json_field(record, "answers", list, "the record") if "answers" in record else []  # inputs to label
    for key, values in (("entities", entities), ("answers", answers)):
        if not all(isinstance(value, str) for value in values):
            raise ValueError(f"{key}={values!r}: give a list of strings")
    check_answers(record)
    return [record]


def check_answers(row: dict[str, Any]) -> None:
    """Every answer is one of the passage's entities (ReCoRD's answers are entity mentions; FPT asserts it too)."""
    outside = [answer for answer in row.get("answers", []) if answer not in set(row["entities"])]
    if outside:
        raise ValueError(f"answer(s) {outside} are not among the passage's entities {row['entities']}")


def template_inputs(row: dict[str, Any]) -> dict[str, Any]:
    """What the templates read of a hub row: the cleaned passage and the entities joined by ", " (as both
    references); `answers` stays the list of gold texts."""
    return {**row, "passage": clean_passage(row["passage"]), "entities": ", ".join(unique(row["entities"]))}
