"""wandb logging: offline runs read back with wandb's own reader, one run per multirun job, no wandb by default."""

from __future__ import annotations

import importlib.abc
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import SYNTHETIC
from hydra.errors import InstantiationException

from smop.builders import instantiate_group
from smop.module import PromptTuningSystem
from smop.run import run
from smop.wandb_logging import WandbReport, check_mode, finish_wandb, wandb_callbacks, wandb_logger

ROOT = Path(__file__).resolve().parents[1]
SHORT = ["trainer.max_epochs=2", "trainer.limit_train_batches=2", "trainer.limit_val_batches=1", *SYNTHETIC]
QUIET = ["callbacks.progress_bar=null"]
BARE = ["callbacks=none"]  # no checkpoints or cost callbacks (the FLOP count takes seconds): for what is not about them


@pytest.fixture(autouse=True)
def fresh_wandb():
    """wandb reads its environment once per process, at its first setup: each test starts and ends a session."""

    def teardown() -> None:
        if sys.modules.get("wandb") is not None:  # never imports wandb itself
            sys.modules["wandb"].teardown()

    teardown()
    yield
    teardown()


@pytest.fixture
def wandb_home(tmp_path, monkeypatch) -> Path:
    """Offline, with wandb's cache, staging and settings folders under tmp_path, not in the home folder."""
    home = tmp_path / "wandb_home"
    monkeypatch.setenv("WANDB_MODE", "offline")
    for name in ("WANDB_CACHE_DIR", "WANDB_DATA_DIR", "WANDB_CONFIG_DIR"):
        monkeypatch.setenv(name, str(home / name.lower()))
    return home


def inspect(run_dir: Path, *flags: str) -> str:
    """wandb's own reader of a run's .wandb log."""
    done = subprocess.run(
        [sys.executable, "-m", "wandb", "leet", "inspect", "--json", *flags, str(run_dir)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


def read_run(wandb_dir: Path) -> dict:
    """The one run under `wandb_dir`: its final state (config, summary, tags, exit code), group and history."""
    (run_dir,) = wandb_dir.glob("offline-run-*")  # exactly one run: jobs never share a folder
    logged = json.loads(inspect(run_dir, "--summary"))
    records = [json.loads(line) for line in inspect(run_dir).splitlines()]
    logged["group"] = next(record["run"] for record in records if record["type"] == "run").get("run_group")
    logged["history"] = [record["history"]["item"] for record in records if record["type"] == "history"]
    logged["run_dir"] = run_dir
    return logged


def histograms(history: list[dict], split: str) -> list[tuple[int, list[int]]]:
    key = f"routing/{split}/histogram"
    return [(row["trainer/global_step"], row[f"{key}.values"]) for row in history if f"{key}.values" in row]


def prompt_counts(history: list[dict], split: str, step: int) -> list[int]:
    """The module's own scalar counts (routing/<split>/prompt_k) logged at `step`."""
    prefix = f"routing/{split}/prompt_"
    rows = [row for row in history if row.get("trainer/global_step") == step and any(k.startswith(prefix) for k in row)]
    counts = {int(k[len(prefix) :]): v for k, v in rows[-1].items() if k.startswith(prefix)}
    return [int(counts[k]) for k in sorted(counts)]


# --- without wandb ------------------------------------------------------------------------------------


class RecordImports(importlib.abc.MetaPathFinder):
    """Records (and refuses) every attempt to import wandb, also attempts that their caller would catch."""

    def __init__(self) -> None:
        self.attempts: list[str] = []

    def find_spec(self, name, path=None, target=None):
        if name == "wandb" or name.startswith("wandb."):
            self.attempts.append(name)
            raise ImportError(f"test: {name} may not be imported")
        return None


def test_default_run_never_imports_wandb(make_cfg, monkeypatch):
    for name in [name for name in sys.modules if name == "wandb" or name.startswith("wandb.")]:
        monkeypatch.delitem(sys.modules, name)  # earlier tests may have loaded it; restored afterwards
    recorder = RecordImports()
    monkeypatch.setattr(sys, "meta_path", [recorder, *sys.meta_path])
    cfg = make_cfg("trainer.fast_dev_run=true", *SYNTHETIC, *QUIET)
    assert cfg.logger.keys() == {"csv"}
    assert wandb_callbacks(instantiate_group(cfg.logger)) == []
    assert run(cfg)["status"] == "completed"
    assert recorder.attempts == [] and "wandb" not in sys.modules


def test_missing_wandb_names_the_extra(make_cfg, monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "wandb", None)  # `import wandb` raises ImportError
    with pytest.raises(ModuleNotFoundError, match=r'pip install -e "\.\[wandb\]"'):
        wandb_logger(save_dir=str(tmp_path))
    with pytest.raises(InstantiationException, match=r'pip install -e "\.\[wandb\]"'):
        run(make_cfg("logger=wandb", "trainer.fast_dev_run=true", *SYNTHETIC, *QUIET))
    assert json.loads((tmp_path / "results.json").read_text())["status"] == "failed"


def test_online_without_api_key_or_terminal_fails_early(monkeypatch, tmp_path):
    for name in ("WANDB_MODE", "WANDB_API_KEY", "WANDB_IDENTITY_TOKEN_FILE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "no.netrc"))
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(tmp_path / "config"))
    monkeypatch.setattr(sys, "stdin", io.StringIO())  # not a terminal: wandb could not ask for a key
    with pytest.raises(RuntimeError, match=r"no W&B API key .* WANDB_MODE=offline.*`wandb sync"):
        check_mode(None)
    assert check_mode("offline") == "offline" and check_mode("disabled") == "disabled"
    monkeypatch.setenv("WANDB_MODE", "offline")
    assert check_mode(None) == "offline"
    with pytest.raises(ValueError, match=r"logger.wandb.mode='ofline' .* allowed: online, offline, disabled"):
        check_mode("ofline")


def test_finish_is_a_noop_without_the_wandb_callback():
    finish_wandb([], {"status": "failed", "cost": {}})  # no WandbReport: nothing to log, nothing imported
    finish_wandb([WandbReport()], {"status": "completed", "cost": {}})  # no wandb run started: nothing to finish


# --- offline runs ---------------------------------------------------------------------------------------


@pytest.mark.slow
def test_offline_run_logs_config_metrics_routing_histograms_and_cost_table(make_cfg, tmp_path, wandb_home):
    import wandb

    results = run(make_cfg("logger=[csv,wandb]", "callbacks.flop_counter.num_batches=1", *SHORT, *QUIET))
    assert results["status"] == "completed" and wandb.run is None  # finished: the next job starts its own run
    logged = read_run(tmp_path / "wandb")

    # one group per sweep (a single run: the folder holding its folder), a name per job, the tags
    assert logged["project"] == "smop"
    assert (logged["group"], logged["name"]) == (tmp_path.parent.name, tmp_path.name)
    assert logged["tags"] == ["smop", "top1_perturbed", "synthetic_mixture", "t5-tiny"]
    assert (logged["exit_code"], logged["state"]) == (0, "finished")

    # the full resolved config, nested
    config = logged["config"]
    assert config["method"]["name"] == "smop" and config["method"]["num_prompts"] == 4
    assert config["router"]["topk"] == 1 and config["dataset"]["name"] == "synthetic_mixture"
    assert config["seed"] == results["seed"] and config["logger"]["wandb"]["project"] == "smop"

    # per-epoch routing histograms: one bin per prompt, equal to the module's fresh counts of that epoch
    history = logged["history"]
    for split, expected in (("train", 2), ("val", 3), ("test", 1)):  # val: 2 epochs + the best checkpoint's
        logged_histograms = histograms(history, split)
        assert len(logged_histograms) == expected, split
        for step, values in logged_histograms:
            assert values == prompt_counts(history, split, step), (split, step)
        assert logged_histograms[-1][1] == results["routing"]["counts"][split]
    assert logged["summary"]["routing/test/histogram"]["bins"] == [-0.5, 0.5, 1.5, 2.5, 3.5]

    # final figures: summary values and tables
    summary = logged["summary"]
    assert summary["final/test/score"] == pytest.approx(results["metrics"]["test"]["score"])
    assert summary["cost/train_time_s"] == pytest.approx(results["cost"]["train_time_s"])
    assert summary["params/trainable"] == results["params"]["trainable"] and summary["status"] == "completed"
    assert summary["best_step"] == results["metrics"]["best_step"] is not None
    tables = {}
    for key in ("final/cost", "final/metrics", "final/routing"):
        assert summary[key]["_type"] == "table-file", key
        tables[key] = json.loads((logged["run_dir"] / "files" / summary[key]["path"]).read_text())
    cost = dict(zip(tables["final/cost"]["columns"], tables["final/cost"]["data"][0], strict=True))
    assert cost["method"] == "smop" and cost["router"] == "top1_perturbed" and cost["status"] == "completed"
    assert cost["train_time_s"] == pytest.approx(results["cost"]["train_time_s"])
    assert cost["inference_flops_per_example"] == results["cost"]["inference_flops_per_example"]
    metrics = {(row[-3], row[-2]): row[-1] for row in tables["final/metrics"]["data"]}
    assert metrics[("val", "score")] == pytest.approx(results["metrics"]["val"]["score"])
    assert len(tables["final/routing"]["data"]) == 3 * 4  # splits x prompts


@pytest.mark.slow
def test_failed_run_finishes_its_wandb_run_failed_and_keeps_its_error(make_cfg, tmp_path, wandb_home, monkeypatch):
    import wandb

    def boom(self, batch, batch_idx):
        raise RuntimeError("boom in training_step")

    monkeypatch.setattr(PromptTuningSystem, "training_step", boom)
    with pytest.raises(RuntimeError, match="boom in training_step"):  # the run's own error, not wandb's
        run(make_cfg("logger=wandb", *SHORT, *BARE))
    assert wandb.run is None
    logged = read_run(tmp_path / "wandb")
    assert logged["exit_code"] == 1
    assert logged["summary"]["status"] == "failed" and "boom in training_step" in logged["summary"]["error"]


@pytest.mark.slow
def test_finish_survives_results_it_cannot_log(tmp_path, wandb_home):
    import wandb

    wandb.init(project="smop", dir=str(tmp_path), mode="offline")
    finish_wandb([WandbReport()], {"status": "failed"})  # no "cost": logging fails, the run still finishes
    assert wandb.run is None
    assert read_run(tmp_path / "wandb")["exit_code"] == 1


@pytest.mark.slow
def test_multirun_jobs_are_separate_wandb_runs_in_one_group(tmp_path, wandb_home):
    sweep = tmp_path / "grid"
    done = subprocess.run(
        [
            sys.executable,
            "train.py",
            "-m",
            "seed=0,1",
            "logger=wandb",
            f"hydra.sweep.dir={sweep}",
            "trainer.max_epochs=1",
            "trainer.limit_train_batches=2",
            "trainer.limit_val_batches=1",
            *SYNTHETIC,
            *BARE,
        ],
        cwd=ROOT,
        env=dict(os.environ),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    jobs = sorted(path.parent for path in sweep.glob("*/results.json"))
    assert [job.name for job in jobs] == ["0_smop_synthetic_mixture", "1_smop_synthetic_mixture"]
    runs = [read_run(job / "wandb") for job in jobs]  # read_run: exactly one wandb run per job folder
    assert {logged["group"] for logged in runs} == {"grid"}
    assert [logged["name"] for logged in runs] == [job.name for job in jobs]
    assert len({logged["run_id"] for logged in runs}) == 2
    assert [logged["config"]["seed"] for logged in runs] == [0, 1]
    for logged in runs:  # each run holds its own job only: one test evaluation, one final table
        assert logged["exit_code"] == 0 and len(histograms(logged["history"], "test")) == 1
        assert sum(1 for row in logged["history"] if "final/cost._type" in row) == 1
