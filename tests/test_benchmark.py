"""The cost benchmark: runs end to end on the tiny T5, and its measuring instruments count what they claim.

Timings are not asserted here (they belong in the benchmark's own output), only what must hold on any machine.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from omegaconf import DictConfig
from transformers import ByT5Tokenizer

from smop.benchmark import (
    LiveTensorBytes,
    analytic_inference_flops,
    build_t5,
    prompt_module_flops,
    run_benchmark,
    twin_on_same_weights,
)
from smop.costs import eager_attention, inference_flops
from smop.data.tasks import Task
from smop.methods import DecomposedPromptTuning, PromptTuning, PTuning, SparseMixtureOfPrompts
from smop.methods.lora import add_lora, has_lora, remove_lora
from smop.methods.routers import LinearRouter
from smop.module import PromptTuningSystem

ROOT = Path(__file__).resolve().parents[1]
VARIANTS = {
    "smop_4x5",
    "pt_5",
    "pt_20",
    "pt_50",
    "pt_100",
    "p_tuning_100",
    "full",
    "peft_pt_100",
    "bare_pt_100",
    "lightning_pt_100",
    "dept_60",
    "idpg_10",
    "lopa_10",
    "lora_pt_100",
    "lora_smop_4x5",
}
TINY = [
    "benchmark.model=t5-tiny",
    "benchmark.threads=1",
    "benchmark.batch_size=4",
    "benchmark.warmup_steps=1",
    "benchmark.steps=2",
    "benchmark.memory_steps=1",
    "benchmark.tasks=[rte]",
    "benchmark.max_length=200",
]
SMALL = dict(
    vocab_size=300,
    d_model=32,
    d_ff=48,
    d_kv=8,
    num_heads=2,
    num_layers=2,
    num_decoder_layers=1,
    decoder_start_token_id=0,
    pad_token_id=0,
    eos_token_id=1,
)


def compose_benchmark(overrides: list[str]) -> DictConfig:
    GlobalHydra.instance().clear()
    with initialize_config_dir(str(ROOT / "smop" / "configs"), version_base="1.3"):
        return compose("benchmark", overrides=overrides)


def test_benchmark_runs_end_to_end_on_tiny_t5_and_reports_every_variant(tmp_path):
    cfg = compose_benchmark([*TINY, "benchmark.fixed_lengths=[24]", "benchmark.pipeline.max_batches=2"])
    report = run_benchmark(cfg, tmp_path)
    assert json.loads((tmp_path / "benchmark.json").read_text())["settings"] == json.loads(
        json.dumps(report["settings"])
    )
    assert (tmp_path / "benchmark.md").read_text().count("| smop_4x5 |") == 2
    assert [s["kind"] for s in report["settings"]] == ["real", "fixed"]
    for setting in report["settings"]:
        variants = setting["variants"]
        assert set(variants) == VARIANTS
        assert all(v["step_time_s_median"] > 0 for v in variants.values())
        assert all(
            v["peak_memory_bytes"] > 0 and v["step_cpu_s_median"] > 0
            for k, v in variants.items()
            if k != "lightning_pt_100"
        )
        assert variants["pt_100"]["trainable_params"] == variants["peft_pt_100"]["trainable_params"] == 100 * 128
        assert variants["smop_4x5"]["trainable_params"] == 20 * 128 + 128 * 4
        ratios = setting["ratios"]
        assert ratios["smop_over_pt_flops"] < 1
        assert ratios["flops_delta_rel_error"] < 0.01  # fvcore's SMoP vs PT-100 difference = the analytic count
        assert ratios["smop_over_pt_memory"] < 1 and ratios["smop_over_pt_step_memory"] < 1  # 95 fewer tokens
        # the relatives: DePT on PT-100's budget; LoRA's r=8 pairs on q and v of the encoder's self-attention and
        # the decoder's self- and cross-attention (one layer each): 6 x 8 x (128 + 128)
        assert variants["dept_60"]["trainable_params"] <= 100 * 128
        lora = 6 * 8 * (128 + 128)
        assert variants["lora_pt_100"]["trainable_params"] == 100 * 128 + lora
        assert variants["lora_smop_4x5"]["trainable_params"] == 20 * 128 + 128 * 4 + lora
        flops = {name: v.get("inference_flops_per_example") for name, v in variants.items()}
        assert flops["lora_pt_100"] > flops["pt_100"] and flops["lora_smop_4x5"] > flops["smop_4x5"]
        assert flops["idpg_10"] > flops["pt_20"]  # 10 tokens, but a second encoder pass over the input
        assert variants["dept_60"]["analytic_flops_per_example"] == pytest.approx(flops["dept_60"], rel=1e-9)
        assert variants["idpg_10"]["analytic_flops_per_example"] is None  # no formula: "-", not a wrong figure
    assert report["settings"][0]["lengths"].startswith("real ids")
    assert report["pipeline"]["dynamic"]["examples"] == report["pipeline"]["max_length"]["examples"] == 8


@pytest.mark.slow
def test_module_entry_point_writes_into_its_hydra_output_dir(tmp_path):
    command = [
        sys.executable,
        "-m",
        "smop.benchmark",
        *TINY,
        "benchmark.run_variants=[smop_4x5,pt_100]",
        "benchmark.fixed_lengths=[]",
        "benchmark.pipeline.enabled=false",
        f"hydra.run.dir={tmp_path}",
    ]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert str(tmp_path / "benchmark.md") in done.stdout.replace("\n", "")
    report = json.loads((tmp_path / "benchmark.json").read_text())
    assert set(report["settings"][0]["variants"]) == {"smop_4x5", "pt_100"}
    assert report["command"].startswith("python -m smop.benchmark benchmark.model=t5-tiny")


def test_analytic_flops_equal_fvcore_for_every_prompt_module():
    torch.manual_seed(0)  # a gated FFN here; the end-to-end run checks the ReLU one
    backbone = build_t5({**SMALL, "feed_forward_proj": "gated-gelu"})
    embedding = backbone.get_input_embeddings()
    prompts = [
        None,
        PromptTuning(embedding, prompt_length=7),
        PTuning(embedding, prompt_length=6, hidden_size=16),
        SparseMixtureOfPrompts(embedding, lambda **kw: LinearRouter(**kw), num_prompts=3, prompt_length=4),
        DecomposedPromptTuning(embedding, prompt_length=5, rank=3, max_positions=16, init="random"),
    ]
    batch = {
        "input_ids": torch.randint(3, 250, (3, 11)),
        "attention_mask": torch.ones(3, 11, dtype=torch.long),
        "labels": torch.randint(3, 250, (3, 4)),
    }
    batch["attention_mask"][0, 6:] = 0  # padding changes nothing: the padded width is computed
    for prompt in prompts:
        system = PromptTuningSystem(
            backbone, ByT5Tokenizer(), Task("rte", "{premise}", ["a", "b"]), prompt, optimizer=torch.optim.SGD
        )
        with eager_attention(system):
            measured = inference_flops(system, batch)
        length = 11 + (prompt.prompt_length if prompt is not None else 0)
        expected = analytic_inference_flops(backbone.config, length, 4) + prompt_module_flops(prompt, 3, 11)
        assert measured == pytest.approx(expected, rel=1e-9), type(prompt).__name__


def test_live_tensor_bytes_counts_new_storages_until_freed_and_not_views_or_in_place():
    before = torch.ones(1000)  # existed before: never counted, even when an op returns it
    with LiveTensorBytes() as tracker:
        a = torch.ones(1000)  # 4000 bytes
        b = a * 2  # 4000 more
        before.add_(1)
        view = b.view(10, 100).t()  # a view: same storage
        del a
        c = torch.ones(500)  # 2000, after 4000 were freed
    assert tracker.peak == 8000
    assert tracker.live == 6000
    assert view.shape == (100, 10) and c.numel() == 500


def test_live_tensor_bytes_sees_autograd_saved_tensors_and_gradients():
    weight = torch.nn.Parameter(torch.randn(64, 64))
    with LiveTensorBytes() as tracker:
        x = torch.randn(32, 64)
        loss = torch.relu(x @ weight).sum()
        loss.backward()
    assert weight.grad is not None
    assert tracker.peak >= 32 * 64 * 4 * 2 + 64 * 64 * 4  # input, saved activation, gradient


def test_removing_lora_gives_back_the_bare_shared_backbone():
    """The benchmark trains LoRA + X on the backbone every other variant shares: afterwards it is as it was."""
    model = build_t5(SMALL)
    before = {name: (type(module), id(module)) for name, module in model.named_modules()}
    add_lora(model, target_modules=["q", "v"])
    assert has_lora(model) and any("lora_A" in name for name, _ in model.named_parameters())
    remove_lora(model)
    assert not has_lora(model) and not hasattr(model, "peft_config")
    assert {name: (type(module), id(module)) for name, module in model.named_modules()} == before


def test_peft_twin_uses_the_same_weight_storage():
    model = build_t5(SMALL)
    twin = twin_on_same_weights(model)
    ours = {p.data_ptr() for p in model.parameters()}
    assert all(p.data_ptr() in ours for p in twin.parameters())
    assert twin is not model and twin.config is not model.config
