"""python -m smop.code_eval task=TASK generations=FILE data=PATH [timeout=10] [workers=N] [memory_mb=1024]

Scores generated code in the sandbox (smop.code.sandbox; docs/code_eval.md says what it does and does not
protect against) and writes the results next to the generations.

- task=cruxeval_o | cruxeval_i: `generations` is CRUXEval's layout, a JSON object mapping each sample id
  ("sample_0", the `id` of a row of data=cruxeval.jsonl) to its list of generated strings: raw generations
  (`assert f(...) == ...\\n[/ANSWER]`) or bare answers. Only the ids present are scored. Writes
  `<stem>_scored.json` in CRUXEval's scored layout: raw_generations, raw_scored_generations (id -> list of
  bools), pass_at_1 and pass_at_5 in percent (pass_at_5 is null when some id has fewer than 5 generations),
  plus `reasons` (id -> why each generation failed).
- task=mbpp: `generations` is mxeval's JSONL, one {"task_id", "completion"} per line, several lines per
  task_id for several samples; data=mbpp_release_v1.jsonl (the MBXP layout). Completions are cut at the
  reference's stop sequences (postprocess=false keeps them whole). Writes `<stem>_results.jsonl` (each line
  with `passed` and `result`) and `<stem>_summary.json` with pass@k as fractions for every k in 1, 5, 10, 100
  that the fewest samples of a task allow.

An unparsable generation counts as a failure (the reference drops it: docs/reference_differences.md).
"""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from smop.code.passk import allowed_ks, mean_pass_at_k
from smop.code.programs import TASKS, mbpp_program
from smop.code.sandbox import Outcome, Sandbox
from smop.code.scoring import score_problems
from smop.jsonl import json_lines

OPTIONS = ("task", "generations", "data", "timeout", "workers", "memory_mb", "postprocess")
OFFICIAL_DATA = {
    "mbpp": "mbpp_release_v1.jsonl in the MBXP layout (amazon-science/mxeval, data/mbxp/; also shipped by LoPA)",
    "cruxeval_o": "cruxeval.jsonl (facebookresearch/cruxeval, data/cruxeval.jsonl)",
    "cruxeval_i": "cruxeval.jsonl (facebookresearch/cruxeval, data/cruxeval.jsonl)",
}


class UsageError(ValueError):
    """A bad argument or input file; the CLI prints it as one line."""


def parse_args(argv: Sequence[str]) -> dict[str, str]:
    """`key=value` arguments, each key once, from OPTIONS."""
    args: dict[str, str] = {}
    for arg in argv:
        key, sep, value = arg.partition("=")
        if not sep or key not in OPTIONS:
            raise UsageError(f"bad argument {arg!r}: expected key=value with key one of {', '.join(OPTIONS)}")
        if key in args:
            raise UsageError(f"{key}= given twice")
        args[key] = value
    for key in ("task", "generations"):
        if key not in args:
            raise UsageError(f"{key}= is required: {__doc__.splitlines()[0]}")
    if args["task"] not in TASKS:
        raise UsageError(f"unknown task={args['task']!r}; expected one of {', '.join(TASKS)}")
    if "data" not in args:
        raise UsageError(f"data= is required for {args['task']}: the official {OFFICIAL_DATA[args['task']]}")
    return args


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """Every non-empty line's object; a bad line stops with `FILE:LINE:`."""
    if not path.is_file():
        raise UsageError(f"no such file: {path}")
    try:
        lines = list(json_lines(path))
    except ValueError as err:
        raise UsageError(str(err)) from None
    for number, row in lines:
        if not isinstance(row, dict):
            raise UsageError(f"{path}:{number}: expected a JSON object, got {type(row).__name__}")
    return [row for _, row in lines]


def read_json(path: Path) -> Any:
    if not path.is_file():
        raise UsageError(f"no such file: {path}")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise UsageError(f"{path}:{err.lineno}: not JSON ({err.msg}, column {err.colno})") from None


def problems_by(rows: list[dict[str, Any]], key: str, path: Path) -> dict[str, dict[str, Any]]:
    missing = [number for number, row in enumerate(rows, start=1) if key not in row]
    if missing:
        raise UsageError(f"{path}: {len(missing)} row(s) without {key!r}, the first is row {missing[0]}")
    return {str(row[key]): row for row in rows}


def score_cruxeval(task: str, generations_path: Path, data: Path, sandbox: Sandbox) -> tuple[Path, dict[str, Any]]:
    generations = read_json(generations_path)
    if not isinstance(generations, dict) or not generations:
        raise UsageError(f"{generations_path}: expected a JSON object mapping sample ids to lists of generations")
    problems = problems_by(read_jsonl(data), "id", data)
    for sample_id, samples in generations.items():
        if sample_id not in problems:
            raise UsageError(f"{generations_path}: id {sample_id!r} is not in {data} (ids like 'sample_0')")
        if not isinstance(samples, list) or not samples or not all(isinstance(s, str) for s in samples):
            raise UsageError(f"{generations_path}: {sample_id!r} must map to a non-empty list of strings")
    ids = list(generations)
    outcomes, _ = score_problems(task, [problems[i] for i in ids], [generations[i] for i in ids], sandbox)
    counts = [(len(row), sum(o.passed for o in row)) for row in outcomes]
    ks = allowed_ks(min(n for n, _ in counts), (1, 5))
    scored = {
        "raw_generations": generations,
        "raw_scored_generations": {i: [o.passed for o in row] for i, row in zip(ids, outcomes, strict=True)},
        "pass_at_1": mean_pass_at_k(counts, 1) * 100,
        "pass_at_5": mean_pass_at_k(counts, 5) * 100 if 5 in ks else None,
        "reasons": {i: [o.reason for o in row] for i, row in zip(ids, outcomes, strict=True)},
    }
    output = generations_path.with_name(f"{generations_path.stem}_scored.json")
    output.write_text(json.dumps(scored), encoding="utf-8")
    summary = {"task": task, "problems": len(ids), "samples": sum(n for n, _ in counts)}
    summary |= {"pass_at_1": scored["pass_at_1"], "pass_at_5": scored["pass_at_5"]}
    return output, summary


def score_mbpp(generations_path: Path, data: Path, sandbox: Sandbox, postprocess: bool) -> tuple[Path, dict]:
    lines = read_jsonl(generations_path)
    problems = problems_by(read_jsonl(data), "task_id", data)
    by_task: dict[str, list[int]] = {}
    for number, line in enumerate(lines, start=1):
        if not isinstance(line.get("task_id"), str) or not isinstance(line.get("completion"), str):
            raise UsageError(f"{generations_path}: sample {number} needs a string task_id and completion")
        if line["task_id"] not in problems:
            raise UsageError(f"{generations_path}: task_id {line['task_id']!r} (sample {number}) is not in {data}")
        by_task.setdefault(line["task_id"], []).append(number - 1)
    if not by_task:
        raise UsageError(f"{generations_path}: no samples")
    if postprocess:
        tasks = list(by_task)
        samples = [[lines[i]["completion"] for i in by_task[t]] for t in tasks]
        rows, _ = score_problems("mbpp", [problems[t] for t in tasks], samples, sandbox)
        outcomes: list[Outcome] = [Outcome(False, "")] * len(lines)
        for task_id, row in zip(tasks, rows, strict=True):
            for index, outcome in zip(by_task[task_id], row, strict=True):
                outcomes[index] = outcome
    else:
        outcomes = sandbox.run([mbpp_program(problems[line["task_id"]], line["completion"]) for line in lines])
    output = generations_path.with_name(f"{generations_path.stem}_results.jsonl")
    with output.open("w", encoding="utf-8") as handle:
        for line, outcome in zip(lines, outcomes, strict=True):
            handle.write(json.dumps({**line, "result": outcome.reason, "passed": outcome.passed}) + "\n")
    counts = [(len(indices), sum(outcomes[i].passed for i in indices)) for indices in by_task.values()]
    ks = allowed_ks(min(n for n, _ in counts))
    summary = {"task": "mbpp", "problems": len(by_task), "samples": len(lines)}
    summary |= {f"pass@{k}": mean_pass_at_k(counts, k) for k in ks}
    summary_path = generations_path.with_name(f"{generations_path.stem}_summary.json")
    summary_path.write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    return output, summary


def _number(args: dict[str, str], key: str, kind: type, default: Any) -> Any:
    if key not in args:
        return default
    try:
        return kind(args[key])
    except ValueError:
        raise UsageError(f"{key}={args[key]!r}: expected a {kind.__name__}") from None


def evaluate(argv: Sequence[str]) -> dict[str, Any]:
    """Score the generations the arguments name, write the results, return the summary."""
    args = parse_args(argv)
    generations, data = Path(args["generations"]), Path(args["data"])
    if not data.is_file():
        raise UsageError(f"no such data file: {data} (the official {OFFICIAL_DATA[args['task']]})")
    postprocess = args.get("postprocess", "true").lower()
    if postprocess not in ("true", "false"):
        raise UsageError(f"postprocess={args['postprocess']!r}: expected true or false")
    options = {
        "timeout": _number(args, "timeout", float, 10.0),
        "workers": _number(args, "workers", int, None),
        "memory_mb": _number(args, "memory_mb", int, 1024),
    }
    try:
        sandbox = Sandbox(**options)
    except ValueError as err:
        raise UsageError(str(err)) from None
    with sandbox:
        if args["task"] == "mbpp":
            output, summary = score_mbpp(generations, data, sandbox, postprocess == "true")
        else:
            output, summary = score_cruxeval(args["task"], generations, data, sandbox)
    return {**summary, "output": str(output)}


def main(argv: Sequence[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else list(argv)
    if {"-h", "--help"} & set(argv):
        print(__doc__)
        return
    try:
        summary = evaluate(argv)
    except UsageError as err:
        raise SystemExit(f"smop.code_eval: {err}") from None
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
