"""Every task in the config tree, end to end on its bundled sample, on both backbone kinds: one fast_dev_run each
(train a batch, validate, test) that must report exactly the task's official metrics; and its hub layout read from a
folder. A task added to smop/configs/dataset/ is covered here without a new test."""

from __future__ import annotations

import math
import shutil

import pytest
from conftest import CONFIGS
from helpers import task_datamodule
from omegaconf import OmegaConf

from smop.data.sources import sample_dir
from smop.run import run

TASKS = sorted(path.stem for path in (CONFIGS / "dataset").glob("*.yaml") if path.stem != "synthetic_mixture")
QUICK = ["method=prompt_tuning", "method.prompt_length=4", "trainer.fast_dev_run=true", "callbacks=none"]


@pytest.mark.slow
@pytest.mark.parametrize("model", ["t5-tiny", "llama-tiny"])
@pytest.mark.parametrize("task", TASKS)
def test_every_task_runs_end_to_end_on_its_sample(make_cfg, task, model):
    """Without the default callbacks (cost measurement, checkpoints): they do not depend on the task. Long inputs are
    cut to 128 tokens and free-text targets to 8, which the tiny models generate in full."""
    config = OmegaConf.load(CONFIGS / "dataset" / f"{task}.yaml")
    shorter = ["dataset.max_target_length=8"] if config.get("target") in ("text", "code") else []
    results = run(make_cfg(f"dataset={task}", f"model={model}", "dataset.max_length=128", *shorter, *QUICK))
    assert results["status"] == "completed" and results["split"]["protocol"] == config.split_protocol
    expected = {*config.metrics, "score"}
    tested = ["test", "test_alt"] if (config.get("splits") or {}).get("validation_alt") else ["test"]
    assert [set(results["metrics"][split]) for split in tested] == [expected] * len(tested)
    validated = ["val"] if results["metrics"]["val"] is not None else []  # code tasks: no validation (LoPA)
    assert validated or config.split_protocol == "lopa"
    values = [value for split in (*validated, *tested) for value in results["metrics"][split].values()]
    assert all(math.isfinite(value) for value in values)
    if config.get("target") in ("text", "code"):  # EM, F1, ROUGE and pass@k are fractions
        assert all(0.0 <= value <= 1.0 for value in values)


@pytest.mark.parametrize("task", TASKS)
def test_every_task_reads_its_hub_layout_from_a_folder(task, tmp_path):
    """dataset.source=dir on a copy of the bundled sample (written in the hub's layout, one file per split) gives the
    sample's splits, row for row."""
    sample = task_datamodule(task)
    shutil.copytree(sample_dir(sample.sample_folder or task), tmp_path / task)
    folder = task_datamodule(task, source="dir", data_dir=str(tmp_path / task))
    sample.setup(), folder.setup()
    assert folder.split_info == sample.split_info and folder.split_info["records"]["test"] > 0
    assert [row["input_ids"] for row in folder.splits["test"]] == [row["input_ids"] for row in sample.splits["test"]]
