"""DePT's and FPT's training protocols: k-shot training sets, step-based evaluation with the best checkpoint, and the
dept_glue / dept_superglue / fpt_* experiments (per-task step budgets) composed as train.py would."""

from __future__ import annotations

import logging
from collections import Counter

import pytest
from conftest import CONFIGS
from omegaconf import OmegaConf
from transformers import ByT5Tokenizer

from smop.checks import check_config
from smop.data import TaskDataModule

TOKENIZER = ByT5Tokenizer()


def datamodule(task: str, **overrides) -> TaskDataModule:
    options = OmegaConf.to_container(OmegaConf.load(CONFIGS / "dataset" / f"{task}.yaml"))
    options = {k: v for k, v in options.items() if k not in ("_target_", "epochs")}
    options.update({"split_seed": 0, "split_protocol": "dept", **overrides})
    dm = TaskDataModule(tokenizer=TOKENIZER, **options)
    dm.setup()
    return dm


def classes(dm: TaskDataModule) -> Counter:
    return Counter(row["label_index"] for row in dm.splits["train"])


# --- k-shot ------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("task", "count"), [("cola", 2), ("mnli", 3)])
def test_k_shot_keeps_k_training_rows_per_class_and_leaves_validation_and_test_whole(task, count):
    full, few = datamodule(task), datamodule(task, k_shot=4, seed=3)
    assert classes(few) == dict.fromkeys(range(count), 4)
    assert few.split_info["k_shot"] == 4 and full.split_info["k_shot"] is None
    assert few.split_info["records"]["train"] == 4 * count
    for split in ("val", "test"):
        assert few.split_info["hash"][split] == full.split_info["hash"][split]


def test_k_shot_rows_follow_the_training_seed():
    first, again, other = (datamodule("cola", k_shot=3, seed=s) for s in (7, 7, 8))
    assert first.split_info["hash"]["train"] == again.split_info["hash"]["train"]
    assert first.split_info["hash"]["train"] != other.split_info["hash"]["train"]


def test_a_class_with_fewer_than_k_rows_keeps_them_all_with_a_warning(caplog):
    full = classes(datamodule("mrpc"))
    with caplog.at_level(logging.WARNING, logger="smop.data.splits"):
        few = classes(datamodule("mrpc", k_shot=1000))
    assert few == full
    assert "dataset.k_shot=1000: mrpc has only" in caplog.text


@pytest.mark.parametrize(
    ("task", "k", "message"),
    [
        ("stsb", 4, r"dataset.k_shot=4: stsb has a number target"),
        ("multirc", 4, r"dataset.k_shot=4: multirc is MultiRC-format"),
        ("cola", 0, r"dataset.k_shot=0 must be null \(all training rows\) or an integer >= 1"),
    ],
)
def test_k_shot_is_refused_without_classes_or_below_one(task, k, message):
    with pytest.raises(ValueError, match=message):
        datamodule(task, k_shot=k)


def test_k_shot_is_refused_before_anything_is_built(make_cfg):
    with pytest.raises(ValueError, match=r"dataset.k_shot=8: stsb has a number target"):
        check_config(make_cfg("dataset=stsb", "dataset.k_shot=8"))
    with pytest.raises(ValueError, match=r"dataset.k_shot=0 is out of range: must be null or an integer >= 1"):
        check_config(make_cfg("dataset=cola", "dataset.k_shot=0"))
