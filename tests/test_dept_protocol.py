"""DePT's and FPT's training protocols: k-shot training sets, step-based evaluation with the best checkpoint, and the
dept_glue / dept_superglue / fpt_* experiments (per-task step budgets) composed as train.py would."""

from __future__ import annotations

import csv
import json
import logging
from collections import Counter

import pytest
from conftest import CONFIGS
from helpers import task_datamodule
from omegaconf import OmegaConf
from transformers import ByT5Tokenizer

from smop.builders import build_datamodule
from smop.checks import check_config
from smop.data import TaskDataModule
from smop.run import run

TOKENIZER = ByT5Tokenizer()


def datamodule(task: str, **overrides) -> TaskDataModule:
    dm = task_datamodule(task, TOKENIZER, **{"split_protocol": "dept", **overrides})
    dm.setup()
    return dm


def classes(dm: TaskDataModule) -> Counter:
    return Counter(row["label_index"] for row in dm.splits["train"])


# --- training caps ------------------------------------------------------------------------------------------------
def test_max_train_records_keeps_the_same_rows_whatever_the_seed():
    """Yelp-2's cap (DePT: 100,000 rows) drawn with seed 42: runs of a grid with other seeds train on the same rows."""
    assert OmegaConf.load(CONFIGS / "dataset" / "yelp_polarity.yaml").max_train_records == 100_000
    full = datamodule("yelp_polarity", split_protocol="smop")
    capped = [datamodule("yelp_polarity", split_protocol="smop", max_train_records=10, seed=s) for s in (1, 2)]
    assert [len(dm.splits["train"]) for dm in capped] == [10, 10] < [len(full.splits["train"])] * 2
    assert capped[0].split_info["hash"]["train"] == capped[1].split_info["hash"]["train"]
    assert capped[0].split_info["max_train_records"] == 10 and full.split_info["max_train_records"] == 100_000
    assert capped[0].split_info["hash"]["test"] == full.split_info["hash"]["test"]
    with pytest.raises(ValueError, match=r"dataset.max_train_records=0 must be null \(every row\) or an integer"):
        datamodule("yelp_polarity", max_train_records=0)


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


# --- step-based training -----------------------------------------------------------------------------------------
STEPS = ["trainer=steps", "trainer.max_steps=6", "trainer.val_check_interval=2", "trainer.log_every_n_steps=1"]


def test_step_based_training_validates_every_n_steps_across_epochs_and_tests_the_best_step(make_cfg, tmp_path):
    """54 training rows in batches of 24: 3 steps an epoch, so evaluations at steps 2, 4 and 6 fall in both epochs,
    mid-epoch too (per-epoch counting would give 2 and 5); the tested checkpoint is the best of them. The CSV logs
    the 0-based index of the step, hence + 1."""
    task = ["dataset=synthetic_mixture", "dataset.synthetic.num_train=60", "dataset.synthetic.num_test=8"]
    task += ["dataset.batch_size=24", "method=prompt_tuning", "method.prompt_length=4"]
    results = run(make_cfg(*task, *STEPS, "~callbacks.flop_counter", "callbacks.early_stopping=null"))
    rows = list(csv.DictReader((tmp_path / "csv" / "version_0" / "metrics.csv").open()))
    evaluations = [(int(r["step"]) + 1, int(r["epoch"]), float(r["val/score"])) for r in rows if r.get("val/score")][:3]
    assert [(step, epoch) for step, epoch, _ in evaluations] == [(2, 0), (4, 1), (6, 1)]
    best = max(evaluations, key=lambda item: item[2])  # the first of equal scores, as the checkpoint keeps
    metrics = results["metrics"]
    assert (metrics["best_step"], metrics["best_epoch"]) == best[:2]
    assert metrics["val"]["score"] == pytest.approx(best[2])
    saved = sorted(path.name for path in (tmp_path / "checkpoints").glob("best-*.ckpt"))
    assert saved == [f"best-epoch{best[1]:03d}-step{best[0]:06d}.ckpt"]
    assert json.loads((tmp_path / "results.json").read_text())["metrics"]["best_step"] == best[0]


# --- experiments -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("experiment", "task", "steps", "max_length"),
    [
        ("dept_glue", "mrpc", 10_000, 316),
        ("dept_glue", "mnli", 250_000, 316),
        ("dept_glue", "cola", 40_000, 316),
        ("dept_superglue", "wic", 20_000, 316),
        ("dept_superglue", "multirc", 30_000, 408),
    ],
)
def test_dept_experiments_take_each_tasks_released_steps(make_cfg, experiment, task, steps, max_length):
    cfg = make_cfg(f"experiment={experiment}", f"dataset={task}")
    check_config(cfg)
    assert (cfg.trainer.max_steps, cfg.trainer.val_check_interval, cfg.trainer.check_val_every_n_epoch) == (
        steps,
        1000,
        None,
    )
    assert (cfg.dataset.max_length, cfg.dataset.split_protocol, cfg.trainer.max_epochs) == (max_length, "dept", -1)
    assert (cfg.method.prompt_length, cfg.method.rank, cfg.warmup_steps, cfg.model.name_or_path) == (
        60,
        30,
        500,
        "google-t5/t5-base",
    )
    assert cfg.callbacks.early_stopping is None


@pytest.mark.parametrize(
    ("task", "smop", "dept"),
    [
        ("cb", "cb hyopthesis: {hypothesis}. premise: {premise}", "premise: {premise} hypothesis: {hypothesis}"),
        ("boolq", "boolq passage: {passage} question: {question}", "question: {question} passage: {passage}"),
        ("wic", "wic sentence1: {sentence1} sentence2: {sentence2} word: {word}", None),
        ("multirc", "question: {question} answer: {answer}. paragraph: {paragraph}", None),
        ("wsc", None, "text: {text}"),
    ],
)
def test_superglue_tasks_take_depts_templates_and_label_ids_under_dept_superglue(make_cfg, task, smop, dept):
    """SMoP's released strings stay the SuperGLUE default; experiment=dept_superglue switches every task of its grid
    to DePT's (fields joined by spaces, the label id as the target)."""
    default = make_cfg(f"dataset={task}")
    depts = make_cfg("experiment=dept_superglue", f"dataset={task}", "dataset.source=sample")
    check_config(depts)
    assert depts.dataset.label_words[0] == "0" and (depts.dataset.template == dept or dept is None)
    if smop is not None:
        assert default.dataset.template == smop and default.dataset.label_words[0] != "0"
    for cfg in (default, depts):
        dm = build_datamodule(cfg, TOKENIZER, kind="seq2seq")
        words = set(cfg.dataset.label_words)
        assert {TOKENIZER.decode(row["labels"], skip_special_tokens=True) for row in dm.splits["test"]} == words


def test_a_task_without_released_dept_steps_is_refused_by_name(make_cfg):
    with pytest.raises(ValueError, match=r"trainer.max_steps=null: dataset copa has no released DePT step count"):
        check_config(make_cfg("experiment=dept_superglue", "dataset=copa"))
    check_config(make_cfg("experiment=dept_superglue", "dataset=copa", "trainer.max_steps=5000"))


@pytest.mark.parametrize("task", ["mnli", "qqp"])
def test_fpt_experiments_run_fpts_protocol_on_their_task(make_cfg, task):
    cfg = make_cfg(f"experiment=fpt_{task}")
    check_config(cfg)
    assert (cfg.dataset.name, cfg.model.name_or_path, cfg.method.name, cfg.method.prompt_length) == (
        task,
        "google/t5-large-lm-adapt",
        "fpt",
        20,
    )
    assert (cfg.trainer.max_steps, cfg.trainer.val_check_interval, cfg.callbacks.fpt.stage_steps) == (30_000, 500, 6000)
    assert (cfg.optimizer.lr, cfg.optimizer.weight_decay, cfg.method.lr_schedule, cfg.seed) == (
        0.3,
        1e-5,
        "constant",
        2022,
    )
