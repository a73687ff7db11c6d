"""IDPG and LoPA: prompts per instance from the frozen encoder, deterministic in eval, only the generators train."""

from __future__ import annotations

import pytest
import torch
from helpers import SYNTHETIC, build, fit_fixed_batch

from smop.costs import eager_attention, inference_flops
from smop.run import run

METHODS = ["idpg", "lopa"]
D, H, M, R = 128, 256, 10, 4  # tiny T5's width, the reference's generator bottleneck, prompt length, LoPA rank


def prompts(system, batch) -> torch.Tensor:
    embeds = system.backbone.get_input_embeddings()(batch["input_ids"])
    return system.prompt(embeds, batch["attention_mask"]).prompt


@pytest.mark.parametrize("method", METHODS)
def test_prompts_differ_between_instances_and_are_deterministic_in_eval(make_cfg, method):
    system, batch = build(make_cfg(f"method={method}", *SYNTHETIC))
    system.eval()
    with torch.no_grad():
        first, second = prompts(system, batch), prompts(system, batch)
    assert first.shape == (batch["input_ids"].shape[0], M, D)
    assert torch.equal(first, second)
    assert not torch.allclose(first[0], first[1])


def test_lopa_gate_is_in_zero_one_and_varies_by_instance(make_cfg):
    system, batch = build(make_cfg("method=lopa", *SYNTHETIC))
    system.eval()
    embeds = system.backbone.get_input_embeddings()(batch["input_ids"])
    pooled = system.prompt.pooled(embeds, batch["attention_mask"])
    assert not pooled.requires_grad  # the encoder runs without gradients
    gate = system.prompt.gate(pooled)
    assert gate.shape == (embeds.shape[0], M, D)
    assert (gate > 0).all() and (gate < 1).all()
    assert not torch.allclose(gate[0], gate[1])
    torch.testing.assert_close(prompts(system, batch), system.prompt.shared * gate)


@pytest.mark.parametrize("method", METHODS)
def test_only_the_generators_train_and_the_backbone_stays_bit_for_bit(make_cfg, method):
    system, batch = build(make_cfg(f"method={method}", *SYNTHETIC))
    heads = (
        (H * D + H) + (H * M * D + M * D)
        if method == "idpg"
        else M * D + 2 * (H * D + H) + H * (M + D) * R + (M + D) * R
    )
    trainable = {name for name, p in system.named_parameters() if p.requires_grad}
    assert trainable == {f"prompt.{name}" for name, _ in system.prompt.named_parameters()}
    assert sum(p.numel() for p in system.prompt.parameters()) == heads  # the encoder is not in the prompt module
    assert not any(key.startswith("prompt.") and "encode" in key for key in system.state_dict())
    backbone = {k: v.clone() for k, v in system.backbone.state_dict().items()}
    prompt = {k: v.clone() for k, v in system.prompt.state_dict().items()}
    optimizer = torch.optim.AdamW(system.param_groups(), lr=1e-2)
    system.train()
    system(batch["input_ids"], batch["attention_mask"], batch["labels"])[0].backward()
    optimizer.step()
    assert all(torch.equal(v, backbone[k]) for k, v in system.backbone.state_dict().items())
    assert all(not torch.equal(v, prompt[k]) for k, v in system.prompt.state_dict().items() if k.endswith("weight"))
    checkpoint = {"state_dict": system.state_dict()}
    system.on_save_checkpoint(checkpoint)
    assert all(key.startswith("prompt.") for key in checkpoint["state_dict"])


def test_lopa_shared_prompt_can_get_its_own_learning_rate(make_cfg):
    system, _ = build(make_cfg("method=lopa", "method.shared_lr=0.1", *SYNTHETIC))
    shared, generators = system.param_groups()
    assert shared["params"] == [system.prompt.shared] and shared["lr"] == 0.1 and "lr" not in generators
    assert len(build(make_cfg("method=lopa", *SYNTHETIC))[0].param_groups()) == 1  # the reference: one lr


@pytest.mark.parametrize("method", METHODS)
def test_fast_dev_run_with_the_reference_optimizer(make_cfg, method):
    # test_configs runs every method with the default callbacks (FLOP counter included); this one with AdamW
    results = run(
        make_cfg(f"method={method}", "optimizer=adamw", "trainer.fast_dev_run=true", "callbacks=none", *SYNTHETIC)
    )
    assert results["status"] == "completed"


def test_flop_count_includes_the_extra_encoder_pass(make_cfg):
    counts = []
    for overrides in (["method=idpg"], ["method=prompt_tuning", f"method.prompt_length={M}"]):
        system, batch = build(make_cfg(*overrides, *SYNTHETIC))
        with eager_attention(system):
            counts.append(inference_flops(system, batch))
    generator = H * D + H * M * D  # multiply-adds per example of IDPG's two linear layers
    assert counts[0] - counts[1] > 2 * generator  # the rest is the encoder's pass over the input


@pytest.mark.parametrize(
    ("method", "overrides"), [("idpg", ["method.lr=3e-3"]), ("lopa", ["method.lr=1e-2", "method.shared_lr=0.1"])]
)
def test_loss_on_a_fixed_batch_halves(make_cfg, method, overrides):
    system, batch = build(make_cfg(f"method={method}", *overrides, "dataset.batch_size=8", *SYNTHETIC))
    optimizer = torch.optim.AdamW(system.param_groups(), lr=system.hparams["method"]["lr"])
    losses = fit_fixed_batch(system, batch, optimizer, 30)
    assert min(losses[-5:]) <= 0.5 * losses[0], losses[::5]
