"""End to end: the embedded default as a user runs it, evaluation-only mode, seeding."""

from __future__ import annotations

import csv
import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import compose_config
from helpers import SYNTHETIC

from smop.checks import Refused
from smop.run import run

ROOT = Path(__file__).resolve().parents[1]
SHORT = ["trainer.max_epochs=1", "trainer.limit_train_batches=3", *SYNTHETIC]


@pytest.mark.slow
def test_embedded_default_as_a_subprocess(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "WANDB_MODE": "offline"}
    done = subprocess.run(
        [sys.executable, "train.py", f"hydra.run.dir={tmp_path}"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["status"] == "completed"
    assert (results["method"], results["router"], results["dataset"], results["model"]) == (
        "smop",
        "top1_perturbed",
        "rte",
        "tiny",
    )
    assert results["params"]["trainable"] == 20 * 128 + 128 * 4
    assert set(results["metrics"]["test"]) == {"accuracy", "score"} and results["metrics"]["best_epoch"] is not None
    assert results["cost"]["train_time_s"] > 0 and results["cost"]["memory_kind"] == "cpu_peak_rss"
    assert results["cost"]["inference_flops_per_example"] > 0
    assert sum(results["routing"]["counts"]["test"]) == 22  # every test example routed once
    assert results["config"]["method"]["num_prompts"] == 4 and results["versions"]["torch"]
    assert (tmp_path / ".hydra" / "config.yaml").is_file() and list((tmp_path / "checkpoints").glob("best-*.ckpt"))
    assert "test/accuracy" in done.stdout  # the summary table


def test_evaluation_only_does_not_depend_on_eval_batch_size(make_cfg, tmp_path):
    trained = run(make_cfg(*SHORT))
    checkpoint = next((tmp_path / "checkpoints").glob("best-*.ckpt"))
    by_size = {}
    for size in (1, 7):
        out = tmp_path / f"eval{size}"
        cfg = compose_config(
            [
                "train=false",
                f"ckpt_path={checkpoint}",
                f"dataset.eval_batch_size={size}",
                "~callbacks.flop_counter",
                *SHORT,
            ],
            out,
        )
        by_size[size] = run(cfg)
    assert by_size[1]["metrics"] == by_size[7]["metrics"]
    assert by_size[1]["routing"]["counts"] == by_size[7]["routing"]["counts"]
    assert by_size[1]["metrics"]["val"] == trained["metrics"]["val"]  # the same checkpoint, the same scores
    assert by_size[1]["router"] == "top1_perturbed" and "router" in by_size[1]["config_from_checkpoint"]


def test_same_seed_same_metrics_other_seed_other_prompts(tmp_path):
    first = run(compose_config(["seed=3", *SHORT], tmp_path / "a"))
    second = run(compose_config(["seed=3", *SHORT], tmp_path / "b"))
    third = run(compose_config(["seed=4", *SHORT], tmp_path / "c"))
    assert first["metrics"] == second["metrics"] and first["routing"] == second["routing"]
    assert first["routing"] != third["routing"]


def test_test_scores_come_from_the_best_validation_epoch(make_cfg, tmp_path):
    """Not the last epoch's weights: the checkpoint with the best val/score (first one on ties)."""
    # seed 4: validation peaks at epoch 2 and ties it at epochs 3 and 4 (the data order is seeded per epoch)
    overrides = ["dataset=synthetic_mixture", "dataset.synthetic.num_test=40", "~callbacks.flop_counter", "seed=4"]
    results = run(make_cfg("trainer.max_epochs=5", "trainer.limit_train_batches=4", *overrides))
    rows = list(csv.DictReader((tmp_path / "csv" / "version_0" / "metrics.csv").open()))
    scores = [(int(r["epoch"]), float(r["val/score"])) for r in rows if r.get("val/score")][:5]  # the 5 fit epochs
    best = max(scores, key=lambda item: item[1])  # max() keeps the first of equal scores, as the checkpoint does
    assert len({score for _, score in scores}) > 1
    assert results["metrics"]["best_epoch"] == best[0] < 4
    assert results["metrics"]["val"]["score"] == pytest.approx(best[1])


# --- the command line: exit status, one-line messages --------------------------------------------------------------
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "WANDB_MODE": "offline"}
QUICK = [*SHORT, "~callbacks.progress_bar", "~callbacks.flop_counter"]


def train_py(*overrides: str, env: dict | None = None) -> subprocess.CompletedProcess:
    env = {**ENV, "PYTHONPATH": str(ROOT / "tests"), **(env or {})}
    return subprocess.run(
        [sys.executable, "train.py", *overrides], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600
    )


@pytest.mark.slow
@pytest.mark.parametrize(("signal", "code"), [("SIGINT", 130), ("SIGTERM", 143)])
def test_a_stopped_run_exits_non_zero_with_one_line_that_resumes_it(tmp_path, signal, code):
    """SIGTERM used to exit 0 (Lightning's SIGTERMException is a SystemExit without a code): a scheduler or `&&`
    read a preempted run as a success. The printed command resumes it."""
    kill = ["+callbacks.kill._target_=helpers.SignalAt", f"+callbacks.kill.signal={signal}", "+callbacks.kill.step=1"]
    done = train_py(*QUICK, *kill, f"hydra.run.dir={tmp_path}")
    assert done.returncode == code, done.stderr[-3000:]
    lines = [line for line in (done.stdout + done.stderr).splitlines() if "Stopped by" in line]
    assert len(lines) == 1 and "Traceback" not in done.stderr
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["status"] == "failed" and lines[0].endswith(results["error"])
    assert results["error"].startswith(f"Stopped by {signal} in training at epoch 0, step 2: checkpoints/interrupted")
    assert results["stopped"]["exit_code"] == code and (tmp_path / "checkpoints" / "interrupted.ckpt").is_file()
    if signal == "SIGINT":  # the command it prints, as it is: the kill at step 1 is behind it
        resumed = subprocess.run(
            shlex.split(results["stopped"]["resume"]), cwd=ROOT, env={**ENV, "PYTHONPATH": "tests"}
        )
        assert resumed.returncode == 0
        results = json.loads((tmp_path / "results.json").read_text())
        assert results["status"] == "completed" and results["resumed_from"]["step"] == 2


@pytest.mark.slow
def test_a_command_refused_for_a_used_folder_is_one_line_and_changes_nothing(tmp_path):
    """`python train.py trainer.max_epochs=4 method.lr=0.1 hydra.run.dir=D` on a finished run in D used to resume it
    silently and record `ckpt_path: null, method.lr: 0.1`."""
    run(compose_config(QUICK, tmp_path))
    before = (tmp_path / "results.json").read_bytes()
    done = train_py(*QUICK, "trainer.max_epochs=4", "method.lr=0.1", f"hydra.run.dir={tmp_path}")
    assert done.returncode == 1
    (line,) = [line for line in done.stderr.splitlines() if not line.startswith("INFO: ")]
    assert line.startswith(f"train.py: {tmp_path} holds a completed run, which is never resumed or overwritten")
    assert "train=false ckpt_path=" in line and "hydra.run.dir=" in line and "Traceback" not in done.stdout
    assert (tmp_path / "results.json").read_bytes() == before


@pytest.mark.slow
def test_an_unreachable_hub_is_one_line_hint_first_naming_the_model(tmp_path):
    done = train_py("model=t5-small", f"hydra.run.dir={tmp_path}")
    assert done.returncode == 1
    (line,) = [line for line in done.stderr.splitlines() if not line.startswith("INFO: ")]  # was 113 lines
    assert line.startswith("train.py: Could not load model 'google-t5/t5-small': point model.name_or_path=")
    assert "/path/to/t5-small" in line and "t5-base" not in line
    assert "Traceback" not in done.stdout + done.stderr
    full = train_py("model=t5-small", f"hydra.run.dir={tmp_path / 'full'}", env={"HYDRA_FULL_ERROR": "1"})
    assert full.returncode == 1 and "Traceback" in full.stderr and "LocalEntryNotFoundError" in full.stderr


def test_an_unreachable_dataset_hub_is_one_line_hint_first(make_cfg):
    with pytest.raises(ConnectionError) as info:
        run(make_cfg("dataset.source=hub", "trainer.fast_dev_run=true"))
    message = str(info.value)
    assert "\n" not in message
    assert re.match(r"Could not load \S*super_glue/rte \[train\] from the Hugging Face hub: read the official", message)
    assert message.index("dataset=rte dataset.source=dir") < message.index("(")  # the way on before the cause


# --- evaluating a checkpoint: its own config, or a refusal before anything is built -----------------------------
@pytest.fixture(scope="module")
def prompt_tuning_checkpoint(tmp_path_factory) -> tuple[Path, dict]:
    folder = tmp_path_factory.mktemp("prompt_tuning")
    results = run(compose_config(["method=prompt_tuning", "method.prompt_length=4", *QUICK], folder))
    return next((folder / "checkpoints").glob("best-*.ckpt")), results


def test_evaluation_takes_the_checkpoints_own_config_where_the_command_line_names_none(
    prompt_tuning_checkpoint, tmp_path
):
    """`train=false ckpt_path=<a prompt tuning checkpoint>` used to build the default SMoP on RTE, then fail."""
    checkpoint, trained = prompt_tuning_checkpoint
    results = run(compose_config(["train=false", f"ckpt_path={checkpoint}", "~callbacks.flop_counter"], tmp_path))
    assert (results["method"], results["router"], results["dataset"]) == ("prompt_tuning", None, "synthetic_mixture")
    assert results["config_from_checkpoint"] == ["method", "router", "model", "dataset", "seed"]
    assert results["config"]["method"]["prompt_length"] == 4 and results["config"]["ckpt_path"] == str(checkpoint)
    assert results["metrics"]["val"] == trained["metrics"]["val"]
    on_top = ["train=false", f"ckpt_path={checkpoint}", "~callbacks.flop_counter", "dataset.eval_batch_size=7"]
    results = run(compose_config(on_top, tmp_path / "on_top"))  # a key set on the command line applies on top
    assert results["dataset"] == "synthetic_mixture" and results["config"]["dataset"]["eval_batch_size"] == 7
    assert results["metrics"]["val"] == trained["metrics"]["val"]


@pytest.mark.parametrize(
    ("override", "difference"),
    [
        ("method=smop", "method.name: checkpoint 'prompt_tuning', this command 'smop'"),
        ("method.prompt_length=7", "method.prompt_length: checkpoint 4, this command 7"),
        ("model.tiny.num_layers=2", "model.tiny.num_layers: checkpoint 1, this command 2"),
    ],
)
def test_evaluation_refuses_a_checkpoint_the_command_line_contradicts(
    prompt_tuning_checkpoint, tmp_path, override, difference
):
    checkpoint, _ = prompt_tuning_checkpoint
    with pytest.raises(Refused, match=re.escape(difference)) as info:
        run(compose_config(["train=false", f"ckpt_path={checkpoint}", override, *SYNTHETIC], tmp_path))
    assert f"leave {override}" in str(info.value)
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["status"] == "failed" and results["params"] is None  # refused before anything was built


def test_a_checkpoint_for_another_run_is_refused_on_resume(prompt_tuning_checkpoint, tmp_path):
    checkpoint, _ = prompt_tuning_checkpoint
    with pytest.raises(Refused, match=r"method.lr: checkpoint 0.5, this command 0.1.*drop the overrides"):
        run(
            compose_config(
                ["method=prompt_tuning", "method.prompt_length=4", "method.lr=0.1", *QUICK, f"ckpt_path={checkpoint}"],
                tmp_path,
            )
        )


@pytest.mark.parametrize(
    "content",
    [b"", b"PK\x03\x04 truncated zip", b"not a checkpoint at all", b"e" * 64, "half"],
    ids=["empty", "zip-header", "text", "opcode-101", "half-written"],
)
def test_a_corrupt_checkpoint_gets_a_plain_message(tmp_path, content):
    path = tmp_path / "broken.ckpt"
    if content == "half":
        torch.save({"state_dict": {"w": torch.zeros(100)}, "hyper_parameters": {}}, path)
        content = path.read_bytes()[: path.stat().st_size // 2]
    path.write_bytes(content)
    with pytest.raises(Refused, match="broken.ckpt is not a readable checkpoint: it ") as info:
        run(compose_config(["train=false", f"ckpt_path={path}", *SYNTHETIC], tmp_path / "run"))
    message = str(info.value)
    assert not any(noise in message for noise in ("Errno", "Invalid argument", ": 101", "operand", "miniz", "\n"))
