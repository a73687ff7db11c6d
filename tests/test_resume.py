"""Fault tolerance: SIGTERM saves a checkpoint, ckpt_path=last resumes it exactly, a NaN loss stops cleanly."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import compose_config
from helpers import SYNTHETIC, FirstStep
from lightning.pytorch.utilities.exceptions import SIGTERMException

from smop.run import run

# 180 training examples, batch 32: 6 steps per epoch; SMoP with the perturbed router, so the noise matters too.
BASE = [*SYNTHETIC, "trainer.max_epochs=3", "~callbacks.progress_bar", "~callbacks.flop_counter", "logger=csv"]
pytestmark = pytest.mark.slow


def trained(folder: Path) -> dict[str, torch.Tensor]:
    return torch.load(folder / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> tuple[dict, Path]:
    folder = tmp_path_factory.mktemp("uninterrupted")
    return run(compose_config(BASE, folder)), folder


def interrupted_then_resumed(folder: Path, kill: list[str], resume_from: str) -> dict:
    with pytest.raises(SIGTERMException):
        run(compose_config([*BASE, "+callbacks.kill._target_=helpers.SigtermAt", *kill], folder))
    failed = json.loads((folder / "results.json").read_text())
    assert failed["status"] == "failed" and "SIGTERM" in failed["error"]
    assert (folder / "checkpoints" / "interrupted.ckpt").is_file()
    FirstStep.first = None
    resume = [*BASE, f"ckpt_path={resume_from}", "+callbacks.first._target_=helpers.FirstStep"]
    return run(compose_config(resume, folder))


def assert_same_run(resumed: dict, resumed_dir: Path, uninterrupted: tuple[dict, Path]) -> None:
    full, full_dir = uninterrupted
    assert resumed["status"] == "completed"
    assert resumed["metrics"] == full["metrics"]
    assert resumed["routing"]["counts"]["val"] == full["routing"]["counts"]["val"]
    assert resumed["routing"]["counts"]["test"] == full["routing"]["counts"]["test"]
    ours, theirs = trained(resumed_dir), trained(full_dir)
    assert ours.keys() == theirs.keys()
    for key in ours:
        torch.testing.assert_close(ours[key], theirs[key], rtol=0, atol=0, msg=key)


def test_resume_from_an_epoch_end_checkpoint_equals_the_uninterrupted_run(uninterrupted, tmp_path):
    """Killed after epoch 1; resumed from last.ckpt (saved at that epoch's end): bit-for-bit the same run."""
    last = tmp_path / "checkpoints" / "last.ckpt"
    resumed = interrupted_then_resumed(tmp_path, ["+callbacks.kill.epoch_end=1"], str(last))
    assert FirstStep.first == 12  # two epochs of 6 steps were done
    assert_same_run(resumed, tmp_path, uninterrupted)
    assert not (tmp_path / "checkpoints" / "interrupted.ckpt").exists()  # a finished run removes it
    # the first attempt's metrics are kept next to the resumed one's
    assert (tmp_path / "csv" / "version_0" / "metrics.csv").is_file()
    assert (tmp_path / "csv" / "version_1" / "metrics.csv").is_file()


def test_sigterm_mid_epoch_saves_a_checkpoint_and_last_continues_at_its_step(uninterrupted, tmp_path):
    resumed = interrupted_then_resumed(tmp_path, ["+callbacks.kill.step=8"], "last")
    assert FirstStep.first == 8  # not the start of the epoch (6): the same data order, the next batch
    assert_same_run(resumed, tmp_path, uninterrupted)


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
    _, folder = uninterrupted
    path = folder / "checkpoints" / "last.ckpt"
    checkpoint = torch.load(path, weights_only=True)
    assert set(checkpoint["state_dict"]) == {"prompt.prompts", "prompt.router.linear.weight"}
    assert checkpoint["hyper_parameters"]["method"]["name"] == "smop"
    assert set(checkpoint["rng"]) >= {"python", "torch"}
    assert path.stat().st_size < 100_000  # the frozen backbone is not in it
