"""How a task's hub files become train / validation / test, by `dataset.split_protocol`:

smop      a seeded 90/10 split of the training file (stratified per label; MultiRC by paragraph), the official
          validation set as test: SMoP's protocol, the default.
dept      DePT's rule, per task (`dataset.dept_split`): `small` sets validate and test on the two halves of the
          permuted official validation set, `large` ones validate on 1,000 permuted training rows and test on the
          official validation set, `official` ones (MNLI, PAWS) validate on their other validation file (MNLI's
          mismatched) and test on the official one. The permutation seed is 42 whatever the training seed, as in
          the reference (torch.randperm).
official  train, the official validation set, and a labelled official test file (a task that has none is refused).
          A task whose problems are in one file (`dataset.splits.all`, the code tasks) splits it by the id ranges of
          its official split instead (`dataset.official_ranges`: MBPP's 601-974 train, 511-600 validation, 11-510
          test); one without (CRUXEval: a test set only) is refused.
lopa      the LoPA reference's rule for a file of every problem (`dataset.splits.all`): the first half in file order
          trains, the second half tests (MBPP/1-487 and 488-974; CRUXEval rows 0-399 and 400-799); no validation
          set, so the final checkpoint is tested, as in the reference.

A task with another validation file (MNLI's mismatched) that the protocol does not validate on is also tested on it:
the `test_alt` split, reported next to `test` (MNLI: matched and mismatched accuracy).

`dataset.max_train_records=N` then keeps N training rows, drawn with DePT's seed 42 (DePT caps Yelp-2 at 100,000), and
`dataset.k_shot=K` keeps K training rows per class (DePT's k-shot runs): the training file shuffled with the
training seed, the first K rows of each class kept. Validation and test are untouched.

Each run records its split (sizes, a hash of the member ids, k_shot) in results.json.
"""

from __future__ import annotations

import hashlib
import logging
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

log = logging.getLogger(__name__)

PROTOCOLS = ("smop", "dept", "official", "lopa")
ONE_FILE_PROTOCOLS = ("lopa", "official")  # what a task with one file of every problem can be split by
DEPT_RULES = ("small", "large", "official")
DEPT_SEED = 42
DEPT_VALIDATION_ROWS = 1000


@dataclass
class Part:
    """Records of one split and where each came from: `<hub file role>:<row>`."""

    records: list[dict[str, Any]]
    ids: list[str]

    @classmethod
    def of(cls, role: str, records: list[dict[str, Any]], rows: list[int] | None = None) -> Part:
        rows = list(range(len(records))) if rows is None else rows
        return cls([records[i] for i in rows], [f"{role}:{i}" for i in rows])


def units(records: list[dict[str, Any]], multirc: bool) -> list[Any]:
    """The unit a split keeps together: a record, or a MultiRC paragraph (the hub's flat rows share idx.paragraph)."""
    if not multirc:
        return list(range(len(records)))
    return [r["idx"]["paragraph"] if "paragraph" in r else i for i, r in enumerate(records)]


def rows_of(unit_of_row: list[Any], chosen: set[Any]) -> list[int]:
    return [i for i, unit in enumerate(unit_of_row) if unit in chosen]


def permuted_units(unit_of_row: list[Any]) -> list[Any]:
    """The distinct units in DePT's order: torch.randperm with seed 42."""
    distinct = list(dict.fromkeys(unit_of_row))
    order = torch.randperm(len(distinct), generator=torch.Generator().manual_seed(DEPT_SEED)).tolist()
    return [distinct[i] for i in order]


def split_train_val(labels: list[Any], val_fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """Seeded split of the official train set, stratified per label: 90/10 by default.

    The reference kept the first n*9//10 rows of each label in file order; we shuffle each label's indices
    with `seed` first, so the split is reproducible without depending on file order, then keep the same count
    (the floor of n * (1 - val_fraction)).
    """
    rng = np.random.default_rng(seed)
    train, val = [], []
    for label in sorted(set(labels), key=str):
        members = [i for i, value in enumerate(labels) if value == label]
        rng.shuffle(members)
        cut = math.floor(len(members) * (1 - val_fraction) + 1e-9)  # epsilon: 0.29 * 100 is 28.999... in floats
        train += members[:cut]
        val += members[cut:]
    return sorted(train), sorted(val)


def smop_split(
    strata: list[Any], unit_of_row: list[Any], val_fraction: float, seed: int
) -> tuple[list[int], list[int]]:
    """Rows of the training file kept for training and held out for validation (SMoP's protocol)."""
    distinct = sorted(set(unit_of_row))
    if len(distinct) < len(unit_of_row):  # MultiRC: split whole paragraphs, no question spans two splits
        held = {distinct[i] for i in split_train_val([0] * len(distinct), val_fraction, seed)[1]}
        return [i for i, u in enumerate(unit_of_row) if u not in held], rows_of(unit_of_row, held)
    return split_train_val(strata, val_fraction, seed)


def divide(
    protocol: str,
    dept_split: str,
    read: Callable[[str], list[dict[str, Any]]],
    named: set[str],
    task_name: str,
    smop_rows: Callable[[list[dict[str, Any]]], tuple[list[int], list[int]]],
    multirc: bool,
    official_ranges: dict[str, list[int]] | None = None,
    id_of: Callable[[dict[str, Any]], int] | None = None,
) -> dict[str, Part]:
    """train / val / test (and test_alt) Parts of a task under `protocol`; `read(role)` reads a hub file by its role.
    A task with one file of every problem (role `all`) is split by `lopa` or by its `official_ranges` of
    `id_of(record)`."""
    check_protocol(protocol, named, task_name, official_ranges)
    if "all" in named:
        return divide_one_file(protocol, read("all"), official_ranges, id_of)
    train = read("train")
    if protocol == "smop":
        kept, held = smop_rows(train)
        return {
            "train": Part.of("train", train, kept),
            "val": Part.of("train", train, held),
            "test": Part.of("validation", read("validation")),
        }
    if protocol == "official":
        if "test" not in named:
            raise ValueError(
                f"dataset.split_protocol=official tests on a labelled official test file, but {task_name} has none "
                "(dataset.splits.test): use split_protocol=smop or dept"
            )
        return {
            "train": Part.of("train", train),
            "val": Part.of("validation", read("validation")),
            "test": Part.of("test", read("test")),
        }
    if dept_split not in DEPT_RULES:
        raise ValueError(f"dataset.dept_split={dept_split} for {task_name} is not one of: {', '.join(DEPT_RULES)}")
    if dept_split == "small":
        validation = read("validation")
        unit_of_row = units(validation, multirc)
        order = permuted_units(unit_of_row)
        half = len(order) // 2
        first, second = set(order[:half]), set(order[half:])
        return {
            "train": Part.of("train", train),
            "val": Part.of("validation", validation, rows_of(unit_of_row, first)),
            "test": Part.of("validation", validation, rows_of(unit_of_row, second)),
        }
    if dept_split == "large":
        unit_of_row = units(train, multirc)
        order = permuted_units(unit_of_row)
        held = set(order[:DEPT_VALIDATION_ROWS])
        kept = [i for i, u in enumerate(unit_of_row) if u not in held]
        if not kept:
            raise ValueError(
                f"dataset.dept_split=large holds out {DEPT_VALIDATION_ROWS:,} training rows for validation, but "
                f"{task_name}'s training file has only {len(order):,}: use split_protocol=smop (e.g. for a bundled "
                "sample) or the full data"
            )
        return {
            "train": Part.of("train", train, kept),
            "val": Part.of("train", train, rows_of(unit_of_row, held)),
            "test": Part.of("validation", read("validation")),
        }
    val_role = "validation_alt" if "validation_alt" in named else "validation"
    test_role = "test" if "test" in named else "validation"
    return {
        "train": Part.of("train", train),
        "val": Part.of(val_role, read(val_role)),
        "test": Part.of(test_role, read(test_role)),
    }


def with_test_alt(parts: dict[str, Part], named: set[str], read: Callable[[str], list[dict[str, Any]]]) -> None:
    """The task's other validation file (MNLI's mismatched) as a second test set, `test_alt`, when the protocol did
    not validate on it."""
    used = {part.ids[0].split(":")[0] for part in parts.values() if part.ids}
    if "validation_alt" in named and "validation_alt" not in used:
        parts["test_alt"] = Part.of("validation_alt", read("validation_alt"))


def check_max_train_records(limit: Any) -> None:
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise ValueError(f"dataset.max_train_records={limit} must be null (every row) or an integer >= 1")


def capped_part(part: Part, limit: int | None) -> Part:
    """At most `limit` records of `part`: a sample drawn with DePT's seed 42 whatever the training seed (so every
    run of a grid trains on the same rows), kept in file order. None: every record."""
    if limit is None or len(part.records) <= limit:
        return part
    order = torch.randperm(len(part.records), generator=torch.Generator().manual_seed(DEPT_SEED)).tolist()
    kept = sorted(order[:limit])
    return Part([part.records[i] for i in kept], [part.ids[i] for i in kept])


def check_protocol(
    protocol: str, named: set[str] | None, task_name: str, official_ranges: dict[str, list[int]] | None = None
) -> None:
    """A protocol the task's files allow: lopa and official (by id ranges) for one file of every problem, the others
    for files by split; refused naming the ones that fit. `named` None (generated data, its own splits): the name
    alone is checked."""
    if protocol not in PROTOCOLS:
        raise ValueError(f"dataset.split_protocol={protocol} is not one of: {', '.join(PROTOCOLS)}")
    if named is None:
        return
    one_file = "all" in named
    if one_file and protocol not in ONE_FILE_PROTOCOLS:
        raise ValueError(
            f"dataset.split_protocol={protocol} for {task_name}, whose problems are in one file (dataset.splits.all): "
            f"use one of {', '.join(ONE_FILE_PROTOCOLS)}"
        )
    if not one_file and protocol == "lopa":
        raise ValueError(
            f"dataset.split_protocol=lopa halves one file of every problem (dataset.splits.all); {task_name} has "
            f"files by split: use one of {', '.join(p for p in PROTOCOLS if p != 'lopa')}"
        )
    if one_file and protocol == "official" and not official_ranges:
        raise ValueError(
            f"dataset.split_protocol=official: {task_name} has no official training split (only an official test "
            "set; dataset.official_ranges is null): use split_protocol=lopa (the LoPA reference's halves)"
        )


def divide_one_file(
    protocol: str,
    records: list[dict[str, Any]],
    official_ranges: dict[str, list[int]] | None,
    id_of: Callable[[dict[str, Any]], int] | None,
) -> dict[str, Part]:
    """lopa: the first half (floor) of the file trains, the rest tests, no validation. official: each split holds
    the records whose id is in its inclusive range [low, high] (a split without a range is empty)."""
    if protocol == "lopa":
        half = len(records) // 2
        return {
            "train": Part.of("all", records, list(range(half))),
            "val": Part.of("all", records, []),
            "test": Part.of("all", records, list(range(half, len(records)))),
        }
    ranges = dict(official_ranges or {})
    bad = sorted(set(ranges) - {"train", "validation", "test"})
    if bad or any(len(bounds) != 2 or bounds[0] > bounds[1] for bounds in ranges.values()):
        raise ValueError(
            f"dataset.official_ranges={ranges}: give train, validation and test as [low, high] ids, low <= high"
        )
    ids = [id_of(record) for record in records] if id_of is not None else list(range(len(records)))

    def rows(split: str) -> list[int]:
        low, high = ranges.get(split, (1, 0))
        return [i for i, value in enumerate(ids) if low <= value <= high]

    parts = {"train": rows("train"), "val": rows("validation"), "test": rows("test")}
    if not parts["train"] or not parts["test"]:
        raise ValueError(f"dataset.official_ranges={ranges} leave no training or no test record in this file")
    return {name: Part.of("all", records, chosen) for name, chosen in parts.items()}


def check_k_shot(k_shot: int | None, task_name: str, target: str, format: str) -> None:
    """K rows per class needs classes: refused for a number target (STS-B), a code target (MBPP) and for MultiRC,
    whose rows are answers of shared questions (keeping K of them would cut questions apart)."""
    if k_shot is None:
        return
    if isinstance(k_shot, bool) or not isinstance(k_shot, int) or k_shot < 1:
        raise ValueError(
            f"dataset.k_shot={k_shot} must be null (all training rows) or an integer >= 1 (rows per class)"
        )
    if target in ("number", "code"):
        raise ValueError(f"dataset.k_shot={k_shot}: {task_name} has a {target} target, no classes to sample K rows of")
    if format == "multirc":
        raise ValueError(f"dataset.k_shot={k_shot}: {task_name} is MultiRC-format (answers grouped by question)")


def k_shot_part(
    part: Part, k_shot: int, seed: int, task_name: str, label_of: Callable[[dict[str, Any]], Any] | None = None
) -> Part:
    """K rows per class of `part`, as DePT: shuffled with the training seed, then each class filled in that order.
    A class with fewer than K rows keeps them all (with a warning). `label_of`: a record's class (its `label`)."""
    label_of = label_of or (lambda record: record["label"])
    order = np.random.default_rng(seed).permutation(len(part.records)).tolist()
    chosen: dict[Any, list[int]] = {}
    for i in order:
        rows = chosen.setdefault(label_of(part.records[i]), [])
        if len(rows) < k_shot:
            rows.append(i)
    for label, rows in sorted(chosen.items(), key=lambda item: str(item[0])):
        if len(rows) < k_shot:
            log.warning(
                "dataset.k_shot=%d: %s has only %d training rows of class %s; keeping them all",
                k_shot,
                task_name,
                len(rows),
                label,
            )
    kept = sorted(i for rows in chosen.values() for i in rows)
    return Part([part.records[i] for i in kept], [part.ids[i] for i in kept])


def describe(
    protocol: str,
    parts: dict[str, Part],
    examples: dict[str, int],
    k_shot: int | None = None,
    max_train_records: int | None = None,
) -> dict[str, Any]:
    """What results.json records of the split: the protocol, sizes (records and examples), a hash of each
    split's member ids, so two runs can be checked to have used the same rows, k_shot and max_train_records (null:
    every row)."""
    return {
        "protocol": protocol,
        "k_shot": k_shot,
        "max_train_records": max_train_records,
        "records": {name: len(part.ids) for name, part in parts.items()},
        "examples": dict(examples),
        "hash": {name: hashlib.sha256("\n".join(part.ids).encode()).hexdigest()[:16] for name, part in parts.items()},
    }
