"""Cost figures: present, sane, and consistent with the architecture."""

from __future__ import annotations

import pytest
from helpers import SYNTHETIC, build

from smop.costs import eager_attention, inference_flops, train_step_flops
from smop.run import run

D, K, L = 128, 4, 5  # t5-tiny width; SMoP 4x5


def flops(make_cfg, *overrides) -> tuple[float, float]:
    system, batch = build(make_cfg(*overrides, *SYNTHETIC))
    with eager_attention(system):
        return inference_flops(system, batch), train_step_flops(system, batch)


@pytest.mark.parametrize("model", ["t5-tiny", "llama-tiny"])  # a causal backbone's results.json: the same figures
def test_cost_fields_in_a_tiny_run(make_cfg, model):
    results = run(make_cfg(f"model={model}", "trainer.max_epochs=1", "trainer.limit_train_batches=3", *SYNTHETIC))
    cost = results["cost"]
    for name in (
        "train_time_s",
        "step_time_s_median",
        "train_examples_per_s",
        "peak_memory_bytes",
        "inference_flops_per_example",
        "train_flops_per_example",
    ):
        assert cost[name] > 0, name
    assert cost["memory_kind"] == "cpu_peak_rss"
    assert cost["step_time_s_median"] * 3 <= cost["train_time_s"] * 1.5
    assert cost["train_flops_per_example"] > cost["inference_flops_per_example"]
    assert results["params"]["trainable"] < results["params"]["total"]


def test_flops_grow_with_prompt_length(make_cfg):
    by_length = [flops(make_cfg, "method=prompt_tuning", f"method.prompt_length={n}")[0] for n in (5, 20, 50)]
    assert by_length[0] < by_length[1] < by_length[2]


def test_smop_costs_what_a_five_token_prompt_costs_plus_its_router(make_cfg):
    smop_inference, smop_train = flops(make_cfg, "method=smop")
    pt5_inference, pt5_train = flops(make_cfg, "method=prompt_tuning", f"method.prompt_length={L}")
    router = D * K + L * D  # the router's linear layer and the weighted prompt (top-1), per example
    assert 0 <= smop_inference - pt5_inference <= router
    pt20_inference, _ = flops(make_cfg, "method=prompt_tuning", f"method.prompt_length={K * L}")
    assert smop_inference < pt20_inference  # same parameters as PT-20, cheaper inference
    assert smop_train == pytest.approx(pt5_train, rel=0.01)


def test_frozen_backbone_step_costs_about_twice_its_forward_full_about_three_times(make_cfg):
    inference, train = flops(make_cfg, "method=prompt_tuning", "method.prompt_length=5")
    full_inference, full_train = flops(make_cfg, "method=full")
    assert 1.5 < train / inference < 2.6  # no weight gradients through the frozen backbone
    assert 2.5 < full_train / full_inference < 3.5


def test_counting_flops_does_not_change_the_run(make_cfg, tmp_path):
    short = ["trainer.max_epochs=1", "trainer.limit_train_batches=3", *SYNTHETIC]
    counted = run(make_cfg(*short))
    from conftest import compose_config

    uncounted = run(compose_config(["~callbacks.flop_counter", *short], tmp_path / "b"))
    assert counted["metrics"] == uncounted["metrics"] and counted["routing"] == uncounted["routing"]
