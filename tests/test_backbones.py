"""Backbones from folders: an encoder-decoder or a decoder-only checkpoint loads with its own weights; anything else
is refused by name, and never becomes a randomly initialised model."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import BertConfig, BertModel, LlamaConfig, LlamaForCausalLM, T5Config, T5ForConditionalGeneration

from smop.backbones import BackboneKindError, backbone_kind, build_backbone

ROOT = Path(__file__).resolve().parents[1]
SMALL = {"vocab_size": 384, "d_model": 32, "d_ff": 64, "d_kv": 16, "num_heads": 2, "num_layers": 1}


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("backbones")
    torch.manual_seed(0)
    T5ForConditionalGeneration(T5Config(**SMALL, decoder_start_token_id=0)).save_pretrained(root / "t5")
    llama = LlamaConfig(
        vocab_size=384,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=2,
    )
    LlamaForCausalLM(llama).save_pretrained(root / "llama")
    bert = BertConfig(vocab_size=384, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2)
    BertModel(bert).save_pretrained(root / "mixed")
    shutil.copy(root / "t5" / "config.json", root / "mixed" / "config.json")  # a T5 config over BERT weights
    BertModel(bert).save_pretrained(root / "bert")  # an encoder-only model: neither kind
    return {"t5": root / "t5", "llama": root / "llama", "mixed": root / "mixed", "bert": root / "bert"}


def test_a_t5_folder_loads_its_own_weights(folders):
    saved = T5ForConditionalGeneration.from_pretrained(folders["t5"]).state_dict()
    model = build_backbone(str(folders["t5"]))
    assert isinstance(model, T5ForConditionalGeneration)
    for key, value in model.state_dict().items():
        assert torch.equal(value, saved[key]), key


def test_a_decoder_only_folder_loads_as_a_causal_lm_with_its_own_weights(folders):
    saved = LlamaForCausalLM.from_pretrained(folders["llama"]).state_dict()
    assert (backbone_kind(str(folders["t5"])), backbone_kind(str(folders["llama"]))) == ("seq2seq", "causal")
    model = build_backbone(str(folders["llama"]))
    assert isinstance(model, LlamaForCausalLM)
    for key, value in model.state_dict().items():
        assert torch.equal(value, saved[key]), key


def test_an_encoder_only_folder_is_refused_by_name(folders):
    with pytest.raises(BackboneKindError, match=r"bert.*holds a bert checkpoint \(BertModel\): neither"):
        build_backbone(str(folders["bert"]))


def test_weights_of_another_architecture_are_refused_not_initialised(folders):
    with pytest.raises(BackboneKindError, match=r"do not fit its t5 config: \d+ weight\(s\) missing"):
        build_backbone(str(folders["mixed"]))


@pytest.mark.slow
def test_train_py_refuses_an_encoder_only_folder_in_one_line_before_reading_data(folders, tmp_path):
    done = subprocess.run(
        [sys.executable, "train.py", f"model.name_or_path={folders['bert']}", f"hydra.run.dir={tmp_path}"],
        cwd=ROOT,
        env={**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "WANDB_MODE": "offline"},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 1
    (line,) = [line for line in done.stderr.splitlines() if not line.startswith("INFO: ")]
    assert line.startswith(f"train.py: model.name_or_path={folders['bert']} holds a bert checkpoint")
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["status"] == "failed" and results["params"] is None and "neither" in results["error"]


# --- the hub configs, on a local folder of their own architecture ---------------------------------------------------
HUB = {  # config -> (model_type, a tiny config of it)
    "gpt2": ("gpt2", {"n_embd": 32, "n_layer": 1, "n_head": 2}),
    "qwen2.5-0.5b": ("qwen2", {**{"hidden_size": 32, "intermediate_size": 64}, "num_key_value_heads": 1}),
    "llama-3.2-1b": ("llama", {"hidden_size": 32, "intermediate_size": 64, "num_key_value_heads": 1}),
    "phi-2": ("phi", {"hidden_size": 32, "intermediate_size": 64}),
    "deepseek-coder-1.3b": ("llama", {"hidden_size": 32, "intermediate_size": 64}),
    "codegen-350m-mono": ("codegen", {"n_embd": 32, "n_layer": 1, "n_head": 2, "rotary_dim": 8}),
    "llama-2-7b": ("llama", {"hidden_size": 32, "intermediate_size": 64}),
}
LAYERS = {"num_hidden_layers": 1, "num_attention_heads": 2}


def tiny_checkpoint(folder: Path, model_type: str, options: dict) -> Path:
    """A saved causal LM of `model_type` with random weights and the byte-level tokenizer: what a hub download
    holds, in miniature."""
    from transformers import AutoConfig, AutoModelForCausalLM, ByT5Tokenizer

    extra = {} if model_type in ("gpt2", "codegen") else LAYERS
    config = AutoConfig.for_model(model_type, vocab_size=384, eos_token_id=1, pad_token_id=0, **extra, **options)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    ByT5Tokenizer().save_pretrained(folder)
    return folder


@pytest.mark.parametrize("name", sorted(HUB))
def test_each_hub_config_trains_on_a_folder_of_its_architecture(make_cfg, tmp_path, name):
    """The config's own defaults fit its architecture: the dtype loads, LoRA finds its target modules."""
    from omegaconf import OmegaConf

    from smop.methods.lora import add_lora
    from smop.run import run

    model_type, options = HUB[name]
    folder = tiny_checkpoint(tmp_path / name, model_type, options)
    own = OmegaConf.load(ROOT / "smop" / "configs" / "model" / f"{name}.yaml")
    backbone = add_lora(build_backbone(str(folder), dtype=own.dtype), target_modules=list(own.lora_target_modules))
    assert {p.dtype for p in backbone.parameters() if not p.requires_grad} == {getattr(torch, own.dtype)}
    if model_type == "qwen2":  # transformers gives a qwen2 folder its Qwen2Tokenizer whatever tokenizer_config says,
        return  # and that one needs vocab files: the byte-level stand-in cannot train here
    overrides = [f"model={name}", f"model.name_or_path={folder}", "method=lora_prompt_tuning", "method.prompt_length=4"]
    results = run(make_cfg(*overrides, "dataset=synthetic_mixture", "trainer.fast_dev_run=true"))
    assert results["status"] == "completed" and results["params"]["trainable"] > 4 * options.get("hidden_size", 32)


def test_model_dtype_keeps_the_frozen_weights_in_it_and_the_prompt_in_float32(make_cfg):
    from helpers import build

    system, _ = build(make_cfg("model=llama-tiny", "model.dtype=bfloat16", "method=smop", "dataset=synthetic_mixture"))
    assert {p.dtype for p in system.backbone.parameters()} == {torch.bfloat16}
    assert {p.dtype for p in system.prompt.parameters()} == {torch.float32}


def test_an_unknown_model_dtype_is_refused_by_name(make_cfg):
    from smop.checks import check_config

    with pytest.raises(ValueError, match=r"model.dtype=float8 is not one of: null, auto, float32, bfloat16, float16"):
        check_config(make_cfg("model=llama-tiny", "model.dtype=float8"))
