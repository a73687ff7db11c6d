"""How a problem and a generation become one program to run, for MBPP and the two CRUXEval tasks.

Post-processing follows the LoPA reference (TASKS.md, "LoPA code"): an MBPP completion is cut at the first
top-level statement that is not part of the function; a CRUXEval answer is taken out of
`assert f(...) == ...` before `[/ANSWER]`. An unparsable generation has no program: it counts as a failure.
"""

from __future__ import annotations

import ast
from typing import Any

TASKS = ("mbpp", "cruxeval_o", "cruxeval_i")
MBPP_STOPS = ("\ndef", "\nclass", "\nassert", '\n"""', "\nprint", "\nif", "\n```", "\n<|/")
REQUIRED_FIELDS = {
    "mbpp": ("task_id", "prompt", "test", "entry_point"),
    "cruxeval_o": ("id", "code", "input", "output"),
    "cruxeval_i": ("id", "code", "input", "output"),
}


def check_task(task: str) -> None:
    if task not in TASKS:
        raise ValueError(f"unknown code task {task!r}; expected one of {', '.join(TASKS)}")


def mbpp_completion(text: str) -> str:
    """The completion up to the first of MBPP_STOPS (the generation is already cut at EOS)."""
    cut = min((i for i in (text.find(stop) for stop in MBPP_STOPS) if i >= 0), default=len(text))
    return text[:cut]


def mbpp_program(problem: dict[str, Any], completion: str) -> str:
    """mxeval's program: prompt + completion, the `check` function, then `check(entry_point)`."""
    return f"{problem['prompt']}{completion}\n{problem['test']}\ncheck({problem['entry_point']})\n"


def _equality_sides(body: str) -> tuple[str, str] | None:
    """Left and right of `assert A == B` (or of a bare `A == B`) when the text parses as that one statement."""
    try:
        tree = ast.parse(body)
    except (SyntaxError, ValueError):
        return None
    if len(tree.body) != 1 or not isinstance(tree.body[0], ast.Assert | ast.Expr):
        return None
    statement = tree.body[0]
    test = statement.test if isinstance(statement, ast.Assert) else statement.value
    if not (isinstance(test, ast.Compare) and len(test.ops) == 1 and isinstance(test.ops[0], ast.Eq)):
        return None
    left, right = ast.get_source_segment(body, test.left), ast.get_source_segment(body, test.comparators[0])
    return (left, right) if left is not None and right is not None else None


def _parses(body: str) -> bool:
    try:
        ast.parse(body)
    except (SyntaxError, ValueError):
        return False
    return True


def cruxeval_answer(text: str, mode: str) -> str | None:
    """The predicted output ("o") or `f(...)` call ("i") in a generation; None when there is none.

    Takes the text before `[/ANSWER]` (after `[ANSWER]` if present; without `[/ANSWER]`, the first non-empty
    line), then the side of `==` the mode asks for: split by Python's parser when the text is one
    `assert A == B`, so an `==` inside a string literal does not cut it; text that does not parse is cut at
    its first `==`, as the reference does. A bare answer (anything else, `'a == b'` included) is the answer."""
    if mode not in ("o", "i"):
        raise ValueError(f"cruxeval_answer: mode={mode!r}; expected 'o' (output prediction) or 'i' (input)")
    body, closed, _ = text.partition("[/ANSWER]")
    body = body.rpartition("[ANSWER]")[2]
    if not closed:
        body = next((line for line in body.splitlines() if line.strip()), "")
    body = body.strip()
    sides = _equality_sides(body)
    if sides is None and "==" in body and not _parses(body):
        left, _, right = body.partition("==")
        sides = (left.strip().removeprefix("assert").strip(), right.strip())
    if mode == "o":
        answer = sides[1] if sides else body
        return answer.strip() or None
    answer = (sides[0] if sides else body).strip().removeprefix("assert").strip()
    return answer if "f(" in answer else None


def program_or_reason(task: str, problem: dict[str, Any], generation: str) -> tuple[str | None, str]:
    """(the program, "") or (None, why the generation has none)."""
    check_task(task)
    missing = [name for name in REQUIRED_FIELDS[task] if name not in problem]
    if missing:
        raise ValueError(f"a {task} problem needs the field(s) {missing}; it has {sorted(problem)}")
    if task == "mbpp":
        return mbpp_program(problem, mbpp_completion(generation)), ""
    answer = cruxeval_answer(generation, task[-1])
    if answer is None:
        needs = "f(...) call" if task == "cruxeval_i" else "answer"
        return None, f"unparsable generation: no {needs} found"
    if task == "cruxeval_o" and f"f({problem['input']})" in answer:
        return None, "rejected: the predicted output calls f on the input"
    return f"{problem['code']}\nassert {problem['output']} == {answer}\n", ""


def program_for(task: str, problem: dict[str, Any], generation: str) -> str | None:
    """The program that scores `generation` on `problem`; None when the generation is unparsable."""
    return program_or_reason(task, problem, generation)[0]
