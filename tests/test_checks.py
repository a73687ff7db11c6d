"""Numeric options out of range stop a run before anything is built, naming the key, the value and the range."""

from __future__ import annotations

import inspect
import json
import os
import subprocess
import sys

import lightning as L
import pytest
from conftest import ROOT, compose_config
from lightning.pytorch.callbacks import EarlyStopping, ModelCheckpoint
from omegaconf import DictConfig, OmegaConf

from smop.checks import check_checkpoint, check_config, options
from smop.validation import RANGES, range_problems

GROUPS = ["model", "dataset", "method", "router", "optimizer", "trainer", "logger", "callbacks", "experiment"]
NO_RANGE = {"trainer.devices"}  # an int, a list or "auto": Lightning checks it against the machine


def composed_group_options() -> list[list[str]]:
    return [[f"{g}={o}", *(["method=smop"] if g == "router" else [])] for g in GROUPS for o in options(g)]


# (overrides, the message's start, the allowed range it states)
BAD = [
    (["method.prompt_length=-3"], "method.prompt_length=-3 is out of range", "an integer >= 1"),
    (["method.prompt_length=0"], "method.prompt_length=0 is out of range", "an integer >= 1"),
    (["method.prompt_length=true"], "method.prompt_length=true is not valid", "an integer >= 1"),
    (["method.prompt_length=2.5"], "method.prompt_length=2.5 is not valid", "an integer >= 1"),
    (["method.num_prompts=0"], "method.num_prompts=0 is out of range", "an integer >= 1"),
    (["router.topk=0"], "router.topk=0 is out of range", "an integer in [1, method.num_prompts=4]"),
    (["router.topk=5"], "router.topk=5 is out of range", "an integer in [1, method.num_prompts=4]"),
    (["router=gumbel", "router.tau=0"], "router.tau=0 is out of range", "a number > 0"),
    (["router.load_balance_weight=-0.1"], "router.load_balance_weight=-0.1 is out of range", "a number >= 0"),
    (["router=stochastic", "router.consistency_weight=-1"], "router.consistency_weight=-1", "a number >= 0"),
    (["router=single", "router.num_prompts=0"], "router.num_prompts=0 is out of range", "an integer >= 1"),
    (["dataset.batch_size=0"], "dataset.batch_size=0 is out of range", "an integer >= 1"),
    (["dataset.eval_batch_size=-1"], "dataset.eval_batch_size=-1 is out of range", "an integer >= 1"),
    (["dataset.max_length=1"], "dataset.max_length=1 is out of range", "an integer >= 2"),
    (["dataset.val_fraction=1.0"], "dataset.val_fraction=1.0 is out of range", "a number in (0, 1)"),
    (["dataset.val_fraction=0"], "dataset.val_fraction=0 is out of range", "a number in (0, 1)"),
    (["dataset.epochs=0"], "dataset.epochs=0 is out of range", "an integer >= 1"),
    (["method.lr=0"], "method.lr=0 is out of range", "a number > 0"),
    (["method.lr=abc"], "method.lr=abc is not valid", "a number > 0"),
    (["method.lr=nan"], "method.lr=nan is not valid", "a number > 0"),
    (["warmup_ratio=1.5"], "warmup_ratio=1.5 is out of range", "a number in [0, 1]"),
    (["warmup_steps=-1"], "warmup_steps=-1 is out of range", "null or an integer >= 0"),
    (["seed=-1"], "seed=-1 is out of range", "an integer in [0, 4294967295]"),
    (["method=lopa", "method.rank=0"], "method.rank=0 is out of range", "an integer >= 1"),
    (["method=dept", "method.rank=0"], "method.rank=0 is out of range", "null or an integer >= 1"),
    (["method=lora_smop", "method.lora.r=0"], "method.lora.r=0 is out of range", "an integer >= 1"),
    (["method=idpg", "method.dropout=1.0"], "method.dropout=1.0 is out of range", "a number in [0, 1)"),
    (["method=full", "method.prompt_length=-1"], "method.prompt_length=-1 is out of range", "an integer >= 0"),
    (["trainer.max_epochs=-2"], "trainer.max_epochs=-2 is out of range", "null or an integer >= -1"),
    (["trainer.limit_train_batches=1.5"], "trainer.limit_train_batches=1.5", "an integer >= 0 or a number in [0, 1]"),
    (["trainer.accumulate_grad_batches=0"], "trainer.accumulate_grad_batches=0", "an integer >= 1"),
    (["callbacks.early_stopping.patience=-1"], "callbacks.early_stopping.patience=-1", "an integer >= 0"),
    (["callbacks=fpt", "callbacks.fpt.fractions=[0.5,1.5]"], "callbacks.fpt.fractions=[0.5, 1.5]", "in (0, 1]"),
    (["callbacks=fpt", "callbacks.fpt.fractions=[0,0.5]"], "callbacks.fpt.fractions=[0, 0.5]", "in (0, 1]"),
    (["callbacks=fpt", "callbacks.fpt.stage_steps=0"], "callbacks.fpt.stage_steps=0", "an integer >= 1"),
    (
        ["dataset=synthetic_mixture", "dataset.synthetic.max_length=4"],
        "dataset.synthetic.max_length=4",
        ">= dataset.synthetic.min_length=8",
    ),
    (["model.tiny.pad_token_id=384"], "model.tiny.pad_token_id=384", "an integer in [0, model.tiny.vocab_size=384)"),
]


@pytest.mark.parametrize(("overrides", "start", "allowed"), BAD, ids=[" ".join(o) for o, _, _ in BAD])
def test_a_value_out_of_range_names_key_value_and_range(make_cfg, overrides, start, allowed):
    cfg = make_cfg(*overrides)
    with pytest.raises(ValueError) as info:
        check_config(cfg, cfg.hydra.runtime.choices.get("router"))
    message = str(info.value)
    assert message.startswith(start), message
    assert allowed in message.partition(": must be ")[2], message


def test_all_bad_values_are_named_at_once_and_a_bad_bound_is_not_blamed_twice(make_cfg):
    problems = range_problems(make_cfg("method.num_prompts=0", "dataset.batch_size=0"))
    assert [p.split(" ")[0] for p in problems] == ["dataset.batch_size=0", "method.num_prompts=0"]  # no router.topk


def test_an_interpolated_value_is_checked_where_it_comes_from(make_cfg):
    problems = range_problems(make_cfg("method.lr=-1"))  # optimizer.lr: ${method.lr}
    assert problems == ["method.lr=-1 is out of range: must be a number > 0"]


@pytest.fixture(scope="module")
def tree(tmp_path_factory) -> dict[str, DictConfig]:
    """Every config of every group, composed once: {overrides: config}."""
    folder = tmp_path_factory.mktemp("tree")
    return {" ".join(o): compose_config(o, folder) for o in composed_group_options()}


def test_every_config_of_every_group_is_in_range(tree):
    assert {name: range_problems(cfg) for name, cfg in tree.items() if range_problems(cfg)} == {}


def numeric_leaves(node: object, prefix: str = "") -> list[str]:
    if isinstance(node, dict):
        return [key for k, v in node.items() for key in numeric_leaves(v, f"{prefix}{k}.")]
    if isinstance(node, list):
        return [prefix[:-1]] if any(isinstance(v, int | float) and not isinstance(v, bool) for v in node) else []
    return [prefix[:-1]] if isinstance(node, int | float) and not isinstance(node, bool) else []


def test_every_numeric_option_of_the_config_tree_has_a_range(tree):
    """A numeric option added to a config file without a rule in smop/validation.py fails this test."""
    covered = {key for key, _ in RANGES}
    uncovered: dict[str, str] = {}
    for name, cfg in tree.items():
        values = OmegaConf.to_container(cfg, resolve=False)  # interpolated values are checked at their source
        values.pop("hydra")
        for key in numeric_leaves(values):
            if key not in covered and key not in NO_RANGE:
                uncovered.setdefault(key, name)
    assert uncovered == {}


def test_every_key_of_the_table_is_an_option_somewhere(tree):
    """No rule for a key that nothing reads (a typo would make a rule that never fires). Keys that only the command
    line adds must be Lightning's own arguments; the `method.module.*` copies of `method.*` rules are generated."""
    present = set()
    for cfg in tree.values():
        present |= {key for key, _ in RANGES if OmegaConf.select(cfg, key, default="<absent>") != "<absent>"}
    lightning_args = {
        "trainer": set(inspect.signature(L.Trainer.__init__).parameters),
        "callbacks.early_stopping": set(inspect.signature(EarlyStopping.__init__).parameters),
        "callbacks.model_checkpoint": set(inspect.signature(ModelCheckpoint.__init__).parameters),
    }
    unread = set()
    for key, _ in RANGES:
        group, _, name = key.rpartition(".")
        if key not in present and not key.startswith("method.module.") and name not in lightning_args.get(group, ()):
            unread.add(key)
    assert unread == set()


def test_train_py_stops_on_an_empty_prompt_before_building_anything(tmp_path):
    """`python train.py method.prompt_length=0` used to train SMoP with empty prompts and report `completed`."""
    command = [sys.executable, "train.py", "method.prompt_length=0", f"hydra.run.dir={tmp_path}"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode != 0
    expected = "method.prompt_length=0 is out of range: must be an integer >= 1"
    assert expected in done.stdout + done.stderr
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["status"] == "failed" and expected in results["error"]
    assert results["params"] is None  # no model was built
    assert not (tmp_path / "checkpoints").exists()


def test_rules_refuse_booleans_for_numbers(make_cfg):
    assert range_problems(make_cfg("dataset.batch_size=true")) == [
        "dataset.batch_size=true is not valid: must be an integer >= 1"
    ]
    assert range_problems(make_cfg("method.lr=false")) == ["method.lr=false is not valid: must be a number > 0"]
    assert range_problems(make_cfg("trainer.fast_dev_run=true")) == []  # a flag where Lightning takes one


def test_absent_keys_are_skipped(make_cfg):
    cfg = make_cfg("method=prompt_tuning")
    assert "num_prompts" not in cfg.method and cfg.get("router") is None
    assert range_problems(cfg) == []


def test_options_a_method_does_not_read_are_not_checked(make_cfg):
    """experiment=idpg_t5base sets IDPG's method.hidden_size=null; SMoP, chosen over it, ignores that key."""
    cfg = make_cfg("experiment=idpg_t5base", "method=smop")
    assert cfg.method.hidden_size is None
    assert range_problems(cfg) == []
    assert range_problems(make_cfg("method=p_tuning", "method.hidden_size=null")) == [
        "method.hidden_size=null is not valid: must be an integer >= 1"
    ]


def test_a_checkpoint_of_an_earlier_layout_names_the_classes_where_they_are_now(tmp_path):
    """Checkpoints written before the methods moved to smop.methods still build: their targets are renamed on read."""
    import torch
    from hydra.utils import get_class

    path = tmp_path / "old.ckpt"
    saved = {
        "method": {"module": {"_target_": "smop.prompts.SparseMixtureOfPrompts"}},
        "router": {"_target_": "smop.routers.LinearRouter"},
        "callbacks": {"fpt": {"_target_": "smop.fpt.ProgressiveTraining"}, "other": {"_target_": "x.Y"}},
    }
    torch.save({"state_dict": {}, "hyper_parameters": saved}, path)
    config = check_checkpoint(path)["hyper_parameters"]
    targets = [config["method"]["module"]["_target_"], config["router"]["_target_"]]
    assert targets == ["smop.methods.SparseMixtureOfPrompts", "smop.methods.routers.LinearRouter"]
    assert config["callbacks"]["fpt"]["_target_"] == "smop.methods.fpt.ProgressiveTraining"
    assert config["callbacks"]["other"]["_target_"] == "x.Y"
    assert all(get_class(target) for target in targets)
