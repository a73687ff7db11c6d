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
