"""Against the hardware limit: model FLOPs of a step by hand, the peak table, MFU null on a CPU, the run's fields."""

from __future__ import annotations

import pytest
import torch
from helpers import SYNTHETIC
from transformers import ByT5Tokenizer

from smop.backbones import build_backbone
from smop.costs import step_model_flops
from smop.data.tasks import Task
from smop.hardware import device_peak, hardware, lookup_peak, measured_matmul_tflops, mfu
from smop.methods import PromptTuning
from smop.methods.routers import LinearRouter
from smop.methods.smop import SparseMixtureOfPrompts
from smop.module import PromptTuningSystem
from smop.run import run

# d 8, inner 2 x 4 = 8, f 16 (ReLU), one encoder and one decoder layer, vocabulary 10
HAND = dict(
    vocab_size=10,
    d_model=8,
    d_ff=16,
    d_kv=4,
    num_heads=2,
    num_layers=1,
    num_decoder_layers=1,
    decoder_start_token_id=0,
    pad_token_id=0,
    eos_token_id=1,
)


def hand_macs(n: int, t: int) -> int:
    """T5_inference multiply-adds for HAND, written out term by term (d = inner = 8, f = 16, V = 10)."""
    encoder = 4 * n * 8 * 8 + 2 * n * n * 8 + 2 * n * 8 * 16
    decoder = 4 * t * 8 * 8 + 2 * t * t * 8 + 2 * t * 8 * 8 + 2 * n * 8 * 8 + 2 * t * n * 8 + 2 * t * 8 * 16
    return encoder + decoder + t * 8 * 10


def batch(rows: int = 3, width: int = 5, target: int = 2) -> dict[str, torch.Tensor]:
    return {
        "input_ids": torch.randint(3, 10, (rows, width)),
        "attention_mask": torch.ones(rows, width, dtype=torch.long),
        "labels": torch.randint(3, 10, (rows, target)),
    }


def system(prompt=None, train_backbone: bool = False) -> PromptTuningSystem:
    backbone = build_backbone("tiny", HAND)
    module = prompt(backbone.get_input_embeddings()) if prompt is not None else None
    task = Task("rte", "{premise}", ["a", "b"])
    return PromptTuningSystem(
        backbone, ByT5Tokenizer(), task, module, optimizer=torch.optim.SGD, train_backbone=train_backbone
    )


def test_hand_computed_macs_of_the_tiny_shape():
    assert hand_macs(8, 2) == 5120 + 2624 + 160  # the figures worked out in the docstring's terms


def test_a_prompt_step_is_twice_its_forward_full_fine_tuning_three_times_two_flops_per_multiply_add():
    prompted = system(lambda e: PromptTuning(e, prompt_length=3))
    flops, note = step_model_flops(prompted, batch())
    assert flops == 3 * 2 * 2 * hand_macs(3 + 5, 2)  # 3 rows, 2 FLOPs a multiply-add, 2x forward
    assert "frozen backbone" in note
    full, note = step_model_flops(system(train_backbone=True), batch())
    assert full == 3 * 2 * 3 * hand_macs(5, 2)  # no prompt: 5 encoder tokens, 3x forward
    assert "weights train" in note


def test_smop_counts_its_router_three_times_and_a_consistency_pass_doubles_the_step():
    router = lambda **kw: LinearRouter(**kw)  # noqa: E731
    smop = system(lambda e: SparseMixtureOfPrompts(e, router, num_prompts=2, prompt_length=3))
    flops, _ = step_model_flops(smop, batch())
    module = 8 * 2 + 3 * 8  # the router d K and the weighted top-1 prompt L d, per example
    assert flops == 3 * 2 * (2 * hand_macs(8, 2) + 3 * module)
    smop.prompt.consistency_weight = 1.0  # a plain attribute of the module here
    doubled, note = step_model_flops(smop, batch())
    assert doubled == 2 * flops and "two passes" in note


@pytest.mark.parametrize(
    ("name", "peak"),
    [
        ("NVIDIA H100 80GB HBM3", 989.4),
        ("NVIDIA H100 PCIe", 756.5),
        ("NVIDIA H100 NVL", 835.5),
        ("NVIDIA H200", 989.4),
        ("NVIDIA A100-SXM4-80GB", 312.0),
        ("NVIDIA A100 80GB PCIe", 312.0),
        ("NVIDIA A10", 125.0),
        ("NVIDIA L40S", 362.05),
        ("NVIDIA L40", 181.05),
        ("NVIDIA L4", 121.0),
        ("NVIDIA GeForce RTX 4090", 165.2),
        ("Tesla V100-SXM2-16GB", 125.0),
        ("Tesla V100-PCIE-32GB", 112.0),
    ],
)
def test_the_peak_is_looked_up_by_the_cuda_device_name(monkeypatch, name, peak):
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: name)
    found = device_peak(torch.device("cuda"))
    assert (found.device, found.tflops) == (name, peak)
    assert "datasheet" in found.source or "whitepaper" in found.source


@pytest.mark.parametrize("name", ["NVIDIA A10G", "NVIDIA B200", "AMD Instinct MI300X"])
def test_a_device_without_a_figure_has_no_peak_and_says_why(name):
    peak = lookup_peak(name)
    assert peak.tflops is None and name in peak.source
    assert mfu(1e12, peak) == (None, peak.source)


def test_on_a_cpu_mfu_is_null_with_the_reason_and_the_matmul_is_measured_only_when_asked():
    cpu = torch.device("cpu")
    figures = hardware(cpu)
    assert figures["peak_tflops_bf16"] is None and figures["measured_matmul_tflops"] is None
    assert "CPU" in figures["peak_source"]
    assert mfu(1e12, device_peak(cpu))[0] is None
    assert measured_matmul_tflops(cpu, size=128, repeats=2) > 0
    assert mfu(2e12, lookup_peak("NVIDIA A100-SXM4-40GB"))[0] == pytest.approx(2 / 312)


def test_results_json_reports_throughput_mfu_hardware_and_eval_speed(make_cfg):
    short = ["trainer.max_epochs=1", "trainer.limit_train_batches=2", *SYNTHETIC]
    cost = run(make_cfg(*short, "callbacks.training_cost.measure_peak=true"))["cost"]
    assert cost["train_tflops_per_s"] > 0 and cost["train_model_flops_per_example"] > 0
    assert cost["train_mfu"] is None and "CPU" in cost["train_mfu_note"]
    assert cost["hardware"]["device"].startswith("cpu") and cost["hardware"]["measured_matmul_tflops"] > 0
    # the step's model FLOPs are the counted training FLOPs (FlopCounterMode's multiply-adds) in FLOPs, give or take
    # the batches (the counter reads the first rows in file order)
    assert cost["train_model_flops_per_example"] == pytest.approx(2 * cost["train_flops_per_example"], rel=0.5)
    assert cost["eval_test_examples_per_s"] > 0 and cost["eval_val_examples"] > 0
