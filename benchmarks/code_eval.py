"""How fast the code sandbox scores programs: CRUXEval's programs, both directions, on this machine.

    python benchmarks/code_eval.py [--data ../shared/fixtures/cruxeval/cruxeval.jsonl] [--workers N]
                                   [--repeat 1] [--fresh 100]

Prints programs per second (wall clock) and CPU milliseconds per program for: the Sandbox (smop.code), a bare
`exec` of each program in this process (no isolation at all: the floor), and a fresh `python -I -c` per
program (the obvious alternative to forking pre-imported workers, on the first --fresh programs). The goal
(docs/benchmarks.md): 16,000 generations in under 5 minutes on 2 cores, about 53 programs/s.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # this checkout's smop, wherever the script is run from

from smop.code import Sandbox, program_for  # noqa: E402


def cpu_seconds() -> float:
    """CPU time of this process and of every child it has waited for (the workers, once closed)."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def measure(label: str, run, count: int) -> dict:
    cpu, wall = cpu_seconds(), time.perf_counter()
    passed = run()
    wall, cpu = time.perf_counter() - wall, cpu_seconds() - cpu
    row = {"what": label, "programs": count, "passed": passed, "seconds": wall, "per_s": count / wall}
    row["cpu_ms"] = cpu / count * 1000
    return row


def bare_exec(programs: list[str]) -> int:
    passed = 0
    for program in programs:
        try:
            exec(compile(program, "<program>", "exec"), {"__name__": "__main__"})
            passed += 1
        except Exception:
            pass
    return passed


def fresh_interpreters(programs: list[str]) -> int:
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin")}
    return sum(
        subprocess.run([sys.executable, "-I", "-c", p], env=env, capture_output=True, timeout=30).returncode == 0
        for p in programs
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--data", type=Path, default=ROOT.parent / "shared" / "fixtures" / "cruxeval" / "cruxeval.jsonl"
    )
    parser.add_argument("--workers", type=int, default=None, help="sandbox workers (default: one per core)")
    parser.add_argument("--repeat", type=int, default=1, help="score the 1,600 programs this many times")
    parser.add_argument("--fresh", type=int, default=100, help="programs for the python -c baseline (0: skip)")
    args = parser.parse_args()
    if not args.data.is_file():
        raise SystemExit(
            f"no CRUXEval file at {args.data}: pass --data PATH/cruxeval.jsonl (facebookresearch/cruxeval)"
        )
    problems = [json.loads(line) for line in args.data.read_text(encoding="utf-8").splitlines() if line.strip()]
    programs = [program_for("cruxeval_o", p, p["output"]) for p in problems]
    programs += [program_for("cruxeval_i", p, f"f({p['input']})") for p in problems]
    programs *= args.repeat
    rows = [measure("bare exec, one process (no isolation)", lambda: bare_exec(programs), len(programs))]
    sandbox = Sandbox(workers=args.workers)
    sandbox.run(["pass"] * sandbox.workers)  # workers started and warm: their start-up is not per program
    isolation = sandbox.isolation

    def scored() -> int:
        passed = sum(outcome.passed for outcome in sandbox.run(programs))
        sandbox.close()  # the workers are reaped, so their CPU time is counted
        return passed

    rows.append(measure(f"Sandbox, {sandbox.workers} workers", scored, len(programs)))
    if args.fresh:
        sample = programs[: args.fresh]
        rows.append(measure("python -I -c per program, serial", lambda: fresh_interpreters(sample), len(sample)))
    cores = len(os.sched_getaffinity(0))
    print(f"## code_eval benchmark: {platform.node()}, {cores} cores, Python {platform.python_version()}")
    print(f"isolation: {isolation}; load average at the end: {os.getloadavg()[0]:.1f}\n")
    print("| what | programs | passed | seconds | programs/s | CPU ms/program |")
    print("|---|---|---|---|---|---|")
    for row in rows:
        print(
            f"| {row['what']} | {row['programs']:,} | {row['passed']:,} | {row['seconds']:.2f} | "
            f"{row['per_s']:,.1f} | {row['cpu_ms']:.2f} |"
        )
    sandboxed = rows[1]
    print(
        f"\nsandbox overhead over a bare exec: {sandboxed['cpu_ms'] - rows[0]['cpu_ms']:.2f} CPU ms per program; "
        f"16,000 generations at this rate: {16_000 / sandboxed['per_s']:.0f} s (goal: under 300 s)"
    )


if __name__ == "__main__":
    main()
