"""IDPG and LoPA: prompts per instance from a frozen encoder (the backbone's or a separate one by name),
deterministic in eval, only the generators train; the reference's bottleneck width, pooling per encoder kind,
left truncation of the encoder's input and optimizer recipes (METHODS.md)."""

from __future__ import annotations

import json
import shutil
import string
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from helpers import SYNTHETIC, build, fit_fixed_batch
from hydra.errors import InstantiationException
from transformers import (
    BertConfig,
    BertModel,
    BertTokenizer,
    ByT5Tokenizer,
    CLIPTextConfig,
    CLIPTextModel,
    GPT2Config,
    GPT2Model,
    T5Config,
    T5Model,
)
from transformers.modeling_outputs import BaseModelOutputWithPooling
from transformers.models.t5.modeling_t5 import T5Stack

from smop.backbones import HubUnreachableError, build_tokenizer
from smop.builders import build_datamodule, count_parameters
from smop.costs import eager_attention, inference_flops, train_step_flops
from smop.data.synthetic import synthetic_mixture
from smop.export import export
from smop.loading import load, pad_inputs
from smop.methods.instance import PretrainedEncoder, encoder_tokenizer, pool
from smop.methods.smop import masked_mean
from smop.run import run
from smop.serving import PromptServer

METHODS = ["idpg", "lopa"]
D, M, R = 128, 10, 4  # tiny T5's width, prompt length, LoPA rank
H = D  # the generators' bottleneck: the encoder's width by default (both LoPA repositories), here the backbone's


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
    # whether the generators learn at all: without the backbone's dropout (live by default, as in the reference),
    # whose noise would blur a 30-step check
    overrides = [*overrides, "method.train_dropout=false", "dataset.batch_size=8"]
    system, batch = build(make_cfg(f"method={method}", *overrides, *SYNTHETIC))
    optimizer = torch.optim.AdamW(system.param_groups(), lr=system.hparams["method"]["lr"])
    losses = fit_fixed_batch(system, batch, optimizer, 30)
    assert min(losses[-5:]) <= 0.5 * losses[0], losses[::5]


# --- a separate encoder by name: method.encoder=<hub name or local folder> ----------------------------------------
ENC_WIDTH, ENC_FF, ENC_POSITIONS = 32, 64, 16  # the tiny BERT below: narrower than the T5, 16 positions


@pytest.fixture(scope="module")
def encoders(tmp_path_factory) -> dict[str, Path]:
    """Local encoder folders as a hub download would leave them, one per kind: a 1-layer BERT with a character-level
    WordPiece tokenizer (an encoder-only masked LM, with a pooler), the same with 600 positions (longer than the
    reference's 512), a 1-layer T5 with the byte tokenizer (an encoder-decoder: its encoder), a 1-layer GPT-2
    (decoder-only) and a CLIP text model (neither kind, with a pooler output: as a custom embedding model like
    CodeSage), the last two reading the BERT's tokenizer."""
    root = tmp_path_factory.mktemp("encoders")
    chars = string.ascii_lowercase + string.digits + string.punctuation
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *chars, *(f"##{c}" for c in chars)]
    tokenizer = BertTokenizer(vocab={word: i for i, word in enumerate(vocab)})
    sizes = {"num_hidden_layers": 1, "num_attention_heads": 2, "intermediate_size": ENC_FF}
    for name, positions in (("bert", ENC_POSITIONS), ("long_bert", 600)):  # 16: shorter than many inputs
        config = BertConfig(vocab_size=len(vocab), hidden_size=ENC_WIDTH, max_position_embeddings=positions, **sizes)
        BertModel(config).save_pretrained(root / name)
        tokenizer.save_pretrained(root / name)
    T5Model(
        T5Config(vocab_size=384, d_model=ENC_WIDTH, d_kv=8, d_ff=ENC_FF, num_layers=1, num_heads=2)
    ).save_pretrained(root / "t5")
    ByT5Tokenizer().save_pretrained(root / "t5")
    special = {"bos_token_id": 2, "eos_token_id": 3, "pad_token_id": 0}  # [CLS], [SEP], [PAD]
    gpt2 = GPT2Config(
        vocab_size=len(vocab), n_embd=ENC_WIDTH, n_layer=1, n_head=2, n_positions=ENC_POSITIONS, **special
    )
    GPT2Model(gpt2).save_pretrained(root / "gpt2")
    clip = CLIPTextConfig(
        vocab_size=len(vocab), hidden_size=ENC_WIDTH, max_position_embeddings=ENC_POSITIONS, **sizes, **special
    )
    CLIPTextModel(clip).save_pretrained(root / "clip")
    for name in ("gpt2", "clip"):
        tokenizer.save_pretrained(root / name)
    return {name: root / name for name in ("bert", "long_bert", "t5", "gpt2", "clip")}


def encoder_prompts(system, batch, embeds=None) -> torch.Tensor:
    embeds = system.backbone.get_input_embeddings()(batch["input_ids"]) if embeds is None else embeds
    return system.prompt(embeds, batch["attention_mask"], system.prompt_inputs(batch)).prompt


def expected_pooling(output, mask: torch.Tensor, pooling: str) -> torch.Tensor:
    """Each pooling spelled out on a right-padded batch, independently of `pool`."""
    hidden = output.last_hidden_state
    if pooling == "cls":
        return hidden[:, 0]
    if pooling == "last":  # right padding: the real tokens are the first mask.sum() of each row
        return hidden[torch.arange(hidden.shape[0]), mask.sum(1) - 1]
    if pooling == "pooler":
        return output.pooler_output / output.pooler_output.norm(dim=-1, keepdim=True)
    return masked_mean(hidden, mask)  # padding excluded


@pytest.mark.parametrize(
    ("method", "encoder", "pooling"),
    [
        ("idpg", "bert", "mean"),
        ("lopa", "bert", "cls"),
        ("idpg", "t5", "mean"),
        ("lopa", "bert", "pooler"),
        ("idpg", "gpt2", "last"),
    ],
)
def test_separate_encoder_prompts_read_its_own_ids_differ_and_are_deterministic(
    make_cfg, encoders, method, encoder, pooling
):
    overrides = [f"method.encoder={encoders[encoder]}", f"method.encoder_pooling={pooling}"]
    system, batch = build(make_cfg(f"method={method}", *overrides, *SYNTHETIC))
    system.eval()
    mask = batch["encoder_attention_mask"]
    assert batch["encoder_input_ids"].shape == mask.shape and (mask.sum(1) < mask.shape[1]).any()  # padded rows
    with torch.no_grad():
        first, second = encoder_prompts(system, batch), encoder_prompts(system, batch)
        # the instance vector comes from the encoder's own ids alone, not from the backbone's embeddings
        unrelated = encoder_prompts(system, batch, torch.zeros(*batch["input_ids"].shape, D))
        pooled = system.prompt.pooled(None, None, system.prompt_inputs(batch))
        model = system.prompt.encoder.model
        output = model(input_ids=batch["encoder_input_ids"], attention_mask=mask)
    assert isinstance(model, {"bert": BertModel, "t5": T5Stack, "gpt2": GPT2Model}[encoder])  # T5: its encoder
    assert first.shape == (batch["input_ids"].shape[0], M, D)
    assert torch.equal(first, second) and torch.equal(first, unrelated)
    assert not torch.equal(first[0], first[1])  # LoPA's gate starts near 1/2 (N(0, 0.02) heads): close, not equal
    torch.testing.assert_close(pooled, expected_pooling(output, mask, pooling))
    with pytest.raises(ValueError, match="has no encoder_input_ids: build the DataModule with encoder_tokenizer"):
        system.prompt(system.backbone.get_input_embeddings()(batch["input_ids"]), batch["attention_mask"])


@pytest.mark.parametrize("method", METHODS)
def test_separate_encoder_is_frozen_in_eval_mode_and_out_of_checkpoints(make_cfg, encoders, method):
    extra = ["method.shared_lr=0.1"] if method == "lopa" else []  # LoPA's own parameter groups
    system, batch = build(make_cfg(f"method={method}", f"method.encoder={encoders['bert']}", *extra, *SYNTHETIC))
    encoder = system.prompt.encoder
    encoder_weights = {name: p.clone() for name, p in encoder.named_parameters()}
    assert encoder_weights and not any(p.requires_grad for p in encoder.parameters())
    trainable = {name for name, p in system.named_parameters() if p.requires_grad}
    assert trainable and not any(name.startswith("prompt.encoder.") for name in trainable)
    grouped = {id(p) for group in system.param_groups() for p in group["params"]}
    assert grouped == {id(p) for p in system.parameters() if p.requires_grad}
    parameters = count_parameters(system)  # the encoder counts in the total, not among the trainable
    assert parameters["total"] - parameters["trainable"] >= sum(p.numel() for p in encoder.parameters())
    optimizer = torch.optim.AdamW(system.param_groups(), lr=1e-2)
    system.train()
    assert not any(m.training for m in encoder.modules())  # no dropout in the frozen encoder
    system(batch["input_ids"], batch["attention_mask"], batch["labels"], system.prompt_inputs(batch))[0].backward()
    optimizer.step()
    assert all(torch.equal(p, encoder_weights[name]) for name, p in encoder.named_parameters())
    assert not any(
        key.startswith("prompt.encoder.") for key in system.state_dict()
    )  # rebuilt from its name, never saved
    checkpoint = {"state_dict": system.state_dict()}
    system.on_save_checkpoint(checkpoint)
    assert set(checkpoint["state_dict"]) == trainable


@pytest.mark.parametrize("method", METHODS)
def test_a_fine_tuned_encoder_trains_at_its_own_lr_with_dropout_and_is_checkpointed(make_cfg, encoders, method):
    overrides = [f"method.encoder={encoders['bert']}", "method.train_encoder=true", "method.encoder_lr=0.05"]
    system, batch = build(make_cfg(f"method={method}", *overrides, *SYNTHETIC))
    encoder = system.prompt.encoder
    before = {name: p.clone() for name, p in encoder.named_parameters()}
    assert all(p.requires_grad for p in encoder.parameters())
    *generators, encoder_group = system.param_groups()  # the backbone has no trainable weights: no group of its own
    assert encoder_group["lr"] == 0.05
    assert {id(p) for p in encoder_group["params"]} == {id(p) for p in encoder.parameters()}
    assert generators and all("lr" not in group for group in generators)  # method.lr
    optimizer = torch.optim.AdamW(system.param_groups(), lr=1e-2)
    system.train()
    assert any(m.training for m in encoder.modules())  # its dropout is live while it trains
    system(batch["input_ids"], batch["attention_mask"], batch["labels"], system.prompt_inputs(batch))[0].backward()
    optimizer.step()
    assert not all(torch.equal(p, before[name]) for name, p in encoder.named_parameters())
    system.eval()
    assert not any(m.training for m in encoder.modules())
    with torch.no_grad():
        assert torch.equal(encoder_prompts(system, batch), encoder_prompts(system, batch))
    checkpoint = {"state_dict": system.state_dict()}
    system.on_save_checkpoint(checkpoint)
    prefix = "prompt.encoder."
    saved = {key.removeprefix(prefix) for key in checkpoint["state_dict"] if key.startswith(prefix)}
    assert saved == set(before)  # the fine-tuned weights are the run's result: saved, not rebuilt from the name


def test_fine_tuning_the_backbones_own_encoder_is_refused(make_cfg):
    message = "method.train_encoder=true fine-tunes a separate encoder, but method.encoder=backbone"
    with pytest.raises(InstantiationException, match=message):
        build(make_cfg("method=idpg", "method.train_encoder=true", *SYNTHETIC))


def test_a_run_with_a_fine_tuned_encoder_exports_and_reloads_it(make_cfg, encoders, tmp_path):
    overrides = ["trainer.max_epochs=1", "trainer.limit_train_batches=2", "trainer.limit_val_batches=1", "test=false"]
    options = [f"method.encoder={encoders['bert']}", "method.train_encoder=true", "method.encoder_lr=0.05"]
    assert run(make_cfg("method=idpg", *options, *overrides, *SYNTHETIC))["status"] == "completed"
    checkpoint = next((tmp_path / "checkpoints").glob("best-*.ckpt"))
    folder = export(checkpoint, tmp_path / "export")
    from_checkpoint, from_folder = load(checkpoint, device="cpu"), load(folder, device="cpu")
    pristine = PretrainedEncoder(str(encoders["bert"]), "mean", trainable=True).state_dict()  # as on disk
    for loaded in (from_checkpoint, from_folder):
        weights = loaded.system.prompt.encoder.state_dict()
        assert set(weights) == set(pristine)
        assert not all(torch.equal(value, pristine[key]) for key, value in weights.items())  # the trained ones
    examples = [{"text": record["text"]} for record in synthetic_mixture(6, seed=5)]
    assert from_folder.label(examples) == from_checkpoint.label(examples)


def test_datamodule_adds_the_encoder_ids_and_leaves_the_rest_as_it_was(make_cfg, encoders):
    cfg = make_cfg("method=idpg", f"method.encoder={encoders['bert']}", *SYNTHETIC)
    tokenizer = build_tokenizer(cfg.model.name_or_path)
    datamodule = build_datamodule(cfg, tokenizer)
    cfg.method.encoder = "backbone"
    plain = build_datamodule(cfg, tokenizer)
    rows = datamodule.splits["train"][:8]
    lengths = [len(row["encoder_input_ids"]) for row in rows]
    assert max(lengths) == ENC_POSITIONS and min(lengths) < ENC_POSITIONS  # cut at the encoder's position table
    assert all(row["encoder_input_ids"][0] == 2 and row["encoder_input_ids"][-1] == 3 for row in rows)  # CLS .. SEP
    batch, reference = datamodule.collate(rows), plain.collate(plain.splits["train"][:8])
    assert set(batch) - set(reference) == {"encoder_input_ids", "encoder_attention_mask"}
    assert all(torch.equal(batch[key], value) for key, value in reference.items())
    assert batch["encoder_attention_mask"].sum(1).tolist() == lengths
    padded = batch["encoder_input_ids"][batch["encoder_attention_mask"] == 0]
    assert padded.numel() and (padded == 0).all()  # [PAD]


def test_flops_with_a_separate_encoder_exceed_plain_prompt_tuning(make_cfg, encoders):
    counts = {}
    for name, overrides in {
        "encoder": ["method=idpg", f"method.encoder={encoders['bert']}"],
        "pt": ["method=prompt_tuning", f"method.prompt_length={M}"],
    }.items():
        system, batch = build(make_cfg(*overrides, *SYNTHETIC))
        with eager_attention(system):
            counts[name] = (inference_flops(system, batch), train_step_flops(system, batch))
        if name == "encoder":
            tokens = batch["encoder_input_ids"].shape[1]
    generator = ENC_WIDTH * ENC_WIDTH + ENC_WIDTH * M * D  # IDPG's two linear layers, H = the encoder's width
    encoder = tokens * (4 * ENC_WIDTH * ENC_WIDTH + 2 * ENC_WIDTH * ENC_FF)  # its projections and FFN, one layer
    assert counts["encoder"][0] - counts["pt"][0] > generator + encoder
    assert counts["encoder"][1] - counts["pt"][1] > generator + encoder  # the training step runs it too


@pytest.mark.parametrize("method", METHODS)
def test_fast_dev_run_with_a_separate_encoder(make_cfg, encoders, method):
    # the default callbacks: the FLOP counter and the cost measurement run with the encoder's batch tensors
    cfg = make_cfg(f"method={method}", f"method.encoder={encoders['bert']}", "trainer.fast_dev_run=true", *SYNTHETIC)
    results = run(cfg)
    assert results["status"] == "completed"
    assert results["cost"]["inference_flops_per_example"] > 0 and results["cost"]["train_flops_per_example"] > 0


def test_a_run_with_a_separate_encoder_checkpoints_exports_predicts_and_serves(make_cfg, encoders, tmp_path):
    overrides = ["trainer.max_epochs=1", "trainer.limit_train_batches=2", "trainer.limit_val_batches=1", "test=false"]
    cfg = make_cfg("method=lopa", f"method.encoder={encoders['bert']}", *overrides, *SYNTHETIC)
    assert run(cfg)["status"] == "completed"
    checkpoint = next((tmp_path / "checkpoints").glob("best-*.ckpt"))
    state = torch.load(checkpoint, map_location="cpu", weights_only=True)["state_dict"]
    assert state and all(key.startswith("prompt.") and not key.startswith("prompt.encoder.") for key in state)
    folder = export(checkpoint, tmp_path / "export")
    examples = [{"text": record["text"]} for record in synthetic_mixture(6, seed=5)]
    from_checkpoint, from_folder = load(checkpoint, device="cpu"), load(folder, device="cpu")
    labels = from_checkpoint.label(examples)
    assert from_folder.label(examples) == labels
    server = PromptServer({"mix": folder}, device="cpu")
    assert [row["label_index"] for row in server.predict([("mix", example) for example in examples])] == labels
    # what reaches the backbone's encoder, [prompt ; input], is the same from the checkpoint, the folder and the server
    input_ids, attention_mask = pad_inputs(from_folder.encode(examples), 0)
    with torch.no_grad():
        inputs = [
            loaded.system.encoder_inputs(input_ids, attention_mask, loaded.prompt_inputs(examples))[0]
            for loaded in (from_checkpoint, from_folder)
        ]
        inputs.append(server.encoder_inputs(server.batch([("mix", example) for example in examples]))[0])
    assert not torch.equal(inputs[0][0, :M], inputs[0][1, :M])  # prompts per instance: the check has teeth
    for other in inputs[1:]:
        torch.testing.assert_close(other, inputs[0])


def test_an_unreachable_hub_encoder_says_how_to_run_offline(make_cfg):
    cfg = make_cfg("method=idpg", "method.encoder=nobody/no-such-encoder", *SYNTHETIC)
    message = r"method.encoder='nobody/no-such-encoder'(.|\n)*method.encoder=/path/to(.|\n)*method.encoder=backbone"
    with pytest.raises(HubUnreachableError, match=message):
        build(cfg)  # the DataModule asks for the encoder's tokenizer first
    with pytest.raises(HubUnreachableError, match=message):
        PretrainedEncoder("nobody/no-such-encoder", "mean")
    allowed = "method.encoder_pooling=max: allowed auto, mean, cls, pooler, last"
    with pytest.raises(InstantiationException, match=allowed):
        build(make_cfg("method=lopa", "method.encoder_pooling=max", *SYNTHETIC))


# --- the reference's choices (issue 10, points 15-18) ------------------------------------------------------------
@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize(("encoder", "width"), [(None, D), ("bert", ENC_WIDTH), ("t5", ENC_WIDTH)])
def test_the_bottleneck_is_the_encoders_width_unless_given(make_cfg, encoders, method, encoder, width):
    # both LoPA repositories: MLP_h=None -> the encoder's hidden size (768 for CodeBERT; here the tiny encoders')
    chosen = [f"method.encoder={encoders[encoder]}"] if encoder else []
    default, _ = build(make_cfg(f"method={method}", *chosen, *SYNTHETIC))
    given, _ = build(make_cfg(f"method={method}", *chosen, "method.hidden_size=24", *SYNTHETIC))
    for system, hidden in ((default, width), (given, 24)):
        prompt = system.prompt
        layers = [prompt.mlp] if method == "idpg" else [prompt.rows, prompt.cols]
        shapes = [(mlp[1].in_features, mlp[1].out_features, mlp[3].in_features) for mlp in layers]
        assert shapes == [(width, hidden, hidden)] * len(layers)  # x (width) -> H -> H -> out
    with pytest.raises(InstantiationException, match="method.hidden_size=0: a positive width, or null"):
        build(make_cfg(f"method={method}", "method.hidden_size=0", *SYNTHETIC))


def test_each_pooling_against_a_hand_computation():
    hidden = torch.tensor([[[1.0, 2.0], [3.0, 4.0], [9.0, 9.0]], [[5.0, 6.0], [7.0, 8.0], [0.0, 3.0]]])
    output = BaseModelOutputWithPooling(last_hidden_state=hidden, pooler_output=torch.tensor([[3.0, 4.0], [0.0, -2.0]]))
    right = torch.tensor([[1, 1, 0], [1, 1, 1]])  # row 0 right-padded
    expected = {
        "mean": [[2.0, 3.0], [4.0, 17 / 3]],  # over the real tokens only
        "cls": [[1.0, 2.0], [5.0, 6.0]],
        "last": [[3.0, 4.0], [0.0, 3.0]],  # the last REAL token: not row 0's padding
        "pooler": [[0.6, 0.8], [0.0, -1.0]],  # L2-normalised: [3, 4] / 5
    }
    for pooling, values in expected.items():
        torch.testing.assert_close(pool(output, right, pooling), torch.tensor(values))
    left = torch.tensor([[0, 1, 1], [0, 0, 1]])  # left padding (the reference pads decoder-only inputs so)
    torch.testing.assert_close(pool(output, left, "last"), torch.tensor([[9.0, 9.0], [0.0, 3.0]]))


@pytest.mark.parametrize(
    ("encoder", "pooling"), [(None, "mean"), ("bert", "cls"), ("t5", "mean"), ("gpt2", "last"), ("clip", "pooler")]
)
def test_auto_pooling_follows_the_encoders_kind(make_cfg, encoders, encoder, pooling):
    # the reference: CLS for RoBERTa/CodeBERT, the normalised pooler output for CodeSage (a model of its own kind),
    # the last token for decoder-only encoders; the masked mean for T5 (the backbone's own encoder included)
    chosen = [f"method.encoder={encoders[encoder]}"] if encoder else []
    cfg = make_cfg("method=idpg", *chosen, *SYNTHETIC)
    assert cfg.method.encoder_pooling == "auto"  # the default
    system, batch = build(cfg)
    assert system.prompt.encoder.pooling == pooling
    if encoder == "clip":  # what auto picked is what it computes: rows of norm 1
        with torch.no_grad():
            pooled = system.prompt.pooled(None, None, system.prompt_inputs(batch))
        torch.testing.assert_close(pooled.norm(dim=-1), torch.ones(pooled.shape[0]))


def test_pooler_is_refused_early_for_an_encoder_without_one(make_cfg, encoders):
    with pytest.raises(ValueError, match=r"method.encoder_pooling=pooler, but method.encoder=.*t5 \(t5\) gives no"):
        PretrainedEncoder(str(encoders["t5"]), "pooler")
    with pytest.raises(ValueError, match=r"method.encoder=.*gpt2 \(gpt2\) gives no pooler output: use auto, mean"):
        PretrainedEncoder(str(encoders["gpt2"]), "pooler")
    with pytest.raises(InstantiationException, match="encoder_pooling=pooler needs an encoder with a pooler output"):
        build(make_cfg("method=lopa", "method.encoder_pooling=pooler", *SYNTHETIC))  # the backbone's T5 encoder


@pytest.mark.parametrize(("encoder", "limit"), [("bert", ENC_POSITIONS), ("long_bert", 512)])
def test_a_long_encoder_input_keeps_its_last_tokens(make_cfg, encoders, encoder, limit):
    # the reference: [CLS] + the last 510 tokens + [SEP] (left truncation at 512, specials kept); an encoder that
    # reads fewer positions keeps the last (limit - 2)
    cfg = make_cfg("method=idpg", f"method.encoder={encoders[encoder]}", *SYNTHETIC)
    datamodule = build_datamodule(cfg, build_tokenizer(cfg.model.name_or_path))
    text = " ".join(string.ascii_lowercase * 30) + " the end"  # 786 tokens: a letter each, then t ##h ##e e ##n ##d
    [ids] = datamodule.encoder_ids([{"text": text}])
    tokenizer = datamodule.encoder_tokenizer
    assert tokenizer.model_max_length == limit and len(ids) == limit
    tokens = tokenizer.convert_ids_to_tokens(ids)
    assert tokens[0] == "[CLS]" and tokens[-1] == "[SEP]"
    assert tokens[-7:] == ["t", "##h", "##e", "e", "##n", "##d", "[SEP]"]  # the text's end survives
    whole = tokenizer(text, add_special_tokens=False).input_ids
    assert len(whole) == 786 and ids[1:-1] == whole[-(limit - 2) :]  # exactly the last limit - 2 tokens
    short = encoder_tokenizer(str(encoders[encoder]), max_length=8)  # a lower cap wins over the encoder's own
    kept = short.convert_ids_to_tokens(short("abcdefghij", truncation=True).input_ids)
    assert kept == ["[CLS]", "##e", "##f", "##g", "##h", "##i", "##j", "[SEP]"]


def optimizer_and_schedule(system, total: int = 1000) -> tuple[torch.optim.Optimizer, list[float]]:
    """What the system's configure_optimizers gives for a run of `total` steps: the optimizer, and the learning-rate
    factor at steps 0, 250, 500, 750 and 1000."""
    system.trainer = SimpleNamespace(estimated_stepping_batches=total)
    configured = system.configure_optimizers()
    factor = configured["lr_scheduler"]["scheduler"].lr_lambdas[0]
    return configured["optimizer"], [factor(step) for step in (0, 250, 500, 750, 1000)]


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("source", ["method", "experiment"])
def test_the_optimizer_is_the_reference_training_command(make_cfg, encoders, method, source):
    # METHODS.md: the README's command (plain python, no DeepSpeed): AdamW lr 1e-3, weight decay 0.01, constant lr
    experiment = [f"experiment={method}_t5base", "model=t5-tiny", "dataset.source=synthetic"]
    chosen = experiment if source == "experiment" else []
    fine_tuned = [f"method.encoder={encoders['bert']}", "method.train_encoder=true", "method.encoder_lr=1e-5"]
    cfg = make_cfg(f"method={method}", *chosen, *SYNTHETIC, "dataset.max_length=128", *fine_tuned)
    assert cfg.trainer.gradient_clip_val is None and cfg.trainer.precision == "32-true"  # fp32, as the reference
    optimizer, factors = optimizer_and_schedule(build(cfg)[0])
    assert isinstance(optimizer, torch.optim.AdamW) and len(optimizer.param_groups) == 2  # generators, encoder
    assert [group["lr"] for group in optimizer.param_groups] == [1e-3, 1e-5]
    assert all(group["weight_decay"] == 0.01 for group in optimizer.param_groups)  # the encoder's group too
    assert factors == [1.0] * 5  # no warmup, no decay


@pytest.mark.parametrize("method", METHODS)
def test_the_deepspeed_recipe_warms_up_500_steps_decays_linearly_and_clips(make_cfg, method):
    # METHODS.md: the reference's DeepSpeed ZeRO-2 config: weight decay 0, 500 warmup steps, linear decay, clipping 1.0
    extra = ["method.shared_lr=0.1"] if method == "lopa" else []  # LoPA's two groups: both get the recipe
    cfg = make_cfg(
        f"experiment={method}_t5base_deepspeed_recipe", "model=t5-tiny", *SYNTHETIC, "dataset.source=synthetic", *extra
    )
    assert cfg.trainer.gradient_clip_val == 1.0 and cfg.trainer.get("strategy") is None  # the recipe, not ZeRO-2
    optimizer, factors = optimizer_and_schedule(build(cfg)[0])
    assert isinstance(optimizer, torch.optim.AdamW) and len(optimizer.param_groups) == len(extra) + 1
    assert [group["initial_lr"] for group in optimizer.param_groups] == ([0.1] if extra else []) + [1e-3]
    assert all(group["weight_decay"] == 0.0 for group in optimizer.param_groups)
    assert factors == [0.0, 0.5, 1.0, 0.5, 0.0]  # 250/500 up, then (1000 - 750) / (1000 - 500) down


CUSTOM_CONFIG = """from transformers import BertConfig


class EmbedderConfig(BertConfig):
    model_type = "smop-test-embedder"
"""
CUSTOM_MODEL = """from transformers import BertModel

from .configuration_embedder import EmbedderConfig


class Embedder(BertModel):
    config_class = EmbedderConfig
"""


def test_a_custom_code_encoder_loads_only_when_its_code_is_trusted(make_cfg, encoders, tmp_path):
    """A folder that ships the Python defining its model (as CodeSage's repositories do) is refused with the option
    to set, then runs with method.encoder_remote_code=true and the L2-normalised pooler (CodeSage's pooling)."""
    folder = tmp_path / "embedder"
    shutil.copytree(encoders["bert"], folder)
    (folder / "configuration_embedder.py").write_text(CUSTOM_CONFIG)
    (folder / "modeling_embedder.py").write_text(CUSTOM_MODEL)
    config = json.loads((folder / "config.json").read_text())
    config.update(
        model_type="smop-test-embedder",
        architectures=["Embedder"],
        auto_map={"AutoConfig": "configuration_embedder.EmbedderConfig", "AutoModel": "modeling_embedder.Embedder"},
    )
    (folder / "config.json").write_text(json.dumps(config))
    base = ["method=lopa", f"method.encoder={folder}", "method.encoder_pooling=pooler", "trainer.fast_dev_run=true"]
    with pytest.raises(ValueError, match=r"is a custom-code model .* set method.encoder_remote_code=true"):
        encoder_tokenizer(str(folder))
    trusted = make_cfg(*base, "method.encoder_remote_code=true", *SYNTHETIC)
    system, _ = build(trusted)
    assert type(system.prompt.encoder.model).__name__ == "Embedder" and system.prompt.encoder.pooling == "pooler"
    assert run(trusted)["status"] == "completed"
