"""IDPG and LoPA: prompts per instance from a frozen encoder (the backbone's or a separate one by name),
deterministic in eval, only the generators train."""

from __future__ import annotations

import string
from pathlib import Path

import pytest
import torch
from helpers import SYNTHETIC, build, fit_fixed_batch
from hydra.errors import InstantiationException
from transformers import BertConfig, BertModel, BertTokenizer, ByT5Tokenizer, T5Config, T5Model
from transformers.models.t5.modeling_t5 import T5Stack

from smop.backbones import HubUnreachableError, build_tokenizer
from smop.costs import eager_attention, inference_flops, train_step_flops
from smop.data.synthetic import synthetic_mixture
from smop.export import export
from smop.loading import load, pad_inputs
from smop.prompts.base import EncoderBatch
from smop.prompts.instance import PretrainedEncoder
from smop.prompts.mixture import masked_mean
from smop.run import build_datamodule, count_parameters, run
from smop.serving import PromptServer

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


# --- a separate encoder by name: method.encoder=<hub name or local folder> ----------------------------------------
ENC_WIDTH, ENC_FF, ENC_POSITIONS = 32, 64, 16  # the tiny BERT below: narrower than the T5, 16 positions


@pytest.fixture(scope="module")
def encoders(tmp_path_factory) -> dict[str, Path]:
    """Two local encoder folders as a hub download would leave them: a 1-layer BERT with a character-level WordPiece
    tokenizer (an encoder-only model), and a 1-layer T5 with the byte tokenizer (an encoder-decoder: its encoder)."""
    root = tmp_path_factory.mktemp("encoders")
    chars = string.ascii_lowercase + string.digits + string.punctuation
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *chars, *(f"##{c}" for c in chars)]
    BertTokenizer(vocab={word: i for i, word in enumerate(vocab)}).save_pretrained(root / "bert")
    config = BertConfig(
        vocab_size=len(vocab),
        hidden_size=ENC_WIDTH,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=ENC_FF,
        max_position_embeddings=ENC_POSITIONS,  # shorter than many inputs: the tokenizer must truncate
    )
    BertModel(config).save_pretrained(root / "bert")
    T5Model(
        T5Config(vocab_size=384, d_model=ENC_WIDTH, d_kv=8, d_ff=ENC_FF, num_layers=1, num_heads=2)
    ).save_pretrained(root / "t5")
    ByT5Tokenizer().save_pretrained(root / "t5")
    return {"bert": root / "bert", "t5": root / "t5"}


def encoder_prompts(system, batch, embeds=None) -> torch.Tensor:
    embeds = system.backbone.get_input_embeddings()(batch["input_ids"]) if embeds is None else embeds
    return system.prompt(embeds, batch["attention_mask"], EncoderBatch.of(batch)).prompt


@pytest.mark.parametrize(
    ("method", "encoder", "pooling"), [("idpg", "bert", "mean"), ("lopa", "bert", "cls"), ("idpg", "t5", "mean")]
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
        pooled = system.prompt.pooled(None, None, EncoderBatch.of(batch))
        model = system.prompt.encoder.model
        hidden = model(input_ids=batch["encoder_input_ids"], attention_mask=mask).last_hidden_state
    assert isinstance(model, BertModel if encoder == "bert" else T5Stack)  # an encoder-decoder gives its encoder
    assert first.shape == (batch["input_ids"].shape[0], M, D)
    assert torch.equal(first, second) and torch.equal(first, unrelated)
    assert not torch.allclose(first[0], first[1])
    expected = hidden[:, 0] if pooling == "cls" else masked_mean(hidden, mask)  # padding excluded
    torch.testing.assert_close(pooled, expected)
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
    system(batch["input_ids"], batch["attention_mask"], batch["labels"], EncoderBatch.of(batch))[0].backward()
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
    system(batch["input_ids"], batch["attention_mask"], batch["labels"], EncoderBatch.of(batch))[0].backward()
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
    generator = H * ENC_WIDTH + H * M * D  # multiply-adds per example of IDPG's two linear layers
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
            loaded.system.encoder_inputs(input_ids, attention_mask, loaded.encoder_batch(examples))[0]
            for loaded in (from_checkpoint, from_folder)
        ]
        inputs.append(server.encoder_inputs(server.batch([("mix", example) for example in examples]))[0])
    assert not torch.allclose(inputs[0][0, :M], inputs[0][1, :M])  # prompts per instance: the check has teeth
    for other in inputs[1:]:
        torch.testing.assert_close(other, inputs[0])


def test_an_unreachable_hub_encoder_says_how_to_run_offline(make_cfg):
    cfg = make_cfg("method=idpg", "method.encoder=nobody/no-such-encoder", *SYNTHETIC)
    message = r"method.encoder='nobody/no-such-encoder'(.|\n)*method.encoder=/path/to(.|\n)*method.encoder=backbone"
    with pytest.raises(HubUnreachableError, match=message):
        build(cfg)  # the DataModule asks for the encoder's tokenizer first
    with pytest.raises(HubUnreachableError, match=message):
        PretrainedEncoder("nobody/no-such-encoder", "mean")
    with pytest.raises(InstantiationException, match="method.encoder_pooling=max: allowed mean, cls"):
        build(make_cfg("method=lopa", "method.encoder_pooling=max", *SYNTHETIC))
