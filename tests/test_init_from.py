"""method.init_from: a new run's prompt from a trained one (our checkpoint or export, a peft prompt-tuning folder, the
DePT authors' released SST-2 prompt), shapes decided by the source, contradictions refused."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from conftest import ROOT, compose_config
from helpers import SYNTHETIC
from safetensors.torch import load_file

import smop.loading
import smop.run
from smop.backbones import build_tokenizer
from smop.checks import check_config
from smop.export import export
from smop.methods import DecomposedPromptTuning, PromptTuning
from smop.methods.init_from import InitFromError, read_source

DEPT_FOLDER = ROOT.parent / "shared" / "fixtures" / "dept-released" / "sst2"
needs_dept_folder = pytest.mark.skipif(
    not DEPT_FOLDER.is_dir(), reason=f"the DePT authors' released prompt is not at {DEPT_FOLDER} (../shared/fixtures)"
)
# a T5 as wide as t5-base (the prompt's d=768) but otherwise tiny: the embedding width is what the prompt needs
T5_768 = ["model.tiny.d_model=768", "model.tiny.d_ff=64", "model.tiny.num_heads=2", "model.tiny.d_kv=16"]
# the folder's shape: m=60, r=30, s=256, so inputs of up to 256 tokens after the 60-token prompt
DEPT = ["method=dept", "dataset=sst2", "method.rank=30", "dataset.max_length=316", f"method.init_from={DEPT_FOLDER}"]
FAST = ["trainer.max_epochs=1", "trainer.limit_train_batches=2", "trainer.limit_val_batches=1", "test=false"]
FAST += ["callbacks.flop_counter=null", "callbacks.progress_bar=null"]


def build_system(overrides: list[str], folder: Path) -> smop.run.PromptTuningSystem:
    """The system train.py builds for these overrides (init_from applied); no data is read."""
    cfg = compose_config(overrides, folder)
    tokenizer = build_tokenizer(cfg.model.name_or_path)
    return smop.run.build_system(cfg, smop.run.build_datamodule(cfg, tokenizer, setup=False), tokenizer)


def released() -> dict[str, torch.Tensor]:
    return torch.load(DEPT_FOLDER / "adapter_model.bin", map_location="cpu", weights_only=True)


@needs_dept_folder
def test_released_dept_folder_loads_with_its_m_r_s_bit_equal(tmp_path):
    source = read_source(DEPT_FOLDER)
    config = json.loads((DEPT_FOLDER / "adapter_config.json").read_text())
    assert source.kind == "dept" and source.width == config["token_dim"] == 768
    # DePT's max_length is s, the input positions A covers (its max_seq_length), not prompt + input
    assert (
        source.options
        == {"prompt_length": 60, "rank": 30, "max_positions": 256}
        == {
            "prompt_length": config["num_virtual_tokens"],
            "rank": config["r"],
            "max_positions": config["max_length"],
        }
    )
    prompt = build_system([*DEPT, *T5_768], tmp_path).prompt
    assert isinstance(prompt, DecomposedPromptTuning)
    assert (prompt.prompt_length, prompt.rank, prompt.max_positions) == (60, 30, 256)
    weights = released()
    assert torch.equal(prompt.prompt, weights["prompt_embeddings"])
    assert torch.equal(prompt.lora_a, weights["prompt_encoder.lora_embedding_A"])
    assert torch.equal(prompt.lora_b, weights["prompt_encoder.lora_embedding_B"])
    assert prompt.scaling == pytest.approx(config["lora_alpha"] / 30**0.5)


@needs_dept_folder
def test_train_false_evaluates_the_released_prompt(tmp_path, monkeypatch):
    built = []
    build = smop.run.build_system
    monkeypatch.setattr(
        smop.run, "build_system", lambda *args, **kwargs: built.append(build(*args, **kwargs)) or built[-1]
    )
    cfg = compose_config([*DEPT, *T5_768, "train=false", "callbacks=none", "dataset.eval_batch_size=24"], tmp_path)
    check_config(cfg)  # train=false needs no ckpt_path with init_from
    results = smop.run.run(cfg)
    assert results["status"] == "completed"
    assert results["metrics"]["val"]["accuracy"] is not None and results["metrics"]["test"] is not None
    assert torch.equal(built[0].prompt.lora_b, released()["prompt_encoder.lora_embedding_B"])


@needs_dept_folder
def test_a_backbone_of_another_width_is_refused(tmp_path):
    with pytest.raises(InitFromError, match=r"width 768 \(trained on t5-base\).*model.name_or_path=tiny.*width 128"):
        build_system(DEPT, tmp_path)  # the tiny T5: d_model 128


@needs_dept_folder
@pytest.mark.parametrize(
    ("override", "built"),
    [("method.prompt_length=40", "m=40, r=30, s=276"), ("dataset.max_length=256", "m=60, r=30, s=196")],
)
def test_a_config_contradicting_the_folders_shape_is_refused(tmp_path, override, built):
    with pytest.raises(InitFromError) as refused:
        build_system([*DEPT, *T5_768, override], tmp_path)
    message = str(refused.value)
    assert "holds a DePT prompt of m=60, r=30, s=256 (d=768)" in message and built in message
    assert "method.prompt_length=60 method.rank=30 dataset.max_length=316" in message


def test_a_folder_of_no_known_kind_is_refused_naming_its_files(tmp_path):
    (tmp_path / "weights.pt").write_bytes(b"")
    with pytest.raises(InitFromError, match=r"neither export.json nor adapter_config.json \(it holds weights.pt\)"):
        read_source(tmp_path)
    (tmp_path / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA"}))
    with pytest.raises(InitFromError, match="peft_type 'LORA'.*PROMPT_TUNING"):
        read_source(tmp_path)
    with pytest.raises(FileNotFoundError, match="does-not-exist"):
        read_source(tmp_path / "does-not-exist")


def test_train_false_takes_init_from_instead_of_ckpt_path(make_cfg, tmp_path):
    with pytest.raises(ValueError, match="ckpt_path=.*or method.init_from=PATH"):
        check_config(make_cfg("method=prompt_tuning", "train=false"))
    ckpt = tmp_path / "x.ckpt"
    ckpt.write_bytes(b"")
    with pytest.raises(InitFromError, match="give one"):
        check_config(make_cfg("method=prompt_tuning", "train=false", f"ckpt_path={ckpt}", f"method.init_from={ckpt}"))
    gone = f"method.init_from={tmp_path / 'gone.ckpt'}"
    check_config(make_cfg("method=prompt_tuning", "ckpt_path=last", gone))  # resuming: the checkpoint holds the weights
    with pytest.raises(FileNotFoundError, match="gone.ckpt"):
        check_config(make_cfg("method=prompt_tuning", gone))


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> tuple[Path, Path, torch.Tensor]:
    """A short prompt_tuning run's best checkpoint, its export, and the trained prompt."""
    out = tmp_path_factory.mktemp("trained")
    overrides = ["method=prompt_tuning", "method.prompt_length=8", *SYNTHETIC, *FAST]
    assert smop.run.run(compose_config(overrides, out))["status"] == "completed"
    ckpt = next((out / "checkpoints").glob("best-*.ckpt"))
    folder = export(ckpt, tmp_path_factory.mktemp("export") / "export")
    return ckpt, folder, load_file(folder / "prompt.safetensors")["prompt"]


def test_our_checkpoint_export_and_peft_folders_give_identical_weights(trained, tmp_path):
    ckpt, folder, table = trained
    peft_bin = tmp_path / "peft_bin"  # peft's layout, its pickle variant: adapter_model.bin
    peft_bin.mkdir()
    shutil.copy(folder / "peft_prompt" / "adapter_config.json", peft_bin)
    torch.save({"prompt_embeddings": table.clone()}, peft_bin / "adapter_model.bin")
    sources = {"checkpoint": ckpt, "export": folder, "peft": folder / "peft_prompt", "peft .bin": peft_bin}
    for name, source in sources.items():
        prompt = build_system(
            ["method=prompt_tuning", "method.prompt_length=8", f"method.init_from={source}"], tmp_path
        )
        assert isinstance(prompt.prompt, PromptTuning)
        assert torch.equal(prompt.prompt.prompt.detach(), table), name
    with pytest.raises(InitFromError, match=r"8-token prompt.*100-token prompt.*method.prompt_length=8"):
        build_system(["method=prompt_tuning", f"method.init_from={ckpt}"], tmp_path)
    with pytest.raises(
        InitFromError, match=r"method=prompt_tuning.*method=dept .*needs \['lora_a', 'lora_b', 'prompt'\]"
    ):
        build_system(["method=dept", "method.prompt_length=8", f"method.init_from={ckpt}"], tmp_path)


def test_a_run_started_from_a_prompt_reloads_without_its_source(trained, tmp_path):
    """The checkpoint of a run trained with init_from holds its weights: loading it never reads the source again."""
    ckpt, _, table = trained
    source = tmp_path / "source.ckpt"
    shutil.copy(ckpt, source)
    overrides = ["method=prompt_tuning", "method.prompt_length=8", f"method.init_from={source}", *SYNTHETIC, *FAST]
    assert smop.run.run(compose_config(overrides, tmp_path / "run"))["status"] == "completed"
    source.unlink()
    loaded = smop.loading.load(next((tmp_path / "run" / "checkpoints").glob("best-*.ckpt")), device="cpu")
    assert loaded.config["method"]["init_from"] == str(source)
    assert loaded.system.prompt.prompt.shape == table.shape
