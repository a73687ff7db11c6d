"""Scoring a set of problems' generations in one sandbox batch: per-sample outcomes and pass@k."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from smop.code.passk import allowed_ks, mean_pass_at_k
from smop.code.programs import check_task, program_or_reason
from smop.code.sandbox import Outcome, Sandbox


def score_problems(
    task: str, problems: list[dict[str, Any]], generations: Sequence[Sequence[str]], sandbox: Sandbox
) -> tuple[list[list[Outcome]], dict[str, float]]:
    """Each generation's outcome (an unparsable one is a failure) and {"pass@k": fraction} for every standard
    k that the fewest samples of any problem allow."""
    check_task(task)
    if len(problems) != len(generations):
        raise ValueError(f"{len(problems)} problems but {len(generations)} lists of generations")
    if not problems:
        raise ValueError("no problems to score")
    programs: list[str] = []
    slots: list[list[Outcome | int]] = []
    for position, (problem, samples) in enumerate(zip(problems, generations, strict=True)):
        if isinstance(samples, str) or not samples:
            raise ValueError(f"problem {position}: expected a non-empty list of generations, got {samples!r:.80}")
        row: list[Outcome | int] = []
        for generation in samples:
            if not isinstance(generation, str):
                raise TypeError(f"problem {position}: a generation is a {type(generation).__name__}, not a str")
            program, reason = program_or_reason(task, problem, generation)
            if program is None:
                row.append(Outcome(False, reason))
            else:
                row.append(len(programs))
                programs.append(program)
        slots.append(row)
    ran = sandbox.run(programs)
    outcomes = [[ran[slot] if isinstance(slot, int) else slot for slot in row] for row in slots]
    counts = [(len(row), sum(outcome.passed for outcome in row)) for row in outcomes]
    ks = allowed_ks(min(n for n, _ in counts))
    return outcomes, {f"pass@{k}": mean_pass_at_k(counts, k) for k in ks}
