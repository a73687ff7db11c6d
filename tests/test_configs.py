"""Every config composes; every method and router runs; bad input fails early with a clear message."""

from __future__ import annotations

import importlib.util
import json
import re
from pathlib import Path

import pytest
import torch
from conftest import ROOT
from helpers import SYNTHETIC
from hydra.errors import MissingConfigException
from omegaconf import OmegaConf

from smop.checks import check_config, options
from smop.run import run

GROUPS = ["model", "dataset", "method", "router", "optimizer", "trainer", "logger", "callbacks", "experiment"]
FAST = ["trainer.fast_dev_run=true", *SYNTHETIC]


def resolved(cfg) -> dict:
    return OmegaConf.to_container(OmegaConf.create({k: v for k, v in cfg.items() if k != "hydra"}), resolve=True)


@pytest.mark.parametrize(("group", "option"), [(g, o) for g in GROUPS for o in options(g)])
def test_every_config_composes_and_resolves(make_cfg, group, option):
    extra = ["method=smop"] if group == "router" else []
    cfg = make_cfg(f"{group}={option}", *extra)
    values = resolved(cfg)
    assert values["method"]["name"]
    check_config(cfg, option if group == "router" else None)


def test_default_is_smop_4x5_top1_perturbed_on_rte_with_tiny_t5(make_cfg):
    cfg = make_cfg()
    assert (cfg.method.name, cfg.method.num_prompts, cfg.method.prompt_length) == ("smop", 4, 5)
    assert cfg.router.perturb and cfg.router.topk == 1
    assert (cfg.dataset.name, cfg.dataset.source, cfg.model.name_or_path) == ("rte", "sample", "tiny")


@pytest.mark.parametrize("method", options("method"))
def test_fast_dev_run_every_method(make_cfg, method):
    results = run(
        make_cfg(f"method={method}", "method.prompt_length=5", *FAST)
        if method != "full"
        else make_cfg("method=full", *FAST)
    )
    assert results["status"] == "completed"
    assert results["router"] == ("top1_perturbed" if method.endswith("smop") else None)


@pytest.mark.parametrize("router", options("router"))
def test_fast_dev_run_every_router(make_cfg, router, tmp_path):
    results = run(make_cfg(f"router={router}", *FAST))
    assert results["status"] == "completed" and results["router"] == router
    assert set(results["routing"]["counts"]) == {"train", "val", "test"}
    assert json.loads((tmp_path / "results.json").read_text())["router"] == router


def test_tensorboard_and_csv_loggers_write_their_files(make_cfg, tmp_path):
    run(make_cfg("logger=[csv,tensorboard]", "trainer.max_epochs=1", "trainer.limit_train_batches=2", *SYNTHETIC))
    assert (tmp_path / "csv" / "version_0" / "metrics.csv").is_file()
    assert list((tmp_path / "tensorboard").rglob("events.out.tfevents.*"))


# --- clear errors, before any model is built ------------------------------------------------------


def test_unknown_option_lists_the_allowed_ones(make_cfg):
    with pytest.raises(MissingConfigException) as info:
        make_cfg("method=smopp")
    assert "smop" in str(info.value) and "prompt_tuning" in str(info.value)


def test_topk_greater_than_number_of_prompts(make_cfg):
    with pytest.raises(ValueError, match=r"router.topk=5 .* method.num_prompts=4"):
        run(make_cfg("router.topk=5", *FAST))


def test_router_on_a_method_that_does_not_route(make_cfg):
    with pytest.raises(ValueError, match="method=prompt_tuning does not route"):
        run(make_cfg("method=prompt_tuning", "router=top2", *FAST))


def test_single_router_with_several_prompts(make_cfg):
    with pytest.raises(ValueError, match="uses 1 prompt"):
        run(make_cfg("router=single", "method.num_prompts=4", *FAST))


def test_missing_data_folder(make_cfg, tmp_path):
    with pytest.raises(FileNotFoundError, match="does-not-exist"):
        run(make_cfg("dataset.source=dir", f"dataset.data_dir={tmp_path / 'does-not-exist'}"))


def test_malformed_jsonl_names_file_and_line(make_cfg, tmp_path):
    folder = tmp_path / "RTE"
    folder.mkdir()
    good = {"premise": "A cat sat.", "hypothesis": "A cat.", "label": "entailment", "idx": 0}
    (folder / "train.jsonl").write_text(json.dumps(good) + "\n" + '{"premise": "x", "label": "entailment"\n')
    (folder / "val.jsonl").write_text(json.dumps(good) + "\n")
    with pytest.raises(ValueError, match=r"train.jsonl:2"):
        run(make_cfg("dataset.source=dir", f"dataset.data_dir={folder}"))
    failed = json.loads((tmp_path / "results.json").read_text())  # the run is on record, marked failed
    assert failed["status"] == "failed" and "train.jsonl:2" in failed["error"]


def test_unreachable_hub_says_how_to_use_local_files(make_cfg, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(RuntimeError, match=r"dataset.source=dir dataset.data_dir=") as info:
        run(make_cfg("model=t5-base", *FAST))
    assert "model.name_or_path=/path/to" in str(info.value)


def test_unreachable_dataset_hub_says_how_to_use_local_files(make_cfg):
    with pytest.raises(ConnectionError, match=r"dataset=rte dataset.source=dir dataset.data_dir="):
        run(make_cfg("dataset.source=hub", "trainer.fast_dev_run=true"))


def test_eval_only_needs_an_existing_checkpoint(make_cfg, tmp_path):
    with pytest.raises(ValueError, match="ckpt_path"):
        run(make_cfg("train=false", *FAST))
    with pytest.raises(FileNotFoundError, match="nope.ckpt"):
        run(make_cfg("train=false", f"ckpt_path={Path(tmp_path) / 'nope.ckpt'}", *FAST))


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message of a machine without CUDA")
@pytest.mark.parametrize("trainer", ["gpu", "ddp", "fsdp"])
def test_a_gpu_trainer_without_cuda_says_what_to_use_instead(make_cfg, trainer, tmp_path):
    message = "trainer.accelerator=gpu, but torch .* sees no CUDA device here: use trainer="
    with pytest.raises(ValueError, match=message):
        run(make_cfg(f"trainer={trainer}", *FAST))
    assert json.loads((tmp_path / "results.json").read_text())["status"] == "failed"  # the failure is recorded


@pytest.mark.skipif(importlib.util.find_spec("deepspeed") is not None, reason="deepspeed is installed")
def test_deepspeed_without_its_package_names_the_install(make_cfg):
    with pytest.raises(ValueError, match="trainer.strategy=deepspeed_stage_2 needs the deepspeed package: pip install"):
        run(make_cfg("trainer=deepspeed", *FAST))


# --- what the docs say about folders and viewers matches what runs write ---------------------------------


def test_run_folder_layout_is_the_one_the_hydra_config_describes(make_cfg):
    cfg = make_cfg("method=prompt_tuning", "dataset=cb")
    comment = (ROOT / "smop" / "configs" / "hydra" / "default.yaml").read_text()
    assert "outputs/runs/<method>_<dataset>/<date>_<time>/" in comment
    assert re.fullmatch(r"outputs/runs/prompt_tuning_cb/\d{4}-\d\d-\d\d_\d\d-\d\d-\d\d", cfg.hydra.run.dir)
    assert "outputs/multiruns/<date>_<time>/<job number>_<method>_<dataset>/" in comment
    assert re.fullmatch(r"outputs/multiruns/\d{4}-\d\d-\d\d_\d\d-\d\d-\d\d", cfg.hydra.sweep.dir)
    assert cfg.hydra.sweep.subdir == "0_prompt_tuning_cb"


def test_tensorboard_docs_name_the_viewer():
    viewer = "pip install tensorboard && tensorboard --logdir outputs"
    assert viewer in (ROOT / "smop" / "configs" / "logger" / "tensorboard.yaml").read_text()
    assert viewer in (ROOT / "README.md").read_text()


def test_demo_results_are_tabulated_in_one_place():
    """docs/sweeps.md points at the README's demo table instead of keeping an older copy of its numbers."""
    rows = [line for line in (ROOT / "docs" / "sweeps.md").read_text().splitlines() if line.startswith("| prompt_")]
    assert rows == []
    assert "| prompt_tuning L=5 |" in (ROOT / "README.md").read_text()
