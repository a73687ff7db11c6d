"""End to end: the embedded default as a user runs it, evaluation-only mode, seeding."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import compose_config
from helpers import SYNTHETIC

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
