"""DePT: zero update at init, the update by position, padding-invariance, two learning rates, the budget."""

from __future__ import annotations

import math

import pytest
import torch
from helpers import SYNTHETIC, build, fit_fixed_batch
from hydra.utils import instantiate
from torch import nn

from smop.prompts import DecomposedPromptTuning, PromptTuning, budget_split
from smop.run import run

DEPT = ["method=dept", "method.prompt_length=5", *SYNTHETIC]


def test_update_is_zero_at_init_so_dept_starts_as_prompt_tuning(make_cfg):
    system, batch = build(make_cfg(*DEPT))
    ids, mask = batch["input_ids"], batch["attention_mask"]
    embeds, full_mask, _ = system.encoder_inputs(ids, mask)
    loss = system(ids, mask, batch["labels"])[0]
    plain = PromptTuning(system.backbone.get_input_embeddings(), prompt_length=5)
    plain.prompt.data.copy_(system.prompt.prompt.data)
    system.prompt = plain
    plain_embeds, plain_mask, _ = system.encoder_inputs(ids, mask)
    assert torch.equal(embeds, plain_embeds) and torch.equal(full_mask, plain_mask)
    assert torch.equal(loss, system(ids, mask, batch["labels"])[0])


def test_position_i_receives_row_i_of_ab():
    dept = DecomposedPromptTuning(nn.Embedding(50, 16), prompt_length=3, rank=4, max_positions=12, init="random")
    assert dept.lora_a.abs().max() <= 1 / math.sqrt(4)  # Kaiming-uniform: U(+-1/sqrt(r))
    nn.init.normal_(dept.lora_b)
    embeds = torch.randn(2, 7, 16)
    out = dept(embeds, torch.ones(2, 7, dtype=torch.long))
    for i in range(7):
        expected = embeds[:, i] + 8.0 / math.sqrt(4) * (dept.lora_a[i] @ dept.lora_b)
        torch.testing.assert_close(out.input_embeds[:, i], expected)
    assert out.prompt.shape == (2, 3, 16) and torch.equal(out.prompt[0], dept.prompt)
    with pytest.raises(ValueError, match="method.max_positions"):
        dept(torch.randn(1, 13, 16), torch.ones(1, 13, dtype=torch.long))


def test_extra_padding_does_not_change_an_example(make_cfg):
    """Dynamic padding keeps working: an input of n tokens receives the first n rows, wherever padding ends."""
    system, batch = build(make_cfg(*DEPT))
    nn.init.normal_(system.prompt.lora_b, std=0.1)  # a nonzero update
    system.eval()
    n = int(batch["attention_mask"][0].sum())
    ids, mask, labels = batch["input_ids"][:1, :n], batch["attention_mask"][:1, :n], batch["labels"][:1]
    pad = 9
    padded_ids = torch.cat([ids, ids.new_full((1, pad), system.tokenizer.pad_token_id)], dim=1)
    padded_mask = torch.cat([mask, mask.new_zeros(1, pad)], dim=1)
    with torch.no_grad():
        loss, logits, _ = system(ids, mask, labels)
        padded_loss, padded_logits, _ = system(padded_ids, padded_mask, labels)
    torch.testing.assert_close(padded_logits, logits, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(padded_loss, loss, atol=1e-5, rtol=1e-5)


def test_prompt_and_low_rank_pair_get_their_own_learning_rates(make_cfg):
    cfg = make_cfg(*DEPT, "optimizer=adamw", "method.lr=0.3", "method.lr_lowrank=5e-3")
    system, _ = build(cfg)
    groups = system.param_groups()
    assert [len(g["params"]) for g in groups] == [1, 2]
    assert groups[0]["params"][0] is system.prompt.prompt and "lr" not in groups[0]
    assert groups[1]["params"] == [system.prompt.lora_a, system.prompt.lora_b] and groups[1]["lr"] == 5e-3
    optimizer = instantiate(cfg.optimizer)(groups)
    assert isinstance(optimizer, torch.optim.AdamW)
    assert [g["lr"] for g in optimizer.param_groups] == [0.3, 5e-3]
    assert [g["weight_decay"] for g in optimizer.param_groups] == [0.0, 0.0]  # the reference: no decay


def test_budget_matches_pt100_on_t5_base():
    assert budget_split(100, 768, 256, prompt_length=60) == (60, 30)
    assert budget_split(100, 768, 256, rank=30) == (60, 30)
    dept = DecomposedPromptTuning(nn.Embedding(10, 768), prompt_length=60, max_positions=256, init="random")
    assert (dept.prompt_length, dept.rank) == (60, 30)
    assert sum(p.numel() for p in dept.parameters()) == 100 * 768
    with pytest.raises(ValueError, match="budget"):
        budget_split(10, 768, 256, prompt_length=20)


def test_paper_experiment_derives_m60_r30(make_cfg):
    cfg = make_cfg("experiment=dept_t5base")
    assert cfg.optimizer._target_ == "torch.optim.AdamW"
    assert cfg.dataset.max_length - cfg.method.prompt_length == cfg.method.max_positions == 256
    module = instantiate(cfg.method.module, embedding=nn.Embedding(10, 768), init="random")
    assert (module.prompt_length, module.rank) == (60, 30)


def test_fast_dev_run_with_the_reference_optimizer(make_cfg):
    # test_configs runs every method with the default callbacks (FLOP counter included); this one with AdamW
    overrides = ["method=dept", "optimizer=adamw", "trainer.fast_dev_run=true", "callbacks=none", *SYNTHETIC]
    results = run(make_cfg(*overrides))
    assert results["status"] == "completed"
    assert results["params"]["trainable"] == 60 * 128 + 20 * (128 + 128)  # d=128, s=128: r=20 from PT-100


def test_dept_learns(make_cfg):
    system, batch = build(make_cfg(*DEPT, "dataset.batch_size=8", "method.lr=0.3", "method.lr_lowrank=1e-2"))
    optimizer = torch.optim.AdamW(system.param_groups(), lr=0.3)  # the prompt's group has no lr: method.lr applies
    losses = fit_fixed_batch(system, batch, optimizer, 30)
    assert min(losses[-5:]) <= 0.5 * losses[0], losses[::10]
    assert system.prompt.lora_b.abs().sum() > 0  # the low-rank pair moved too
