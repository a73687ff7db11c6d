"""Peer check: our prompt tuning on a decoder-only LM is peft's PromptTuningConfig(CAUSAL_LM) on the same weights
and prompt, fed the same tokens (input_ids = source + target, labels -100 on the source): the same loss and the same
logits at the positions that predict the target, for batches without padding and for batches padded after the
target. Padding before the real tokens (left padding) is where the two differ: peft puts its prompt before the
padding and its positions count the padding; ours sits right before the first real token. docs/reference_differences.md
says so."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import compose_config
from helpers import SYNTHETIC, build_with_data
from peft import PeftModel, PromptTuningConfig, get_peft_model

LENGTH = 5
MODELS = ["llama-tiny", "gpt2-tiny"]


@pytest.fixture(scope="module", params=MODELS)
def systems(request, tmp_path_factory):
    """Our system (prompt moved away from its init), its datamodule, and peft's model with the same prompt."""
    overrides = [f"model={request.param}", "method=prompt_tuning", f"method.prompt_length={LENGTH}", *SYNTHETIC]
    system, datamodule = build_with_data(compose_config(overrides, tmp_path_factory.mktemp("peer")))
    with torch.no_grad():
        system.prompt.prompt.add_(torch.randn(system.prompt.prompt.shape, generator=torch.Generator().manual_seed(3)))
    system.eval()
    config = PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=LENGTH)
    theirs = get_peft_model(copy.deepcopy(system.backbone), config).eval()
    with torch.no_grad():
        theirs.prompt_encoder["default"].embedding.weight.copy_(system.prompt.prompt)
    return system, datamodule, theirs


def peft_batch(rows: list[dict], left: bool = False) -> dict[str, torch.Tensor]:
    """source + target per row, labels -100 on the source, padded (right, or left) to the longest row."""
    width = max(len(r["input_ids"]) + len(r["labels"]) for r in rows)
    batch: dict[str, list[list[int]]] = {"input_ids": [], "attention_mask": [], "labels": []}
    for r in rows:
        ids, labels = r["input_ids"] + r["labels"], [-100] * len(r["input_ids"]) + r["labels"]
        pad = width - len(ids)
        for key, row, value in (("input_ids", ids, 0), ("attention_mask", [1] * len(ids), 0), ("labels", labels, -100)):
            batch[key].append([value] * pad + row if left else row + [value] * pad)
    return {key: torch.tensor(value) for key, value in batch.items()}


def peft_target_logits(theirs: PeftModel, rows: list[dict], left: bool = False) -> tuple[torch.Tensor, list]:
    """peft's loss and, per row, its logits at the positions that predict each target token (a causal LM's labels
    are aligned with its inputs and shifted inside: target token j is predicted at position j - 1)."""
    batch = peft_batch(rows, left)
    with torch.no_grad():
        out = theirs(**batch)
    width, length = batch["input_ids"].shape[1], theirs.active_peft_config.num_virtual_tokens
    logits = []
    for b, r in enumerate(rows):
        n, t = len(r["input_ids"]), len(r["labels"])
        start = length + (width - n - t if left else 0) + n - 1
        logits.append(out.logits[b, start : start + t])
    return out.loss, logits


def ours(system, datamodule, rows: list[dict]) -> tuple[torch.Tensor, torch.Tensor]:
    """Our loss and target logits on the training collate's batch (source right-padded, targets -100-padded)."""
    batch = datamodule.collate(rows)
    with torch.no_grad():
        loss, logits, _ = system(batch["input_ids"], batch["attention_mask"], batch["labels"])
    return loss, logits


def test_our_prompt_tuning_equals_peft_without_padding_and_with_right_padding(systems):
    system, datamodule, theirs = systems
    rows = datamodule.splits["train"][:6]
    shortest = min(len(r["input_ids"]) for r in rows)
    assert len({len(r["input_ids"]) for r in rows}) > 1 and len({len(r["labels"]) for r in rows}) == 1
    unpadded = [dict(r, input_ids=r["input_ids"][:shortest]) for r in rows]  # one length: no padding anywhere
    for batch in (unpadded, rows):  # then rows of different lengths: peft's batch padded after the target
        loss, logits = ours(system, datamodule, batch)
        peft_loss, peft_logits = peft_target_logits(theirs, batch)
        torch.testing.assert_close(peft_loss, loss, rtol=1e-5, atol=1e-5)
        for b, r in enumerate(batch):
            torch.testing.assert_close(peft_logits[b], logits[b, : len(r["labels"])], rtol=1e-4, atol=1e-4)
    assert not torch.allclose(logits[0], logits[1])  # rows differ: equal logits mean something
    prompt_free = copy.deepcopy(theirs)
    with torch.no_grad():
        prompt_free.prompt_encoder["default"].embedding.weight.zero_()
    assert not torch.allclose(peft_target_logits(prompt_free, rows)[1][0], logits[0], atol=1e-2)  # the prompt counts


def test_peft_puts_its_prompt_before_left_padding_where_ours_follows_it(systems):
    """Left-padded (as batched decoder-only generation needs): peft's prompt sits before the padding, at positions
    0..L-1, and the real tokens' positions count the padding; a row without padding is the same in both."""
    system, datamodule, theirs = systems
    rows = datamodule.splits["train"][:4]
    longest = max(len(r["input_ids"]) for r in rows)
    _, logits = ours(system, datamodule, rows)
    _, peft_logits = peft_target_logits(theirs, rows, left=True)
    for b, r in enumerate(rows):
        if len(r["input_ids"]) == longest:
            torch.testing.assert_close(peft_logits[b], logits[b, : len(r["labels"])], rtol=1e-4, atol=1e-4)
        else:
            assert not torch.allclose(peft_logits[b], logits[b, : len(r["labels"])], atol=1e-2), b
    assert any(len(r["input_ids"]) < longest for r in rows)


def test_greedy_generation_equals_peft_generate_without_the_cache(systems):
    """One row at a time (no padding). peft's generate with use_cache=True leaves its own forward after a token or
    two on these models (peft 0.21, transformers 5.24; docs/reference_differences.md), so use_cache=False."""
    system, datamodule, theirs = systems
    for r in datamodule.splits["train"][:3]:
        ids = torch.tensor([r["input_ids"]])
        with torch.no_grad():
            embeds, mask, _ = system.encoder_inputs(ids, torch.ones_like(ids))
            new = system.kind.generate(system.backbone, embeds, mask, 6, system.tokenizer)
            out = theirs.generate(
                input_ids=ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=new.shape[1],
                do_sample=False,
                use_cache=False,
                eos_token_id=system.tokenizer.eos_token_id,
                pad_token_id=system.tokenizer.pad_token_id,
            )
        assert out[0, ids.shape[1] :].tolist() == new[0].tolist()
