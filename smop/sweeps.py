"""The paper's grids as lists of jobs, each grid launched as one Hydra multirun of train.py, resumable.

A grid is a list of jobs (a method configuration x a dataset x a seed), not always a Cartesian product
(table 2 pairs prompt lengths with prompt tuning and K x L shapes with SMoP). Each job is written as a
config file `<sweep_dir>/_jobs/sweep_job/<name>.yaml` (the job's overrides, as an experiment file holds
them) and one multirun sweeps over them: `python train.py -m hydra.searchpath=[file://<sweep_dir>/_jobs]
+sweep_job=a,b,c hydra.sweep.dir=<sweep_dir> hydra.sweep.subdir=<job name> <your overrides>`. So any
subset of jobs (what is left to do when resuming) is one launcher call, with any Hydra launcher
(basic, joblib, submitit), and every job's output folder is named after the job.

Precedence, low to high: train.yaml and its defaults (experiment included) < the grid's fixed overrides
< the job's own overrides < the overrides given on the command line.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from fnmatch import fnmatch
from pathlib import Path
from typing import Any

from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import Override
from omegaconf import OmegaConf

from smop.plugins import MissingPluginError, guess_packages, require_plugins

CONFIG_DIR = Path(__file__).resolve().parent / "configs"
TRAIN = ("-m", "smop.train")  # the installed package's train.py: a sweep runs from any folder
RESULTS_FILE = "results.json"  # smop.results.RESULTS_FILE, not imported: `--list` should not import torch
MANIFEST = "sweep.json"
JOB_GROUP = "sweep_job"
JOBS_DIR = "_jobs"  # folders starting with "_" hold the sweep's own files; summaries skip them
ATTEMPTS_DIR = "_attempts"
LOGS_DIR = "_logs"
TASKS = ("boolq", "cb", "copa", "multirc", "rte", "wic")
# DePT's Table 1 tasks; each trains for its released step count
DEPT_GLUE = ("mnli", "qqp", "qnli", "sst2", "stsb", "mrpc", "glue_rte", "cola")
DEPT_SUPERGLUE = ("multirc", "boolq", "wic", "wsc", "cb")
DEPT_MRQA = ("newsqa", "searchqa", "hotpotqa", "nq")
# FPT's tasks, each with its own experiment (fpt_<task>: target length, stacks), run with the reference's seed
FPT_TASKS = ("mnli", "qqp", "record", "squad_v2", "xsum")
# the LoPA paper's phi-2 code table: each method on each task, with its experiment {method}_phi2_{task}
LOPA_CODE_TASKS = ("mbpp", "cruxeval_o", "cruxeval_i")
LOPA_CODE_METHODS = ("lopa", "idpg", "prompt_tuning", "lora")
ROUTERS = ("top1_perturbed", "top1", "top2", "gumbel", "stochastic", "single")
# Keys sweep.py sets itself: giving them would send jobs to folders where resume cannot find them.
RESERVED = ("hydra.sweep.dir", "hydra.sweep.subdir", "hydra.searchpath", "hydra.mode", JOB_GROUP)


class SweepError(Exception):
    """A problem with the command line or the sweep folder, reported before any job runs."""


@dataclass(frozen=True)
class Job:
    name: str  # the job's output folder under the sweep directory
    overrides: tuple[str, ...]  # exactly what `python train.py` would take to run this job alone

    def command(self, extra: Sequence[str] = ()) -> str:
        return " ".join(["python train.py", *self.overrides, *extra])


@dataclass(frozen=True)
class Grid:
    """Method configurations x datasets x seeds, with overrides shared by every job."""

    name: str
    doc: str
    configs: tuple[tuple[str, tuple[str, ...]], ...]  # (label used in job names, overrides)
    datasets: tuple[str, ...] = TASKS
    seeds: tuple[int, ...] = (0, 1, 2)
    fixed: tuple[str, ...] = ()  # shared overrides; the command line may override them
    summarise: bool = True  # print the summary table when the launch ends
    env: tuple[tuple[str, str], ...] = ()  # environment defaults for the jobs; the caller's environment wins
    per_dataset: tuple[tuple[str, tuple[str, ...]], ...] = ()  # (dataset, overrides only its jobs get)

    def jobs(self, seeds: Iterable[int] | None = None, datasets: Iterable[str] | None = None) -> list[Job]:
        """Configurations outermost, seeds innermost: a sequential launcher finishes one config at a time."""
        seeds, datasets = tuple(self.seeds if seeds is None else seeds), tuple(datasets or self.datasets)
        own = dict(self.per_dataset)
        return [
            Job(
                f"{label}-{dataset}-s{seed}",
                (*self.fixed, *overrides, *own.get(dataset, ()), f"dataset={dataset}", f"seed={seed}"),
            )
            for label, overrides in self.configs
            for dataset in datasets
            for seed in seeds
        ]

    def job_keys(self) -> set[str]:
        """Keys that differ between jobs: the command line may not set them (use --seeds / --datasets)."""
        per_job = [*self.configs, *self.per_dataset]
        return {override_key(o) for _, overrides in per_job for o in overrides} | {"dataset", "seed"}


def _pt(length: int) -> tuple[str, tuple[str, ...]]:
    return f"pt{length}", ("method=prompt_tuning", f"method.prompt_length={length}")


def _smop(k: int, length: int) -> tuple[str, tuple[str, ...]]:
    return f"smop{k}x{length}", ("method=smop", f"method.num_prompts={k}", f"method.prompt_length={length}")


# The synthetic task learns with AdamW at lr 0.1 (as experiment/demo_synthetic.yaml); the paper's Adafactor
# recipe is tuned for T5-base on SuperGLUE.
SYNTHETIC_RECIPE = ("optimizer=adamw", "method.lr=0.1")
# The tiny T5 gains nothing from several intra-op threads, and on a busy 2-core machine spinning OpenMP
# threads made steps 10-20x slower; one thread per job keeps the CPU grids at a few minutes.
ONE_THREAD = (("OMP_NUM_THREADS", "1"),)

GRIDS: dict[str, Grid] = {
    grid.name: grid
    for grid in (
        Grid(
            "table1",
            "Main results: PT (100 tokens), P-tuning (100), SMoP 4x5, full fine-tuning on six SuperGLUE tasks.",
            (
                _pt(100),
                ("ptuning100", ("method=p_tuning", "method.prompt_length=100")),
                _smop(4, 5),
                ("full", ("method=full",)),
            ),
        ),
        Grid(
            "table2",
            "Prompt length and number of prompts: PT with 5/20/50/100 tokens; SMoP K x L, K in 2/4/10/20,"
            " L in 1/3/5/10.",
            tuple(_pt(length) for length in (5, 20, 50, 100))
            + tuple(_smop(k, length) for k in (2, 4, 10, 20) for length in (1, 3, 5, 10)),
        ),
        Grid(
            "table3",
            "Routing: SMoP 4x5 with each router (single: one 5-token prompt through SMoP's code path).",
            # router=single sets method.num_prompts=1 through interpolation, so the shape is not overridden here
            tuple((f"smop-{router}", ("method=smop", f"router={router}")) for router in ROUTERS),
            datasets=("boolq", "cb", "rte"),
        ),
        Grid(
            "family",
            "SMoP 4x5 next to its relatives on six SuperGLUE tasks: PT-100, DePT (PT-100 budget), IDPG, LoPA,"
            " LoRA + PT / SMoP, FPT progressive training.",
            (
                _smop(4, 5),
                _pt(100),
                ("dept", ("method=dept",)),
                ("idpg", ("method=idpg",)),
                ("lopa", ("method=lopa",)),
                ("lora-pt100", ("method=lora_prompt_tuning", "method.prompt_length=100")),
                ("lora-smop4x5", ("method=lora_smop",)),
                ("fpt", ("method=fpt",)),
            ),
        ),
        Grid(
            "dept_glue",
            "DePT Table 1, GLUE: DePT on T5-base with the released protocol and each task's released steps.",
            (("dept", ("experiment=dept_glue",)),),
            datasets=DEPT_GLUE,
        ),
        Grid(
            "dept_superglue",
            "DePT Table 1, SuperGLUE: DePT on T5-base, released protocol and steps.",
            (("dept", ("experiment=dept_superglue",)),),
            datasets=DEPT_SUPERGLUE,
        ),
        Grid(
            "dept_mrqa",
            "DePT on MRQA: T5-base, 512-token inputs, batch 16 x 2 accumulated, released steps.",
            (("dept", ("experiment=dept_mrqa",)),),
            datasets=DEPT_MRQA,
        ),
        Grid(
            "fpt",
            "FPT on T5-large: MNLI, QQP, ReCoRD, SQuAD 2.0, XSum, each with its experiment fpt_<task>, seed 2022.",
            (("fpt", ()),),
            datasets=FPT_TASKS,
            seeds=(2022,),
            per_dataset=tuple((task, (f"experiment=fpt_{task}",)) for task in FPT_TASKS),
        ),
        Grid(
            "lopa_code",
            "The LoPA paper's phi-2 table: LoPA, IDPG, prompt tuning and LoRA on MBPP, CRUXEval-O and CRUXEval-I"
            " (experiment={method}_phi2_{task}); pass@1 of sampled generations run against the tests.",
            tuple((method, (f"experiment={method}_phi2",)) for method in LOPA_CODE_METHODS),
            datasets=LOPA_CODE_TASKS,
            seeds=(0,),
        ),
        Grid(
            "demo",
            "Routing on CPU: PT 5 and 20 tokens vs SMoP 2x5 and 4x5 on the synthetic mixture, tiny T5.",
            (_pt(5), _pt(20), _smop(2, 5), _smop(4, 5)),
            datasets=("synthetic_mixture",),
            fixed=(*SYNTHETIC_RECIPE, "trainer.max_epochs=8"),
            env=ONE_THREAD,
        ),
        Grid(
            "smoke",
            "Pipeline check of a launcher in about a minute: PT 5 and SMoP 2x5, one tiny epoch, one seed.",
            (_pt(5), _smop(2, 5)),
            datasets=("synthetic_mixture",),
            seeds=(0,),
            fixed=(
                *SYNTHETIC_RECIPE,
                "trainer.max_epochs=1",
                "dataset.synthetic.num_train=64",
                "dataset.synthetic.num_test=32",
            ),
            summarise=False,
            env=ONE_THREAD,
        ),
    )
}


# --- overrides ----------------------------------------------------------------------------------------
_PARSER = OverridesParser.create()


def parse(overrides: Sequence[str]) -> list[Override]:
    try:
        return _PARSER.parse_overrides(list(overrides))
    except Exception as err:  # hydra's OverrideParseException: say which override
        raise SweepError(f"cannot parse overrides {list(overrides)}: {err}") from err


def override_key(override: str) -> str:
    """`+method.lr=1` -> `method.lr`; `hydra/launcher=joblib` -> `hydra/launcher`."""
    return parse([override])[0].key_or_group


def check_extra(grid: Grid, extra: Sequence[str]) -> None:
    """Overrides from the command line go to every job: no sweeps, no keys the grid varies or sweep.py sets."""
    job_keys = grid.job_keys()
    for override in parse(extra):
        key = override.key_or_group
        if override.is_sweep_override():
            raise SweepError(
                f"{override.input_line}: give one value per override; a grid's jobs are fixed "
                "(run the grid again with another --sweep-dir for another value)"
            )
        if key in ("hparams_search", "hydra/sweeper") or key.startswith("hydra.sweeper"):
            raise SweepError(
                f"{override.input_line}: a grid is a fixed list of jobs; a hyperparameter search is its own "
                f"multirun: python train.py hparams_search=smop_optuna ... (docs/sweeps.md)"
            )
        if key in RESERVED:
            raise SweepError(f"{override.input_line}: sweep.py sets {key} itself (use --sweep-dir)")
        if key in job_keys:
            hint = {"seed": "--seeds", "dataset": "--datasets"}.get(key, "another grid")
            raise SweepError(f"{override.input_line}: grid {grid.name} sets {key} per job (use {hint})")


def is_hydra(override: str) -> bool:
    return override_key(override).startswith(("hydra.", "hydra/"))


def job_yaml(job: Job, grid: str) -> str:
    """The job's overrides as a `# @package _global_` config: groups through `override`, values as YAML."""
    groups, values = [], OmegaConf.create()
    for override in parse(job.overrides):
        key, value = override.key_or_group, override.value()
        if override.is_sweep_override() or override.is_delete() or override.is_add():
            raise SweepError(f"job {job.name}: only plain `key=value` overrides fit a job file: {override.input_line}")
        if is_group(override):
            groups.append(f"  - override /{key}: {value}")
        else:
            OmegaConf.update(values, key, value, force_add=True)
    body = OmegaConf.to_yaml(values) if values else ""
    defaults = "defaults:\n" + "\n".join(groups) + "\n" if groups else ""
    return f"# @package _global_\n# {grid} job {job.name}, the same as:\n# {job.command()}\n{defaults}{body}"


# --- job states in a sweep folder ---------------------------------------------------------------------
def read_results(job_dir: Path) -> dict[str, Any] | None:
    try:
        return json.loads((job_dir / RESULTS_FILE).read_text())
    except (OSError, ValueError):
        return None


def is_completed(job_dir: Path) -> bool:
    return (read_results(job_dir) or {}).get("status") == "completed"


def job_status(sweep_dir: Path, name: str, manifest: dict[str, Any]) -> str:
    results = read_results(sweep_dir / name)
    if results is not None:
        return str(results.get("status"))
    return manifest.get("jobs", {}).get(name, {}).get("status", "pending")


def failure_reason(job_dir: Path) -> str:
    results = read_results(job_dir)
    if results is not None:
        return str(results.get("error") or f"status {results.get('status')}")
    if job_dir.is_dir():
        return f"no {RESULTS_FILE}: stopped before training started (see {job_dir / 'train.log'} and the launch log)"
    return "not started: the multirun stopped before this job (see the launch log)"


def load_manifest(sweep_dir: Path) -> dict[str, Any]:
    try:
        return json.loads((sweep_dir / MANIFEST).read_text())
    except (OSError, ValueError):
        return {}


def save_manifest(sweep_dir: Path, manifest: dict[str, Any]) -> None:
    (sweep_dir / MANIFEST).write_text(json.dumps(manifest, indent=2))


# --- checks before launching --------------------------------------------------------------------------
def check_launcher(extra: Sequence[str]) -> None:
    """A launcher or sweeper whose plugin is missing, or a launcher config that is not found, stops sweep.py
    before anything runs, with the package to install."""
    from hydra import compose, initialize_config_dir
    from hydra.errors import MissingConfigException

    try:
        require_plugins(extra)
    except MissingPluginError as err:
        raise SweepError(str(err)) from err
    hydra_overrides = [o for o in extra if is_hydra(o)]
    if not hydra_overrides:
        return
    with initialize_config_dir(str(CONFIG_DIR), version_base="1.3"):
        try:
            compose("train.yaml", overrides=hydra_overrides, return_hydra_config=True)
        except MissingConfigException as err:  # a name the plugin table does not know (another plugin, a typo)
            packages = sorted({p for o in parse(hydra_overrides) for p in guess_packages(str(o.value()))})
            hint = f" Install it: pip install {' '.join(packages)}" if packages else ""
            raise SweepError(
                f"{' '.join(hydra_overrides)} needs a Hydra plugin that is not installed.{hint}\n(Hydra: {err})"
            ) from err


def is_group(override: Override) -> bool:
    """`method=smop` chooses a config file; `method.prompt_length=5` sets a value."""
    return (CONFIG_DIR / override.key_or_group).is_dir()


def check_jobs(jobs: Sequence[Job], jobs_dir: Path, extra: Sequence[str]) -> dict[str, str]:
    """Compose each job as the multirun will, and run train.py's config checks; returns {name: error}.

    A job whose config does not compose would stop a Hydra multirun in the middle (composition happens in
    the launcher, outside the job), so such jobs are recorded as failed and left out of the launch.
    Composing takes a fraction of a second, so jobs that differ only in values (seeds, lengths) are
    composed once and the values set on a copy: the config tree has no typed schemas that composition would
    apply, and check_config checks every numeric value against its range (smop/validation.py) on the copy.
    """
    from hydra import compose, initialize_config_dir

    from smop.checks import check_config  # imports torch: only when launching

    errors: dict[str, str] = {}
    composed: dict[tuple[str, ...], Any] = {}
    overrides = [f"hydra.searchpath=[{quote('file://' + str(jobs_dir))}]", *(o for o in extra if not is_hydra(o))]
    with initialize_config_dir(str(CONFIG_DIR), version_base="1.3"):
        for job in jobs:
            parsed = parse(job.overrides)
            kind = tuple(o.input_line if is_group(o) else o.key_or_group for o in parsed)
            try:
                if kind in composed:
                    cfg = copy.deepcopy(composed[kind])
                    for override in parsed:
                        if not is_group(override):
                            OmegaConf.update(cfg, override.key_or_group, override.value())
                else:
                    cfg = composed[kind] = compose(
                        "train.yaml", overrides=[*overrides, f"+{JOB_GROUP}={job.name}"], return_hydra_config=True
                    )
                check_config(cfg, cfg.hydra.runtime.choices.get("router"))
            except Exception as err:  # any reason is this job's failure, not the sweep's
                errors[job.name] = f"{type(err).__name__}: {err}".strip()
    return errors


def quote(value: str) -> str:
    """A Hydra override value that may hold any path."""
    return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"


# --- launching ----------------------------------------------------------------------------------------
@dataclass
class LaunchReport:
    completed: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)
    returncode: int | None = None


def multirun_command(jobs: Sequence[Job], sweep_dir: Path, extra: Sequence[str]) -> list[str]:
    return [
        sys.executable,
        *TRAIN,
        "--multirun",
        f"hydra.searchpath=[{quote('file://' + str(sweep_dir / JOBS_DIR))}]",
        f"+{JOB_GROUP}={','.join(job.name for job in jobs)}",
        f"hydra.sweep.dir={quote(str(sweep_dir))}",
        f"hydra.sweep.subdir=${{hydra.runtime.choices.{JOB_GROUP}}}",
        *extra,
    ]


def run_logged(command: Sequence[str], log_path: Path, env: dict[str, str] | None = None) -> int:
    """Run, echoing the output and keeping it in `log_path`: the first failing job's traceback is there."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with (
        log_path.open("w") as log,
        subprocess.Popen(
            command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1, env=env
        ) as process,
    ):
        log.write(" ".join(command) + "\n")
        assert process.stdout is not None
        for line in process.stdout:
            sys.stdout.write(line)
            log.write(line)
        return process.wait()


def launch(grid: Grid, jobs: Sequence[Job], sweep_dir: Path, extra: Sequence[str] = ()) -> LaunchReport:
    """Run the jobs that have no completed results.json yet as one multirun; record what failed and why."""
    sweep_dir = sweep_dir.resolve()
    check_extra(grid, extra)
    check_launcher(extra)
    manifest = load_manifest(sweep_dir)
    same_run = sorted(o for o in extra if not is_hydra(o))  # launchers may change between resumes
    if manifest and (manifest.get("grid") != grid.name or sorted(manifest.get("overrides", [])) != same_run):
        raise SweepError(
            f"{sweep_dir} holds grid {manifest.get('grid')} run with overrides "
            f"{manifest.get('overrides')}; now grid {grid.name} with {same_run}. Resume with the same "
            f"ones, choose another --sweep-dir, or delete {sweep_dir / MANIFEST} to mix them."
        )
    manifest = {
        "grid": grid.name,
        "overrides": same_run,
        "jobs": manifest.get("jobs", {}),
        "launches": manifest.get("launches", []),
    }
    jobs_dir = sweep_dir / JOBS_DIR
    (jobs_dir / JOB_GROUP).mkdir(parents=True, exist_ok=True)
    for job in jobs:
        (jobs_dir / JOB_GROUP / f"{job.name}.yaml").write_text(job_yaml(job, grid.name))
        manifest["jobs"].setdefault(job.name, {})["overrides"] = list(job.overrides)

    report = LaunchReport()
    pending = []
    for job in jobs:
        if is_completed(sweep_dir / job.name):
            report.skipped.append(job.name)
            manifest["jobs"][job.name].update(status="completed", error=None)
        else:
            pending.append(job)
    print(
        f"{grid.name}: {len(jobs)} jobs in {sweep_dir}; {len(report.skipped)} completed before (skipped), "
        f"checking {len(pending)}",
        flush=True,
    )
    invalid = check_jobs(pending, jobs_dir, extra) if pending else {}
    for name, error in invalid.items():
        print(f"  not launched: {name}: {error.splitlines()[0]}", flush=True)
    to_run = [job for job in pending if job.name not in invalid]
    for job in to_run:  # keep an earlier failed attempt's files, out of the way of the new one
        if (sweep_dir / job.name).exists():
            attempt = sweep_dir / ATTEMPTS_DIR / f"{job.name}-{time.strftime('%Y%m%d-%H%M%S')}"
            attempt.parent.mkdir(parents=True, exist_ok=True)
            shutil.move(str(sweep_dir / job.name), str(attempt))
    try:
        if to_run:
            command = multirun_command(to_run, sweep_dir, extra)
            stamp = time.strftime("%Y%m%d-%H%M%S")
            manifest["launches"].append({"time": stamp, "jobs": len(to_run), "command": command})
            save_manifest(sweep_dir, manifest)
            env = {**dict(grid.env), **os.environ}
            report.returncode = run_logged(command, sweep_dir / LOGS_DIR / f"launch-{stamp}.log", env)
            manifest["launches"][-1]["returncode"] = report.returncode
    finally:  # also when interrupted: record what finished
        for job in pending:
            entry = manifest["jobs"][job.name]
            if job.name in invalid:
                entry.update(status="failed", error=invalid[job.name])
            elif is_completed(sweep_dir / job.name):
                entry.update(status="completed", error=None)
                report.completed.append(job.name)
            else:
                started = (sweep_dir / job.name).is_dir()
                entry.update(status="failed" if started else "not_started", error=failure_reason(sweep_dir / job.name))
            if entry["status"] != "completed":
                report.failed[job.name] = entry["error"]
        save_manifest(sweep_dir, manifest)
    return report


def select(jobs: Sequence[Job], patterns: Sequence[str] | None) -> list[Job]:
    """Jobs whose name matches any of the glob patterns (all when none are given)."""
    return [job for job in jobs if not patterns or any(fnmatch(job.name, p) for p in patterns)]


def default_sweep_dir(grid: str) -> Path:
    return Path("outputs/sweeps") / grid
