"""Launch the paper's grids as Hydra multiruns of train.py, resume them, and summarise them.

    python sweep.py table1 --list                         # the jobs, and their state in the sweep folder
    python sweep.py table1 model=t5-base trainer=gpu dataset.source=hub hydra/launcher=submitit_slurm
    python sweep.py table3 --datasets cb,rte --seeds 0,1  # the same command again resumes
    python sweep.py demo                                   # CPU, a few minutes: PT vs SMoP on the synthetic task
    python sweep.py summary outputs/sweeps/table1          # summary.md, summary.csv, runs.csv, plots

Every other argument is a Hydra override given to every job (launchers included). See docs/sweeps.md.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from smop.sweeps import GRIDS, SweepError, default_sweep_dir, job_status, launch, load_manifest, select


def csv_list(text: str) -> list[str]:
    return [item.strip() for item in text.split(",") if item.strip()]


def seeds(text: str) -> list[int]:
    return [int(item) for item in csv_list(text)]


def grid_parser() -> argparse.ArgumentParser:
    lines = "\n".join(f"  {name:8} {grid.doc}" for name, grid in GRIDS.items())
    parser = argparse.ArgumentParser(
        prog="sweep.py",
        description=__doc__,
        epilog=f"grids:\n{lines}\n\nsummary: python sweep.py summary DIR [--split val]",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("grid", choices=sorted(GRIDS), help="the grid to run or list")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides for every job, e.g. model=t5-base")
    parser.add_argument("--list", action="store_true", help="print the jobs and their state; run nothing")
    parser.add_argument("--seeds", type=seeds, help="e.g. 0,1 (default: the grid's)")
    parser.add_argument("--datasets", type=csv_list, help="e.g. cb,rte (default: the grid's tasks)")
    parser.add_argument("--only", type=csv_list, help="job name glob patterns, e.g. 'smop*-cb-*'")
    parser.add_argument("--sweep-dir", type=Path, help="default: outputs/sweeps/<grid>")
    return parser


def summary_main(argv: list[str]) -> int:
    from smop.summary import summarise  # matplotlib: only for summaries

    parser = argparse.ArgumentParser(prog="sweep.py summary", description="Tables and plots of a sweep folder.")
    parser.add_argument("sweep_dir", type=Path)
    parser.add_argument("--split", default="test", choices=["test", "val"], help="whose scores to tabulate")
    parser.add_argument("--out", type=Path, help="where to write (default: the sweep folder)")
    args = parser.parse_args(argv)
    if not args.sweep_dir.is_dir():
        parser.error(f"{args.sweep_dir} is not a folder")
    summary = summarise(args.sweep_dir, args.split, args.out)
    print(summary.markdown)
    print("wrote " + ", ".join(str(p) for p in summary.files))
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["summary"]:
        return summary_main(argv[1:])
    args = grid_parser().parse_intermixed_args(argv)
    grid = GRIDS[args.grid]
    sweep_dir = args.sweep_dir or default_sweep_dir(grid.name)
    jobs = select(grid.jobs(args.seeds, args.datasets), args.only)
    if not jobs:
        print(f"no job of {grid.name} matches --only {args.only}", file=sys.stderr)
        return 2
    if args.list:
        manifest = load_manifest(sweep_dir)
        print(f"# {grid.name}: {grid.doc}\n# {len(jobs)} jobs, folder {sweep_dir}")
        for job in jobs:
            print(f"{job.name:32} {job_status(sweep_dir, job.name, manifest):10} {job.command(args.overrides)}")
        return 0
    try:
        report = launch(grid, jobs, sweep_dir, args.overrides)
    except SweepError as err:
        print(f"sweep.py: {err}", file=sys.stderr)
        return 2
    print(
        f"\n{grid.name}: {len(report.completed)} completed now, {len(report.skipped)} skipped (completed before), "
        f"{len(report.failed)} failed"
    )
    for name, reason in report.failed.items():
        print(f"  FAILED {name}: {reason.splitlines()[0] if reason else '?'}")
    if grid.summarise:
        summary_main([str(sweep_dir)])
    return 1 if report.failed else 0


if __name__ == "__main__":
    sys.exit(main())
