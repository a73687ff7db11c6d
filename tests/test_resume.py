"""Fault tolerance: a signal stops a run at a step boundary and `ckpt_path=last` resumes it exactly; a hard kill
loses at most an epoch; a run folder is never reused, a completed run never resumed; a NaN loss stops cleanly."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from conftest import ROOT, compose_config
from helpers import SYNTHETIC, FirstStep, LastCheckpointSteps

from smop.checks import Refused
from smop.interrupts import RunStopped
from smop.run import run

# 180 training examples, batch 32: 6 steps per epoch; SMoP with the perturbed router, so the noise matters too.
BASE = [*SYNTHETIC, "trainer.max_epochs=3", "~callbacks.progress_bar", "~callbacks.flop_counter", "logger=csv"]
EXIT = {"SIGINT": 130, "SIGTERM": 143}
pytestmark = pytest.mark.slow


def trained(folder: Path) -> dict[str, torch.Tensor]:
    return torch.load(folder / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]


def files(folder: Path) -> dict[str, bytes]:
    """Every file of a run folder and its bytes: to show that a refused command changed nothing."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> tuple[dict, Path, list[str]]:
    folder = tmp_path_factory.mktemp("uninterrupted")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        results = run(compose_config(BASE, folder))
    return results, folder, [str(w.message) for w in caught]


def stopped_then_resumed(folder: Path, kill: list[str], resume_from: str, signal: str = "SIGTERM") -> tuple[dict, dict]:
    """A run stopped by a real signal from a callback, then resumed; the stopped attempt's and the resumed results."""
    with pytest.raises(RunStopped) as info:
        run(compose_config([*BASE, *kill], folder))
    assert info.value.code == EXIT[signal]
    stopped = json.loads((folder / "results.json").read_text())
    assert stopped["status"] == "failed" and stopped["error"] == str(info.value)
    assert stopped["stopped"]["signal"] == signal and stopped["stopped"]["exit_code"] == EXIT[signal]
    FirstStep.first = None
    resume = [*BASE, f"ckpt_path={resume_from}", "+callbacks.first._target_=helpers.FirstStep"]
    return stopped, run(compose_config(resume, folder))


def assert_same_run(resumed: dict, resumed_dir: Path, uninterrupted: tuple[dict, Path, list[str]]) -> None:
    full, full_dir, _ = uninterrupted
    assert resumed["status"] == "completed"
    assert resumed["metrics"] == full["metrics"]
    assert resumed["routing"]["counts"]["val"] == full["routing"]["counts"]["val"]
    assert resumed["routing"]["counts"]["test"] == full["routing"]["counts"]["test"]
    ours, theirs = trained(resumed_dir), trained(full_dir)
    assert ours.keys() == theirs.keys()
    for key in ours:
        torch.testing.assert_close(ours[key], theirs[key], rtol=0, atol=0, msg=key)


def test_a_fresh_run_starts_fresh_without_ckpt_path_warnings(uninterrupted):
    results, _, caught = uninterrupted
    assert results["resumed_from"] is None and results["config"]["ckpt_path"] is None
    assert [message for message in caught if "ckpt_path" in message] == []


@pytest.mark.parametrize("checkpoint", ["last.ckpt", "interrupted.ckpt"])
def test_resume_from_an_epoch_end_checkpoint_equals_the_uninterrupted_run(uninterrupted, tmp_path, checkpoint):
    """Stopped at the end of epoch 1; resumed from last.ckpt (that epoch's end) or interrupted.ckpt (the stop, which
    `ckpt_path=last` prefers on a tie): bit-for-bit the same run, from the next epoch's first step."""
    path = tmp_path / "checkpoints" / checkpoint
    kill = ["+callbacks.kill._target_=helpers.SigtermAt", "+callbacks.kill.epoch_end=1"]
    _, resumed = stopped_then_resumed(tmp_path, kill, "last" if checkpoint == "interrupted.ckpt" else str(path))
    assert FirstStep.first == 12  # two epochs of 6 steps were done
    assert_same_run(resumed, tmp_path, uninterrupted)
    assert resumed["resumed_from"]["path"] == str(path.resolve()) and resumed["resumed_from"]["step"] == 12
    assert not (tmp_path / "checkpoints" / "interrupted.ckpt").exists()  # a finished run removes it
    # the first attempt's metrics are kept next to the resumed one's
    assert (tmp_path / "csv" / "version_0" / "metrics.csv").is_file()
    assert (tmp_path / "csv" / "version_1" / "metrics.csv").is_file()


@pytest.mark.parametrize("signal", ["SIGINT", "SIGTERM"])
def test_a_signal_in_the_middle_of_a_step_loses_nothing(uninterrupted, tmp_path, signal):
    """Ctrl+C and SIGTERM alike, delivered between a step's backward and its update: the step ends, then the run
    stops; `ckpt_path=last` continues at the next batch and ends with the uninterrupted run's weights."""
    kill = ["+callbacks.kill._target_=helpers.SignalAt", f"+callbacks.kill.signal={signal}", "+callbacks.kill.step=8"]
    with pytest.raises(RunStopped) as info:
        run(compose_config([*BASE, *kill], tmp_path))
    assert info.value.code == EXIT[signal]
    stopped = json.loads((tmp_path / "results.json").read_text())
    assert stopped["status"] == "failed" and stopped["error"] == str(info.value)
    assert stopped["stopped"]["step"] == 9  # the step in progress (the 9th) was completed
    assert "checkpoints/interrupted.ckpt (saved now: epoch 1, step 9); resume with: python train.py" in stopped["error"]
    with pytest.raises(Refused, match=r"method.lr: checkpoint 0.5, this command 0.1"):  # Adafactor's lr lives in
        run(compose_config([*BASE, "ckpt_path=last", "method.lr=0.1"], tmp_path))  # the optimizer state: refused
    before = files(tmp_path)
    with pytest.raises(Refused, match=rf"{tmp_path} already holds a run .*ckpt_path=last, or .*hydra.run.dir="):
        run(compose_config(BASE, tmp_path))  # a new run (no ckpt_path) in its folder
    assert files(tmp_path) == before
    FirstStep.first = None
    resumed = run(compose_config([*BASE, "ckpt_path=last", "+callbacks.first._target_=helpers.FirstStep"], tmp_path))
    assert FirstStep.first == 9  # not the start of the epoch (6): the same data order, the next batch
    assert_same_run(resumed, tmp_path, uninterrupted)
    interrupted = tmp_path / "checkpoints" / "interrupted.ckpt"
    assert resumed["resumed_from"] == {"path": str(interrupted.resolve()), "epoch": 1, "step": 9}
    earlier = resumed["attempts"]  # the stopped attempt's figures are kept
    assert [attempt["stopped"]["signal"] for attempt in earlier] == [signal] and earlier[0]["cost"]["train_time_s"] > 0
    assert not interrupted.exists()


def test_a_second_signal_stops_at_once_and_writes_nothing(tmp_path):
    kill = ["+callbacks.kill._target_=helpers.SignalAt", "+callbacks.kill.signal=SIGINT", "+callbacks.kill.step=8"]
    with pytest.raises(RunStopped) as info:
        run(compose_config([*BASE, *kill, "+callbacks.kill.times=2"], tmp_path))
    assert info.value.code == 130
    assert not (tmp_path / "checkpoints" / "interrupted.ckpt").exists()  # the step was cut: its state is not saved
    assert "at epoch 1, step 8: checkpoints/last.ckpt (the newest: epoch 0, step 6)" in str(info.value)


def test_a_signal_during_validation_lets_it_finish_and_checkpoints_the_epoch(uninterrupted, tmp_path):
    kill = ["+callbacks.kill._target_=helpers.SignalAt", "+callbacks.kill.signal=SIGINT"]
    stopped, resumed = stopped_then_resumed(tmp_path, [*kill, "+callbacks.kill.validation_epoch=1"], "last", "SIGINT")
    assert "in training at the end of epoch 1, step 12: checkpoints/interrupted.ckpt (saved now" in stopped["error"]
    rows = (tmp_path / "csv" / "version_0" / "metrics.csv").read_text().splitlines()
    header = rows[0].split(",")
    validated = {row.split(",")[header.index("epoch")] for row in rows[1:] if row.split(",")[header.index("val/score")]}
    assert validated == {"0", "1"}  # the interrupted epoch was validated
    assert FirstStep.first == 12
    assert_same_run(resumed, tmp_path, uninterrupted)


def test_a_stop_in_the_final_evaluation_resumes_to_the_evaluation_alone(uninterrupted, tmp_path):
    kill = ["+callbacks.kill._target_=helpers.SignalAt", "+callbacks.kill.test=true"]
    stopped, resumed = stopped_then_resumed(tmp_path, kill, "last")
    assert stopped["stopped"]["stage"] == "evaluation" and "final evaluation" in stopped["error"]
    assert FirstStep.first is None  # nothing trained again
    assert_same_run(resumed, tmp_path, uninterrupted)


def test_a_run_that_stopped_early_stays_stopped_when_its_evaluation_is_resumed(tmp_path):
    """Lightning does not save `should_stop`: resumed from the checkpoint of the epoch where early stopping ended
    the run, it would train another epoch (and could find another best one)."""
    early = [*BASE, "trainer.max_epochs=8", "callbacks.early_stopping.patience=1"]  # stops well before epoch 8
    full = run(compose_config(early, tmp_path / "full"))
    stopped_at = torch.load(tmp_path / "full" / "checkpoints" / "last.ckpt", weights_only=True)["global_step"]
    assert stopped_at < 8 * 6  # early stopping ended it (6 steps an epoch)
    kill = ["+callbacks.kill._target_=helpers.SignalAt", "+callbacks.kill.test=true"]
    with pytest.raises(RunStopped):
        run(compose_config([*early, *kill], tmp_path / "stopped"))
    FirstStep.first = None
    resume = [*early, "ckpt_path=last", "+callbacks.first._target_=helpers.FirstStep"]
    resumed = run(compose_config(resume, tmp_path / "stopped"))
    assert FirstStep.first is None and resumed["metrics"] == full["metrics"]
    last = torch.load(tmp_path / "stopped" / "checkpoints" / "last.ckpt", weights_only=True)
    assert last["global_step"] == stopped_at


def test_last_checkpoint_is_written_at_every_epoch_end(tmp_path):
    """Also when no epoch beats the best one (Lightning 2.6 refreshes last.ckpt only with a new best)."""
    last = tmp_path / "checkpoints" / "last.ckpt"
    recorder = ["+callbacks.steps._target_=helpers.LastCheckpointSteps", f"+callbacks.steps.path={last}"]
    run(compose_config([*BASE, "trainer.max_epochs=4", "callbacks.model_checkpoint.save_top_k=0", *recorder], tmp_path))
    assert LastCheckpointSteps.steps == [6, 12, 18]  # at the start of epochs 1, 2, 3


def test_sigkill_at_random_moments_then_resuming_ends_with_the_uninterrupted_run(uninterrupted, tmp_path):
    """`python train.py` SIGKILLed three times, at seeded moments inside a step, a validation and a checkpoint
    write, and `ckpt_path=last` each time: the last attempt ends with the uninterrupted run's weights and scores."""
    rng = random.Random(11)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT / "tests")}
    command = [sys.executable, "train.py", *BASE, f"hydra.run.dir={tmp_path}", "ckpt_path=last"]
    kinds = ["step", "validation", "checkpoint"]
    rng.shuffle(kinds)
    for epoch, kind in enumerate(kinds):  # one kill in each epoch: a kill in epoch 0 may leave no checkpoint at all
        step = 6 * epoch + rng.randint(0, 5) if kind == "step" else 6 * (epoch + 1)  # checkpoints: at epoch ends
        moment = [f"+callbacks.kill.at={kind}", f"+callbacks.kill.step={step}", f"+callbacks.kill.epoch={epoch}"]
        kill = ["+callbacks.kill._target_=helpers.SigkillAt", *moment, f"+callbacks.kill.delay={rng.uniform(0, 0.02)}"]
        done = subprocess.run([*command, *kill], cwd=ROOT, env=env, capture_output=True, text=True)
        assert done.returncode == -9, (kind, done.stderr[-2000:])
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    assert_same_run(json.loads((tmp_path / "results.json").read_text()), tmp_path, uninterrupted)


def test_a_new_run_into_a_used_folder_is_refused_before_anything_is_written(uninterrupted):
    """`python train.py` twice into one folder used to resume the first run silently, recording ckpt_path null."""
    _, folder, _ = uninterrupted
    before = files(folder)
    best = next((folder / "checkpoints").glob("best-*.ckpt"))
    ways = (
        rf"{folder} holds a completed run.* train=false ckpt_path={best}; continue it .*trainer.max_epochs=.*hydra.run"
    )
    for overrides in ([], ["trainer.max_epochs=4", "method.lr=0.1"], ["train=false", f"ckpt_path={best}"]):
        with pytest.raises(Refused, match=ways):
            run(compose_config([*BASE, *overrides], folder))
    assert files(folder) == before


def test_a_completed_run_is_not_resumed_but_can_be_continued_in_a_new_folder(uninterrupted, tmp_path):
    full, folder, _ = uninterrupted
    before = files(folder)
    with pytest.raises(Refused, match=r"holds a completed run, which is never resumed"):
        run(compose_config([*BASE, "ckpt_path=last"], folder))
    assert files(folder) == before  # its results, time, memory and routing figures stay
    last = folder / "checkpoints" / "last.ckpt"
    FirstStep.first = None
    more = [*BASE, "trainer.max_epochs=4", f"ckpt_path={last}", "+callbacks.first._target_=helpers.FirstStep"]
    continued = run(compose_config(more, tmp_path))
    assert continued["status"] == "completed" and FirstStep.first == 18
    assert continued["resumed_from"] == {"path": str(last.resolve()), "epoch": 2, "step": 18}
    assert files(folder) == before


def test_nan_loss_stops_with_a_clear_message_and_keeps_the_good_checkpoints(tmp_path):
    cfg = compose_config(
        [*BASE, "+callbacks.poison._target_=helpers.PoisonPromptAt", "+callbacks.poison.step=8"], tmp_path
    )
    with pytest.raises(FloatingPointError, match="training loss is nan at epoch 1, step 8"):
        run(cfg)
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["status"] == "failed" and "FloatingPointError" in results["error"]
    assert not (tmp_path / "checkpoints" / "interrupted.ckpt").exists()  # nothing written from the bad state
    saved = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)
    assert saved["global_step"] == 6
    assert all(torch.isfinite(value).all() for value in saved["state_dict"].values())


def test_checkpoint_holds_trainable_weights_config_and_rng_only(uninterrupted):
    _, folder, _ = uninterrupted
    path = folder / "checkpoints" / "last.ckpt"
    checkpoint = torch.load(path, weights_only=True)
    assert set(checkpoint["state_dict"]) == {"prompt.prompts", "prompt.router.linear.weight"}
    assert checkpoint["hyper_parameters"]["method"]["name"] == "smop"
    assert set(checkpoint["rng"]) >= {"python", "torch"}
    assert path.stat().st_size < 100_000  # the frozen backbone is not in it
    assert not list(folder.rglob("*.partial"))  # every checkpoint was written whole, then renamed
