"""Scoring a code task's generations by running them: the bridge from an evaluation epoch to smop.code.

A code task (MBPP, CRUXEval) is not scored by comparing texts: each problem's n sampled completions are turned into
programs and run in the sandbox (smop.code.sandbox), and pass@k (the unbiased estimator, smop.code.passk) is averaged
over the problems; a generation that cannot be parsed counts as a failure.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch.distributed as dist

from smop.code.sandbox import Sandbox
from smop.code.scoring import score_problems
from smop.data.tasks import Task


def gather(values: list[Any]) -> list[Any]:
    """Every rank's items, concatenated in rank order (the list itself without a process group)."""
    if not dist.is_available() or not dist.is_initialized() or dist.get_world_size() == 1:
        return list(values)
    shards: list[list[Any] | None] = [None] * dist.get_world_size()
    dist.all_gather_object(shards, list(values))
    return [item for shard in shards for item in shard or []]


def broadcast(value: Any) -> Any:
    """Rank 0's value on every rank: the sandbox runs once, every rank logs the same numbers."""
    if not dist.is_available() or not dist.is_initialized() or dist.get_world_size() == 1:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def problem_id(problem: dict[str, Any]) -> str:
    """What a problem is called in a generations file: MBXP's task_id, CRUXEval's id."""
    return str(problem.get("task_id", problem.get("id", "")))


class CodeScorer:
    """Collects each problem's generations over one evaluation epoch, then runs them and gives pass@k."""

    def __init__(self, task: Task, sandbox: dict[str, Any] | None = None) -> None:
        self.task, self.sandbox = task, dict(sandbox or {})
        self.rows: list[tuple[int, dict[str, Any], list[str]]] = []

    def add(self, positions: list[int], problems: list[dict[str, Any]], texts: list[str]) -> None:
        """`texts`: n generations per problem, rows i*n .. i*n+n-1 for problem i (as generate_texts returns them)."""
        if not problems or len(texts) % len(problems):
            raise ValueError(f"{len(texts)} generations for {len(problems)} problems: not n per problem")
        n = len(texts) // len(problems)
        for i, (position, problem) in enumerate(zip(positions, problems, strict=True)):
            self.rows.append((int(position), problem, list(texts[i * n : (i + 1) * n])))

    def compute(self, is_global_zero: bool = True, folder: str | None = None, split: str = "test") -> dict[str, float]:
        """pass@k for every k that n allows (k in 1, 5, 10, ...), over every rank's problems in split order, and
        `score`: the mean of the task's metrics (pass@1). Rank 0 runs the programs and writes
        `<folder>/generations_<split>.jsonl` (each problem's generations and outcomes) when `folder` is given."""
        rows = sorted({position: (position, p, g) for position, p, g in gather(self.rows)}.values(), key=lambda r: r[0])
        self.rows = []
        values: dict[str, float] | None = None
        if is_global_zero:
            problems, generations = [row[1] for row in rows], [row[2] for row in rows]
            outcomes, values = score(self.task.name, problems, generations, self.sandbox)
            values["score"] = sum(values[name] for name in self.task.metrics) / len(self.task.metrics)
            if folder is not None:
                write_generations(Path(folder) / f"generations_{split}.jsonl", self.task.name, rows, outcomes)
        return broadcast(values)


def score(
    task: str, problems: list[dict[str, Any]], generations: list[list[str]], sandbox: dict[str, Any]
) -> tuple[list[list[Any]], dict[str, float]]:
    """Each generation's outcome and pass@k, by smop.code."""
    with Sandbox(**sandbox) as box:
        return score_problems(task, problems, generations, box)


def write_generations(path: Path, task: str, rows: list[tuple], outcomes: list[list[Any]]) -> None:
    """One line per problem: its id, its generations and whether each passed (and why not), as they were scored."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as handle:
        for (_, problem, generations), results in zip(rows, outcomes, strict=True):
            line = {
                "task": task,
                "problem_id": problem_id(problem),
                "generations": generations,
                "passed": [bool(result.passed) for result in results],
                "reasons": [str(result.reason) for result in results],
            }
            handle.write(json.dumps(line) + "\n")
