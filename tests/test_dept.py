"""DePT: zero update at init, the update by position, padding-invariance, two learning rates, the budget, and
the reference's text init (with EOS), AdamW eps and rows of A (the longest input the data can produce)."""

from __future__ import annotations

import math

import pytest
import torch
from helpers import SYNTHETIC, build, fit_fixed_batch
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from torch import nn

from smop.backbones import build_tokenizer
from smop.methods import DecomposedPromptTuning, PromptTuning, budget_split
from smop.methods.dept import input_positions
from smop.run import run

DEPT = ["method=dept", "method.prompt_length=5", *SYNTHETIC]


def test_update_is_zero_at_init_so_dept_starts_as_prompt_tuning(make_cfg):
    system, batch = build(make_cfg(*DEPT))
    system.eval()  # the backbone's dropout is live in training (method.train_dropout): compare without it
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
    assert cfg.trainer.gradient_clip_val == 1.0  # the HF Trainer's max_grad_norm, which the reference keeps
    module = instantiate(cfg.method.module, embedding=nn.Embedding(10, 768), init="random")
    assert (module.prompt_length, module.max_positions, module.rank) == (60, 316 - 60, 30)


def test_text_init_is_the_reference_text_tokenized_with_eos_and_repeated_to_m_rows(make_cfg):
    """The reference (peft's PromptTuningInit.TEXT): `tokenizer(text)` keeps the EOS; the ids repeat to m rows."""
    system, _ = build(make_cfg(*DEPT, "method.prompt_length=45"))
    assert system.prompt.prompt_length == 45
    assert make_cfg("method=dept").method.init_text == "Classify this text is postive or not:"  # sic
    # ByT5 bytes: 37 characters -> ids byte + 3 ("C" = 67 -> 70), then EOS (1): 38 ids, repeated to 45 rows
    ids = build_tokenizer("tiny")("Classify this text is postive or not:").input_ids
    assert len(ids) == 38 and ids[0] == 70 and ids[-1] == 1
    table = system.backbone.get_input_embeddings().weight
    prompt = system.prompt.prompt
    assert torch.equal(prompt[37], table[1]) and torch.equal(prompt[38], table[70])  # EOS, then the text again
    assert torch.equal(prompt, table[torch.tensor((ids + ids)[:45])])


def test_adamw_takes_the_reference_eps_on_both_groups(make_cfg):
    """transformers' AdamW (the reference's) defaults to eps 1e-6, torch's to 1e-8; Adafactor keeps its pair."""
    for overrides in (DEPT, ["experiment=dept_t5base"]):
        cfg = make_cfg(*overrides)
        module = instantiate(cfg.method.module, embedding=nn.Embedding(10, 32), init="random")
        optimizer = instantiate(cfg.optimizer)(module.param_groups())
        assert isinstance(optimizer, torch.optim.AdamW)
        assert [g["eps"] for g in optimizer.param_groups] == [1e-6, 1e-6]
    cfg = make_cfg(*DEPT, "method.adam_eps=null")
    module = instantiate(cfg.method.module, embedding=nn.Embedding(10, 32), init="random")
    assert [g["eps"] for g in instantiate(cfg.optimizer)(module.param_groups()).param_groups] == [1e-8, 1e-8]
    cfg = make_cfg(*DEPT, "optimizer=adafactor")  # left out: Adafactor's eps is a pair of its own
    module = instantiate(cfg.method.module, embedding=nn.Embedding(10, 32), init="random")
    optimizer = instantiate(cfg.optimizer)(module.param_groups())
    assert [g["eps"] for g in optimizer.param_groups] == [(1e-30, 1e-3), (1e-30, 1e-3)]
    module.prompt.sum().backward()
    optimizer.step()  # a float eps would fail here


def test_rows_of_a_are_the_longest_input_the_data_can_produce(make_cfg):
    """s = max_length - m: no row of A is out of reach of the data (512 - 60 = 452 by default, not 512)."""
    cfg = make_cfg("method=dept")
    module = instantiate(cfg.method.module, embedding=nn.Embedding(10, 768), init="random")
    assert cfg.method.max_positions is None and module.max_positions == 512 - 60
    assert module.rank == (100 * 768 - 60 * 768) // (452 + 768) == 25  # the budget counts the rows that train
    system, _ = build(make_cfg(*DEPT))
    datamodule_budget = 128 - 5  # synthetic_mixture: max_length 128, the prompt 5
    assert system.prompt.max_positions == datamodule_budget
    assert system.prompt.update(datamodule_budget).shape == (datamodule_budget, 128)  # the longest input fits
    assert input_positions(256, 316, 60) == 256 and input_positions(100, 316, 60) == 100  # an integer overrides
    assert input_positions(16, None, 5) == 16  # no data to compare with (direct construction, the benchmark)
    with pytest.raises(ValueError, match=r"max_positions=300 .* 316 - method.prompt_length 60 = 256.* 44 rows"):
        input_positions(300, 316, 60)
    with pytest.raises(InstantiationException, match="its last 60 rows would never train; use null"):
        instantiate(make_cfg("method=dept", "method.max_positions=512").method.module, embedding=nn.Embedding(10, 8))
    with pytest.raises(ValueError, match=r"method.max_positions \(s\) or dataset.max_length"):
        DecomposedPromptTuning(nn.Embedding(10, 8), prompt_length=3, rank=2, init="random")


def test_fast_dev_run_with_the_reference_optimizer(make_cfg):
    # test_configs runs every method with the default callbacks (FLOP counter included); this one with AdamW
    overrides = ["method=dept", "optimizer=adamw", "trainer.fast_dev_run=true", "callbacks=none", *SYNTHETIC]
    results = run(make_cfg(*overrides))
    assert results["status"] == "completed"
    # d=128, s = 128 - 60 = 68: r = (100 - 60) * 128 // (68 + 128) = 26 from PT-100
    assert results["params"]["trainable"] == 60 * 128 + 26 * (68 + 128)


def test_dept_learns(make_cfg):
    system, batch = build(make_cfg(*DEPT, "dataset.batch_size=8", "method.lr=0.3", "method.lr_lowrank=1e-2"))
    optimizer = torch.optim.AdamW(system.param_groups(), lr=0.3)  # the prompt's group has no lr: method.lr applies
    losses = fit_fixed_batch(system, batch, optimizer, 30)
    assert min(losses[-5:]) <= 0.5 * losses[0], losses[::10]
    assert system.prompt.lora_b.abs().sum() > 0  # the low-rank pair moved too
