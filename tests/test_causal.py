"""Decoder-only (causal) backbones: every method of this step runs and learns on the tiny Llama and GPT-2; the
frozen weights stay frozen; an example's loss and generation do not depend on its batch; the KV-cache decode equals
a token-by-token one; the prompt reads the source only (IDPG/LoPA pool the backbone's last real source token); a
local folder loads its own weights or is refused; FPT on an architecture it cannot reduce (or a stack the backbone
lacks) is refused before anything is built (FPT on causal backbones itself: test_fpt_causal.py)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from conftest import ROOT
from helpers import SYNTHETIC, build, build_with_data, fit_fixed_batch
from transformers import ByT5Tokenizer, GPT2Config, GPT2LMHeadModel

from smop.backbones import BackboneKindError, build_backbone
from smop.checks import Refused
from smop.costs import eager_attention, inference_flops
from smop.run import run

MODELS = ["llama-tiny", "gpt2-tiny"]
METHODS = [
    "prompt_tuning",
    "p_tuning",
    "smop",
    "dept",
    "idpg",
    "lopa",
    "lora_prompt_tuning",
    "lora_p_tuning",
    "lora_smop",
    "full",
]
ROUTERS = ["top1_perturbed", "top1", "top2", "gumbel", "stochastic", "single"]
FAST = ["trainer.fast_dev_run=true", *SYNTHETIC]


def method_overrides(method: str) -> list[str]:
    return [f"method={method}"] + ([] if method == "full" else ["method.prompt_length=5"])


@pytest.mark.parametrize("model", MODELS)
@pytest.mark.parametrize("method", METHODS)
def test_fast_dev_run_every_method(make_cfg, model, method):
    results = run(make_cfg(f"model={model}", *method_overrides(method), *FAST))
    assert results["status"] == "completed"
    assert results["cost"]["inference_flops_per_example"] > 0 and results["cost"]["train_flops_per_example"] > 0
    assert set(results["metrics"]["test"]) >= {"accuracy"}


@pytest.mark.parametrize("model", MODELS)
@pytest.mark.parametrize("router", ROUTERS)
def test_fast_dev_run_every_router(make_cfg, model, router):
    results = run(make_cfg(f"model={model}", f"router={router}", *FAST))
    assert results["status"] == "completed" and results["router"] == router
    assert set(results["routing"]["counts"]) == {"train", "val", "test"}


@pytest.mark.slow
@pytest.mark.parametrize("model", MODELS)
@pytest.mark.parametrize("overrides", [["method=prompt_tuning", "method.prompt_length=20"], ["method=smop"]])
def test_loss_on_a_fixed_batch_halves(make_cfg, model, overrides):
    system, batch = build(make_cfg(f"model={model}", *overrides, "dataset.batch_size=16", *SYNTHETIC))
    optimizer = torch.optim.AdamW(system.param_groups(), lr=0.1)
    losses = fit_fixed_batch(system, batch, optimizer, 100)
    assert min(losses[-5:]) <= 0.5 * losses[0], losses[::10]


@pytest.mark.parametrize("model", MODELS)
@pytest.mark.parametrize("method", ["prompt_tuning", "smop", "dept", "lora_smop"])
def test_a_step_leaves_the_frozen_weights_bit_for_bit(make_cfg, model, method):
    system, batch = build(make_cfg(f"model={model}", *method_overrides(method), *SYNTHETIC))
    frozen = {k: v.clone() for k, v in system.backbone.named_parameters() if not v.requires_grad}
    assert frozen and all("lora_" not in k for k in frozen)
    optimizer = torch.optim.AdamW(system.param_groups(), lr=0.1)
    fit_fixed_batch(system, batch, optimizer, 1)
    for name, value in system.backbone.named_parameters():
        if name in frozen:
            assert torch.equal(value, frozen[name]), name
    assert system.prompt is not None and any(p.grad is not None for p in system.prompt.parameters())


def per_example_loss(system, batch) -> torch.Tensor:
    _, logits, _ = system(batch["input_ids"], batch["attention_mask"], batch["labels"])
    losses = F.cross_entropy(logits.float().transpose(1, 2), batch["labels"], ignore_index=-100, reduction="none")
    return losses.sum(1) / batch["labels"].ne(-100).sum(1)


def with_long_neighbours(datamodule, row: dict, extra: int = 40) -> dict:
    """`row` first, then two rows much longer than it (their inputs repeated, their targets three times as long), in
    one padded batch."""
    longer = [
        dict(r, input_ids=r["input_ids"] * 3 + r["input_ids"][:extra], labels=r["labels"][:-1] * 3 + r["labels"][-1:])
        for r in datamodule.splits["train"][1:3]
    ]
    return datamodule.collate([row, *longer])


@pytest.mark.parametrize("model", MODELS)
@pytest.mark.parametrize("method", ["prompt_tuning", "smop", "dept"])
def test_loss_and_generation_do_not_depend_on_the_batch(make_cfg, model, method):
    system, datamodule = build_with_data(make_cfg(f"model={model}", *method_overrides(method), *SYNTHETIC))
    system.eval()
    row = datamodule.splits["train"][0]
    alone, crowded = datamodule.collate([row]), with_long_neighbours(datamodule, row)
    assert crowded["input_ids"].shape[1] > 3 * alone["input_ids"].shape[1]
    assert crowded["labels"].shape[1] > alone["labels"].shape[1]
    with torch.no_grad():
        torch.testing.assert_close(per_example_loss(system, crowded)[:1], per_example_loss(system, alone))
    system.max_new_tokens = 6
    embeds, mask, _ = system.encoder_inputs(alone["input_ids"], alone["attention_mask"])
    solo = system.kind.generate(system.backbone, embeds, mask, 6, system.tokenizer)
    embeds, mask, _ = system.encoder_inputs(crowded["input_ids"], crowded["attention_mask"])
    together = system.kind.generate(system.backbone, embeds, mask, 6, system.tokenizer)
    assert torch.equal(together[0, : solo.shape[1]], solo[0])
    assert torch.equal(
        system.predict_labels(crowded["input_ids"], crowded["attention_mask"])[0][:1],
        system.predict_labels(alone["input_ids"], alone["attention_mask"])[0],
    )


def decode_by_hand(system, input_ids: list[int], steps: int) -> list[int]:
    """Greedy, one token at a time, the whole sequence recomputed each time: no padding, no cache."""
    ids = torch.tensor([input_ids])
    embeds, _, _ = system.encoder_inputs(ids, torch.ones_like(ids))
    table = system.backbone.get_input_embeddings()
    out: list[int] = []
    for _ in range(steps):
        logits = system.backbone(inputs_embeds=embeds).logits
        token = int(logits[0, -1].argmax())
        out.append(token)
        if token == system.tokenizer.eos_token_id:
            break
        embeds = torch.cat([embeds, table(torch.tensor([[token]]))], dim=1)
    return out


@pytest.mark.parametrize("model", MODELS)
def test_cached_generation_equals_a_token_by_token_decode(make_cfg, model):
    system, datamodule = build_with_data(make_cfg(f"model={model}", "method=smop", *SYNTHETIC))
    system.eval()
    rows = datamodule.splits["train"][:4]  # of different lengths: padded in one batch
    assert len({len(r["input_ids"]) for r in rows}) > 1
    batch = datamodule.collate(rows)
    with torch.no_grad():
        embeds, mask, _ = system.encoder_inputs(batch["input_ids"], batch["attention_mask"])
        generated = system.kind.generate(system.backbone, embeds, mask, 8, system.tokenizer)
        for i, row in enumerate(rows):
            expected = decode_by_hand(system, row["input_ids"], 8)
            assert generated[i, : len(expected)].tolist() == expected
            assert set(generated[i, len(expected) :].tolist()) <= {system.tokenizer.pad_token_id}


@pytest.mark.parametrize("model", MODELS)
@pytest.mark.parametrize("method", ["prompt_tuning", "p_tuning", "smop", "dept", "idpg", "lopa"])
def test_the_prompt_reads_the_source_only_and_is_the_same_in_training_and_generation(make_cfg, model, method):
    system, batch = build(make_cfg(f"model={model}", *method_overrides(method), *SYNTHETIC))
    system.eval()  # no router noise, no dropout: the two passes must then see the same prompt
    seen = []
    system.prompt.register_forward_hook(lambda module, args, out: seen.append((args[0].shape, out.prompt.clone())))
    with torch.no_grad():
        system(batch["input_ids"], batch["attention_mask"], batch["labels"])
        system.predict_labels(batch["input_ids"], batch["attention_mask"])
    (train_shape, train_prompt), (generate_shape, generate_prompt) = seen
    assert train_shape == generate_shape == (*batch["input_ids"].shape, system.backbone.config.hidden_size)
    assert torch.equal(train_prompt, generate_prompt)


def test_causal_data_has_no_eos_in_the_source_and_eos_after_the_label_word(make_cfg):
    system, datamodule = build_with_data(make_cfg("model=llama-tiny", "method=smop", *SYNTHETIC))
    eos = system.tokenizer.eos_token_id
    row = datamodule.splits["train"][0]
    assert eos not in row["input_ids"]
    word = datamodule.task.label_words[row["label_index"]]
    assert row["labels"] == [byte + 3 for byte in word.encode()] + [eos]  # ByT5: id = byte + 3; no BOS
    assert datamodule.max_target_length == 2 and system.max_new_tokens == 2
    assert datamodule.budget == 128 - 5 - 2  # prompt, source and target fit dataset.max_length


@pytest.fixture(scope="module")
def llama_folder(tmp_path_factory):
    """A saved tiny Llama (llama-tiny's architecture) with its tokenizer, and its in-memory original."""
    from conftest import compose_config

    folder = tmp_path_factory.mktemp("llama")
    cfg = compose_config(["model=llama-tiny"], folder / "cfg")
    torch.manual_seed(0)
    model = build_backbone("tiny", dict(cfg.model.tiny)).eval()
    model.save_pretrained(folder / "model")
    ByT5Tokenizer().save_pretrained(folder / "model")
    return folder / "model", model


def test_a_local_llama_folder_loads_its_own_weights(llama_folder):
    folder, original = llama_folder
    loaded = build_backbone(str(folder)).eval()
    ids = torch.tensor([[5, 9, 200, 17, 1]])
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=ids).logits, original(input_ids=ids).logits)


def test_model_local_trains_from_the_folder(make_cfg, llama_folder):
    folder, _ = llama_folder
    results = run(
        make_cfg(
            "model=local",
            f"model.name_or_path={folder}",
            "+model.lora_target_modules=[q_proj,v_proj]",
            "method=lora_smop",
            *FAST,
        )
    )
    assert results["status"] == "completed" and results["model"] == str(folder)


def test_a_folder_whose_weights_do_not_fit_its_config_is_refused(llama_folder, tmp_path):
    folder, _ = llama_folder
    GPT2LMHeadModel(GPT2Config(vocab_size=384, n_embd=32, n_layer=1, n_head=2)).save_pretrained(tmp_path)
    (tmp_path / "config.json").write_text((folder / "config.json").read_text())  # a Llama config over GPT-2 weights
    with pytest.raises(BackboneKindError, match=rf"{tmp_path}: the weights there do not fit its llama config"):
        build_backbone(str(tmp_path))


@pytest.mark.parametrize("model", MODELS)
def test_idpg_and_lopa_pool_the_causal_backbones_last_real_source_token(make_cfg, model):
    """With method.encoder=backbone on a decoder-only LM, x is the decoder stack's output at each row's last real
    token of the source (METHODS.md's pooling for decoder-only encoders), whatever padding its batch needs."""
    system, datamodule = build_with_data(make_cfg(f"model={model}", "method=lopa", *SYNTHETIC))
    system.eval()
    rows = datamodule.splits["train"][:6]
    batch = datamodule.collate(rows)
    embeds = system.backbone.get_input_embeddings()(batch["input_ids"])
    pooled = system.prompt.encoder(embeds, batch["attention_mask"], None)
    for i, row in enumerate(rows):
        ids = torch.tensor([row["input_ids"]])
        with torch.no_grad():
            hidden = system.backbone.base_model(
                inputs_embeds=system.backbone.get_input_embeddings()(ids)
            ).last_hidden_state
        torch.testing.assert_close(pooled[i], hidden[0, -1], rtol=1e-5, atol=1e-5)


def test_fpt_is_refused_on_an_unsupported_architecture_before_anything_is_built(make_cfg, tmp_path):
    """GPT-NeoX is a causal LM whose layers and FFN (dense_h_to_4h, dense_4h_to_h) FPT does not know."""
    supported = r"t5, mt5, llama, mistral, qwen2, qwen3, phi3, phi, gpt2, codegen"
    with pytest.raises(Refused, match=rf"method=fpt does not support model_type=gpt_neox \(causal .*: {supported}$"):
        run(make_cfg("model=gpt2-tiny", "model.tiny.model_type=gpt_neox", "method=fpt", *FAST))
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["status"] == "failed" and results["params"] is None


def test_the_fpt_callback_refuses_a_stack_the_causal_backbone_lacks(make_cfg):
    with pytest.raises(
        Refused, match=r"callbacks.fpt.stacks=\['encoder'\]: a llama backbone \(causal.* the stacks decoder"
    ):
        run(
            make_cfg(
                "model=llama-tiny", "method=prompt_tuning", "callbacks=fpt", "callbacks.fpt.stacks=[encoder]", *FAST
            )
        )


def test_inference_flops_of_the_tiny_llama_are_the_analytic_count_with_attention(make_cfg):
    """One pass over prompt (5) + source (n) + target (t) = T positions: per position the four attention
    projections, the gated MLP and the LM head, plus the T x T attention scores and their weighted sum."""
    system, batch = build(make_cfg("model=llama-tiny", "method=prompt_tuning", "method.prompt_length=5", *SYNTHETIC))
    n = int(batch["attention_mask"][0].sum())
    one = {k: v[:1, :n] if k in ("input_ids", "attention_mask") else v[:1] for k, v in batch.items()}
    positions = 5 + n + int(one["labels"].ne(-100).sum())
    d, ff, vocab = 128, 256, 384
    with eager_attention(system):
        counted = inference_flops(system, one)
    assert counted == positions * (4 * d * d + 3 * d * ff + d * vocab) + 2 * positions * positions * d


@pytest.mark.slow
def test_train_py_runs_a_causal_backbone_and_refuses_fpt_on_an_unsupported_one_in_one_line(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "WANDB_MODE": "offline"}

    def train(*overrides: str, folder: str) -> subprocess.CompletedProcess:
        command = [sys.executable, "train.py", *overrides, f"hydra.run.dir={tmp_path / folder}"]
        return subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)

    done = train("model=llama-tiny", "trainer.fast_dev_run=true", *SYNTHETIC, folder="ok")
    assert done.returncode == 0, done.stderr[-2000:]
    assert json.loads((tmp_path / "ok" / "results.json").read_text())["status"] == "completed"
    refused = train("model=gpt2-tiny", "model.tiny.model_type=gpt_neox", "method=fpt", folder="fpt")
    assert refused.returncode == 1
    (line,) = [line for line in refused.stderr.splitlines() if not line.startswith("INFO: ")]
    assert line.startswith("train.py: method=fpt does not support model_type=gpt_neox (causal backbone")


def test_predict_encodes_as_training_and_labels_alike_in_any_batch(make_cfg, tmp_path):
    """smop.predict on a causal checkpoint: the source without EOS, as in training; the same labels whatever the
    batch size (the prompt after the left padding)."""
    from smop.data.synthetic import synthetic_mixture
    from smop.loading import load
    from smop.predict import predict_file

    short = ["trainer.max_epochs=1", "trainer.limit_train_batches=2", "trainer.limit_val_batches=1", "test=false"]
    cfg = make_cfg("model=llama-tiny", "method=smop", *SYNTHETIC, *short, "callbacks.flop_counter=null", "logger=[]")
    assert run(cfg)["status"] == "completed"
    loaded = load(next((tmp_path / "checkpoints").glob("best-*.ckpt")), device="cpu")
    assert loaded.encode([{"text": "abc", "label": 0}]) == [[ord(c) + 3 for c in "abc"]]
    source = tmp_path / "in.jsonl"
    source.write_text("".join(json.dumps({"text": r["text"]}) + "\n" for r in synthetic_mixture(9, seed=3)))
    outputs = []
    for batch_size in (1, 9):
        predict_file(loaded, source, tmp_path / f"out{batch_size}.jsonl", batch_size, progress=False)
        outputs.append((tmp_path / f"out{batch_size}.jsonl").read_text())
    assert len(outputs[0].splitlines()) == 9 and outputs[0] == outputs[1]
