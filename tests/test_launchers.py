"""Hydra launchers and the Optuna sweeper as project configs: they compose, launch, resume, and a missing
plugin is named with the extra to install."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
import runpy
import subprocess
import sys
from pathlib import Path

import optuna
import pytest
from helpers import SYNTHETIC
from hydra.utils import instantiate
from hydra_plugins.hydra_joblib_launcher.config import JobLibLauncherConf
from hydra_plugins.hydra_submitit_launcher.config import LocalQueueConf, SlurmQueueConf
from omegaconf import OmegaConf

from smop.checks import check_config, options
from smop.plugins import PLUGINS, MissingPluginError, missing_plugins, require_plugins
from smop.search import ResumableTPESampler
from smop.sweeps import GRIDS, SweepError, check_extra, check_launcher

ROOT = Path(__file__).resolve().parents[1]
LAUNCHERS = {"joblib": JobLibLauncherConf, "submitit_local": LocalQueueConf, "submitit_slurm": SlurmQueueConf}
# One epoch of two tiny batches, one validation batch, no test, no FLOP counting: a few seconds per job.
TINY = [
    *SYNTHETIC[:1],
    "dataset.synthetic.num_train=64",
    "dataset.synthetic.num_test=16",
    "trainer.max_epochs=1",
    "trainer.limit_train_batches=2",
    "trainer.limit_val_batches=1",
    "test=false",
    "callbacks=none",
]


def without_plugins(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make every Hydra plugin look uninstalled to find_spec, as in an environment without the extra."""
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name.startswith("hydra_plugins.") else find_spec(name, *a)
    )


# --- the configs ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", sorted(LAUNCHERS))
def test_launcher_config_gives_every_field_of_the_plugins_dataclass(name):
    """The file shadows the plugin's config of the same name, so it must hold all of it (and nothing else)."""
    ours = OmegaConf.load(ROOT / "smop" / "configs" / "hydra" / "launcher" / f"{name}.yaml")
    fields = {f.name for f in dataclasses.fields(LAUNCHERS[name])}
    assert set(ours) == fields
    assert ours._target_ == LAUNCHERS[name]._target_
    assert f"hydra/launcher={name}" in {f"{p.group}={c}" for p in PLUGINS for c in p.choices}


def test_launcher_configs_compose_with_the_projects_values(make_cfg):
    assert make_cfg("hydra/launcher=joblib").hydra.launcher.n_jobs == 2
    slurm = make_cfg("hydra/launcher=submitit_slurm", "hydra.launcher.partition=gpu").hydra.launcher
    assert (slurm.partition, slurm.gpus_per_task, slurm.tasks_per_node, slurm.timeout_min) == ("gpu", 1, 1, 720)
    assert slurm.submitit_folder.endswith("/.submitit/%j")
    assert make_cfg("hydra/launcher=submitit_local").hydra.launcher._target_.endswith("LocalLauncher")


def test_slurm_launcher_submits_the_expected_sbatch_script(make_cfg, tmp_path, monkeypatch):
    """No cluster here: a fake `sbatch` keeps the script submitit hands to SLURM, and the wait is skipped."""
    import submitit

    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "srun").write_text("#!/bin/sh\nexit 0\n")  # submitit checks that it is on a SLURM machine
    (bin_dir / "sbatch").write_text(f'#!/bin/sh\ncp "$1" {tmp_path}/sbatch.sh\necho "Submitted batch job 42"\n')
    for tool in bin_dir.iterdir():
        tool.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setattr(submitit.core.core.Job, "results", lambda self: [None])

    cfg = make_cfg("hydra/launcher=submitit_slurm", "hydra.launcher.partition=gpu", f"hydra.sweep.dir={tmp_path}")
    launcher = instantiate(cfg.hydra.launcher)
    launcher.setup(hydra_context=None, task_function=lambda cfg: None, config=cfg)
    assert launcher.launch([["seed=0"], ["seed=1"]], initial_job_idx=0) == [None, None]
    script = (tmp_path / "sbatch.sh").read_text()
    for line in (
        "--array=0-1%2",  # two jobs, at most array_parallelism at once
        "--partition=gpu",
        "--gpus-per-task=1",
        "--ntasks-per-node=1",
        "--cpus-per-task=8",
        "--mem=32GB",
        "--time=720",
        "--signal=USR2@120",  # signal_delay_s before the time limit
        f"--output={tmp_path}/.submitit/",
    ):
        assert f"#SBATCH {line}" in script


@pytest.mark.parametrize("search", options("hparams_search"))
def test_every_search_composes_and_its_parameters_exist(make_cfg, search, tmp_path):
    cfg = make_cfg(f"hparams_search={search}", f"hydra.sweep.dir={tmp_path / 'study'}")
    sweeper = cfg.hydra.sweeper
    assert cfg.hydra.mode.name == "MULTIRUN" and sweeper.direction == "maximize"
    assert sweeper.max_failure_rate is not None and sweeper.n_jobs == 1
    for key in sweeper.params:
        assert OmegaConf.select(cfg, key) is not None, f"{search} searches {key}, which the config lacks"
    check_config(cfg)
    url = instantiate(sweeper.storage)  # creates the folder sqlite needs
    assert url == f"sqlite:///{tmp_path / 'study' / 'optuna.db'}" and (tmp_path / "study").is_dir()
    assert isinstance(instantiate(sweeper.sampler), ResumableTPESampler)


def test_search_study_is_named_after_dataset_and_model(make_cfg):
    cfg = make_cfg("hparams_search=smop_optuna", "dataset=cb", "model=t5-base")
    assert cfg.hydra.sweeper.study_name == "smop_cb_t5-base"
    assert cfg.hydra.sweep.dir == "outputs/hparams_search/smop_cb_t5-base"


# --- the resumable sampler --------------------------------------------------------------------------------
def _objective(trial: optuna.Trial) -> float:
    return trial.suggest_float("lr", 0.01, 1.0, log=True) * trial.suggest_categorical("k", [2, 4, 10, 20])


def test_resumed_search_draws_new_trials_and_a_new_one_is_reproducible():
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    first = optuna.create_study(sampler=ResumableTPESampler(seed=0, n_startup_trials=5))
    first.optimize(_objective, n_trials=2)
    first.sampler = ResumableTPESampler(seed=0, n_startup_trials=5)  # a new process opening the same study
    first.optimize(_objective, n_trials=1)
    params = [t.params for t in first.trials]
    assert params[2] not in params[:2]  # a plain seeded TPESampler would draw trial 0's parameters again

    again = optuna.create_study(sampler=ResumableTPESampler(seed=0, n_startup_trials=5))
    again.optimize(_objective, n_trials=2)
    assert [t.params for t in again.trials] == params[:2]
    plain = optuna.create_study(sampler=optuna.samplers.TPESampler(seed=0, n_startup_trials=5))
    plain.optimize(_objective, n_trials=2)
    assert [t.params for t in plain.trials] == params[:2]  # seed + 0: a new search is TPE with the seed


# --- a missing plugin -----------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("override", "package"),
    [
        ("hydra/launcher=joblib", "hydra-joblib-launcher"),
        ("hydra/launcher=submitit_local", "hydra-submitit-launcher"),
        ("hydra/launcher=submitit_slurm", "hydra-submitit-launcher"),
        ("hydra/sweeper=optuna", "hydra-optuna-sweeper"),
        ("hparams_search=smop_optuna", "hydra-optuna-sweeper"),  # read from the file's defaults list
    ],
)
def test_missing_plugin_names_the_override_the_package_and_the_extra(monkeypatch, override, package):
    without_plugins(monkeypatch)
    with pytest.raises(MissingPluginError) as info:
        require_plugins(["-m", override, "seed=0,1"])
    message = str(info.value)
    assert override in message and package in message and 'pip install -e ".[cluster]"' in message


def test_installed_plugins_and_other_arguments_pass():
    require_plugins(["hydra/launcher=joblib", "hydra/sweeper=optuna", "hparams_search=smop_optuna"])
    others = ["-m", "--cfg", "job", "seed=0,1", "method=smop", "hydra/launcher=basic", "x=[1,", "lr=interval(0, 1)"]
    assert missing_plugins(others) == []


def test_train_py_exits_with_the_message_before_hydra_starts(monkeypatch):
    without_plugins(monkeypatch)
    monkeypatch.setattr(sys, "argv", ["train.py", "-m", "hydra/launcher=submitit_slurm", "seed=0,1"])
    with pytest.raises(SystemExit) as info:
        runpy.run_path(str(ROOT / "train.py"), run_name="__main__")
    assert "hydra/launcher=submitit_slurm needs the Hydra plugin hydra-submitit-launcher" in str(info.value.code)


def test_sweep_py_names_the_missing_plugin_and_refuses_a_search(monkeypatch):
    without_plugins(monkeypatch)
    with pytest.raises(SweepError, match=r'hydra/launcher=joblib needs .* pip install -e "\.\[cluster\]"'):
        check_launcher(["model=t5-base", "hydra/launcher=joblib"])
    with pytest.raises(SweepError, match="python train.py hparams_search=smop_optuna"):
        check_extra(GRIDS["demo"], ["hparams_search=smop_optuna"])


# --- launching (subprocesses) ---------------------------------------------------------------------------
def train(*overrides: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # two jobs side by side on a 2-core machine
    out = subprocess.run(
        [sys.executable, str(ROOT / "train.py"), *overrides, *TINY],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=env,
        timeout=300,
    )
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    return out


def statuses(folder: Path) -> list[str]:
    return [json.loads(p.read_text())["status"] for p in sorted(folder.rglob("results.json"))]


@pytest.mark.slow
@pytest.mark.parametrize("launcher", ["joblib", "submitit_local"])
def test_two_job_multirun(launcher, tmp_path):
    train("-m", f"hydra/launcher={launcher}", "seed=0,1", f"hydra.sweep.dir={tmp_path}")
    assert statuses(tmp_path) == ["completed", "completed"]
    seeds = sorted(json.loads(p.read_text())["seed"] for p in tmp_path.rglob("results.json"))
    assert seeds == [0, 1]
    if launcher == "submitit_local":  # the jobs really went through submitit: its logs, one folder per job
        assert len(list((tmp_path / ".submitit").glob("*/*_log.out"))) == 2


@pytest.mark.slow
def test_optuna_search_resumes_from_its_sqlite_file(tmp_path):
    search = ["hparams_search=smop_optuna", f"hydra.sweep.dir={tmp_path}"]
    train(*search, "hydra.sweeper.n_trials=2")
    train(*search, "hydra.sweeper.n_trials=1")  # the same command again: one more trial in the same study

    study = optuna.load_study(study_name="smop_synthetic_mixture_t5-tiny", storage=f"sqlite:///{tmp_path}/optuna.db")
    trials = study.trials
    assert [t.state for t in trials] == [optuna.trial.TrialState.COMPLETE] * 3
    assert all(t.value is not None and 0 <= t.value <= 1 for t in trials)
    assert len({tuple(sorted(t.params.items())) for t in trials}) == 3  # the resume drew a new trial
    assert set(trials[0].params) == {"method.lr", "method.num_prompts", "method.prompt_length"}
    assert statuses(tmp_path) == ["completed"] * 3  # <launch time>/<job number>/results.json
    best = OmegaConf.load(tmp_path / "optimization_results.yaml")
    assert best.best_value == study.best_value and dict(best.best_params) == study.best_params
