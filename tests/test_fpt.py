"""FPT: partial models are real smaller T5s that keep the reference's layers, the schedule grows them back, the
prompt and its optimizer state carry across stages, the full model comes back bit-for-bit, neurons are scored as
the reference scores them, gradients are clipped as it clips them, and the run reports what the stages cost."""

from __future__ import annotations

from types import SimpleNamespace

import lightning as L
import pytest
import torch
from helpers import SYNTHETIC, build
from hydra.utils import instantiate
from lightning.pytorch.callbacks import Callback
from transformers import MT5Config, MT5ForConditionalGeneration, T5Config, T5ForConditionalGeneration

from smop.backbones import build_tokenizer
from smop.builders import build_datamodule, build_system
from smop.methods.fpt import FULL, STACKS, PartialModel, ProgressiveTraining, Shape, kept_layers, sample_means
from smop.run import run

DEEP = ["model.tiny.num_layers=4", "model.tiny.num_decoder_layers=4"]  # d_ff 256: layers and neurons to drop
# `method=fpt` with partial stages of 2 steps (25/50/75%), then 2 full-model steps
SHORT = ["method=fpt", *DEEP, *SYNTHETIC, "callbacks.fpt.stage_steps=2", "callbacks.fpt.score_samples=16"]
SHORT += ["trainer.max_steps=8", "trainer.max_epochs=-1"]


@pytest.mark.parametrize(
    ("num_layers", "fraction", "kept"),
    [  # the reference's rule (METHODS.md): n - 1 gaps of q = (N - n) // (n - 1) + 1, then of q + 1
        (24, 0.25, [0, 4, 8, 13, 18, 23]),  # T5-large's encoder at the paper's first stage (6 layers)
        (24, 0.5, [0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 23]),
        (24, 0.75, [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 13, 15, 17, 19, 21, 23]),  # q = 1: 11 gaps of 1, 6 of 2
        (12, 0.25, [0, 5, 11]),  # T5-base
        (12, 0.5, [0, 2, 4, 6, 8, 11]),
        (12, 0.75, [0, 1, 2, 3, 4, 5, 7, 9, 11]),
        (8, 0.25, [0, 7]),  # T5-small (LM-adapted: 8 layers)
        (8, 0.5, [0, 2, 4, 7]),
        (8, 0.75, [0, 1, 2, 3, 5, 7]),
        (4, 0.25, [0, 3]),
        (4, 0.75, [0, 1, 3]),
        (24, 1.0, list(range(24))),
        (1, 0.25, [0]),
    ],
)
def test_kept_layers_are_the_references(num_layers, fraction, kept):
    assert kept_layers(num_layers, fraction) == kept


def test_kept_layers_count_is_the_share_of_layers():
    assert [len(kept_layers(24, f)) for f in (0.25, 0.5, 0.75, 1.0)] == [6, 12, 18, 24]  # the scripts' 6,12,18


@pytest.mark.parametrize("ffn", ["relu", "gated-gelu"])
def test_partial_model_is_a_smaller_t5_and_the_full_one_comes_back_bit_for_bit(make_cfg, ffn):
    """The partial model computes exactly what a T5 built with the kept blocks and neurons computes, generation
    (decoder cache, relative position bias of block 0) included."""
    cfg = make_cfg("method=fpt", *DEEP, f"+model.tiny.feed_forward_proj={ffn}", *SYNTHETIC)
    system, batch = build(cfg)
    backbone = system.backbone
    before = {k: v.clone() for k, v in backbone.state_dict().items()}
    modules = dict(backbone.named_modules())
    partial = PartialModel(backbone, ["encoder", "decoder"])
    scores = partial.ffn_scores(system, [batch])
    assert scores["encoder"].shape == scores["decoder"].shape == (4, 256) and (scores["encoder"] >= 0).all()
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    for fraction, layers, width in [(0.25, 2, 64), (0.5, 2, 128), (0.75, 3, 192)]:
        partial.apply(Shape(fraction, fraction))
        for stack in (backbone.encoder, backbone.decoder):
            assert len(stack.block) == layers and stack.block[0].layer[0].SelfAttention.has_relative_attention_bias
            assert all(block.layer[-1].DenseReluDense.wo.in_features == width for block in stack.block)
        small = T5ForConditionalGeneration(
            T5Config(**{**cfg.model.tiny, "num_layers": layers, "num_decoder_layers": layers, "d_ff": width})
        ).eval()
        small.load_state_dict(backbone.state_dict())  # strict: the partial model has exactly a small T5's layout
        with torch.no_grad():
            torch.testing.assert_close(
                backbone(**inputs, labels=batch["labels"]).logits, small(**inputs, labels=batch["labels"]).logits
            )
            generate = {"max_new_tokens": 6, "do_sample": False}
            assert torch.equal(backbone.generate(**inputs, **generate), small.generate(**inputs, **generate))
    partial.apply(FULL)
    assert dict(backbone.named_modules()) == modules  # the very same module objects
    after = backbone.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)


def test_partial_mt5_is_a_smaller_mt5():
    """mT5 (model_type mt5) has T5's layout: the same description reduces it to exactly a smaller mT5."""
    sizes = {"vocab_size": 64, "d_model": 32, "d_kv": 8, "d_ff": 64, "num_heads": 4, "decoder_start_token_id": 0}
    torch.manual_seed(0)
    model = MT5ForConditionalGeneration(MT5Config(**sizes, num_layers=4, num_decoder_layers=4)).requires_grad_(False)
    partial = PartialModel(model.eval(), ["encoder", "decoder"])
    partial.scores = {stack: torch.rand(4, 64, generator=torch.Generator().manual_seed(1)) for stack in STACKS}
    partial.apply(Shape(0.5, 0.5))
    small = MT5ForConditionalGeneration(MT5Config(**{**sizes, "d_ff": 32}, num_layers=2, num_decoder_layers=2))
    small.load_state_dict(model.state_dict())
    ids = torch.randint(2, 64, (2, 7), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        torch.testing.assert_close(
            model(input_ids=ids, labels=ids).logits, small.eval()(input_ids=ids, labels=ids).logits
        )
        generate = {"max_new_tokens": 5, "do_sample": False}
        assert torch.equal(model.generate(ids, **generate), small.generate(ids, **generate))


class Probe(Callback):
    """What each training step and validation batch sees (runs after the FPT callback)."""

    def __init__(self) -> None:
        self.steps: list[dict] = []
        self.val_layers: list[int] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        prompt = pl_module.prompt.prompt
        state = trainer.optimizers[0].state.get(prompt, {})
        self.steps.append(
            {
                "layers": len(pl_module.backbone.encoder.block),
                "width": pl_module.backbone.encoder.block[0].layer[-1].DenseReluDense.wo.in_features,
                "decoder_layers": len(pl_module.backbone.decoder.block),
                "prompt": prompt,
                "in_optimizer": any(p is prompt for g in trainer.optimizers[0].param_groups for p in g["params"]),
                "optimizer_steps": int(state.get("step", 0)),
                "start": prompt.detach().clone(),
                "lr": trainer.optimizers[0].param_groups[0]["lr"],
                "clip": trainer.gradient_clip_val,
            }
        )

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.steps[-1]["end"] = pl_module.prompt.prompt.detach().clone()

    def on_validation_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0) -> None:
        self.val_layers.append(len(pl_module.backbone.encoder.block))


def fit_with_probe(make_cfg, *overrides: str) -> tuple[ProgressiveTraining, Probe, dict, object]:
    """Fit `method=fpt` with short stages; the FPT callback, the probe, the backbone before, the system."""
    cfg = make_cfg(*SHORT, "callbacks.fpt.count_flops=false", *overrides)
    tokenizer = build_tokenizer(cfg.model.name_or_path)
    datamodule = build_datamodule(cfg, tokenizer)
    system = build_system(cfg, datamodule, tokenizer)
    before = {k: v.clone() for k, v in system.backbone.state_dict().items()}
    fpt, probe = instantiate(cfg.callbacks.fpt), Probe()
    trainer = instantiate(
        cfg.trainer, callbacks=[fpt, probe], logger=False, enable_checkpointing=False, enable_progress_bar=False
    )
    trainer.fit(system, datamodule=datamodule)
    return fpt, probe, before, system


def test_stages_grow_the_model_and_carry_the_prompt_and_its_optimizer_state(make_cfg):
    fpt, probe, before, system = fit_with_probe(make_cfg)
    steps = probe.steps
    shapes = [(2, 64), (2, 128), (3, 192), (4, 256)]  # encoder layers and FFN width of each stage
    assert [(s["layers"], s["width"]) for s in steps] == [shape for shape in shapes for _ in range(2)]
    assert all(s["decoder_layers"] == 4 for s in steps)  # the reference's default reduces the encoder only
    assert all(s["prompt"] is system.prompt.prompt and s["in_optimizer"] for s in steps)  # one Parameter throughout
    assert [s["optimizer_steps"] for s in steps] == list(range(8))  # Adafactor's state carries across stages
    for previous, current in zip(steps, steps[1:], strict=False):
        assert torch.equal(previous["end"], current["start"])  # values carry
    assert not torch.equal(steps[0]["start"], steps[2]["start"])  # stage 1 trained the prompt stage 2 starts from
    assert all(s["lr"] == pytest.approx(0.3) for s in steps)  # constant learning rate, no warmup or decay
    assert all(s["clip"] == 1.0 for s in steps)  # the reference's --max-norm, applied by the callback
    assert fpt.scored == 16  # exactly callbacks.fpt.score_samples examples scored the neurons
    assert probe.val_layers and set(probe.val_layers) == {4}  # validation always on the full model
    assert fpt.steps == [2, 2, 2, 2]
    assert system.backbone.encoder.block is fpt.partial.blocks["encoder"]
    after = system.backbone.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)


def test_validation_on_the_partial_model_when_asked(make_cfg):
    """validate_on=partial: the epoch ending at step 6 (6 batches; stage 3 of 3-step stages) validates 3 of 4 layers."""
    _, probe, _, _ = fit_with_probe(make_cfg, "callbacks.fpt.validate_on=partial", "callbacks.fpt.stage_steps=3")
    assert probe.val_layers == [3]


def test_method_fpt_runs_and_reports_stage_flops_below_plain_prompt_tuning(make_cfg):
    """`python train.py method=fpt` with short stages: the callback comes with the method."""
    results = run(make_cfg(*SHORT, "callbacks.fpt.stacks=[encoder,decoder]", "callbacks.fpt.flop_batches=1"))
    assert results["status"] == "completed"
    cost = results["cost"]
    assert cost["fpt_stage_steps"] == [2, 2, 2, 2]
    assert cost["fpt_stages"][0] == "encoder 2/4 layers x 64/256 ffn, decoder 2/4 layers x 64/256 ffn"
    for flops in (cost["fpt_stage_train_flops"], cost["fpt_stage_inference_flops"]):
        assert len(flops) == 4 and flops == sorted(flops) and flops[0] < 0.5 * flops[-1]
    total, full = cost["fpt_train_flops_total"], cost["fpt_train_flops_full"]
    assert total < full and cost["fpt_train_flops_vs_full"] == pytest.approx(total / full)
    assert results["config"]["method"]["init"] == "uniform" and results["params"]["trainable"] == 20 * 128


def test_prompt_learns_across_stages(make_cfg):
    """With Adafactor lr 0.3 and 10 steps per stage, the full model starts its stage from what the partial
    stages learned, and its loss on a fixed batch ends below half the initial one."""
    torch.manual_seed(0)
    cfg = make_cfg("method=fpt", *DEEP, "dataset.batch_size=16", *SYNTHETIC)
    system, batch = build(cfg)
    partial = PartialModel(system.backbone, ["encoder"])
    partial.ffn_scores(system, [batch])
    optimizer = instantiate(cfg.optimizer)(system.param_groups())
    system.train()

    def loss() -> torch.Tensor:
        return system(batch["input_ids"], batch["attention_mask"], batch["labels"])[0]

    with torch.no_grad():
        first = loss().item()
    losses = []
    for fraction in (0.25, 0.5, 0.75, 1.0):
        partial.apply(Shape(fraction, fraction))
        for _ in range(10):
            value = loss()
            optimizer.zero_grad()
            value.backward()
            optimizer.step()
            losses.append(value.item())
    assert partial.shape == FULL and losses[30] < 0.75 * first, (first, losses[::5])
    assert min(losses[-5:]) <= 0.5 * first, (first, losses[::5])


def test_sample_scores_are_means_over_each_samples_own_tokens():
    """By hand: A has 1 token (|4|, |-2|), B 3 tokens (|1|,|-1|,|1| and 0, 2, 4); padding (9s) is ignored."""
    activations = torch.tensor(
        [
            [[4.0, -2.0], [9.0, 9.0], [9.0, 9.0], [9.0, 9.0]],
            [[1.0, 0.0], [-1.0, 2.0], [1.0, 4.0], [9.0, 9.0]],
        ]
    )
    mask = torch.tensor([[1, 0, 0, 0], [1, 1, 1, 0]])
    means = sample_means(activations, mask)
    assert means.dtype == torch.float64 and means.tolist() == [[4.0, 2.0], [1.0, 2.0]]
    assert means.mean(0).tolist() == [2.5, 2.0]  # the layer's score; one mean over all 4 tokens: [1.75, 2.0]


def test_ffn_scores_are_the_mean_of_per_sample_means_whatever_the_batching(make_cfg):
    """Two samples of different lengths in one padded batch score as the reference scores them, one at a time:
    the mean of each one's own score, not a mean over all their tokens (which weighs the longer one more)."""
    system, batch = build(make_cfg("method=fpt", *DEEP, *SYNTHETIC))
    lengths = batch["attention_mask"].sum(1)
    a, b = int(lengths.argmin()), int(lengths.argmax())
    assert lengths[a] < lengths[b]
    pair = {k: v[[a, b]] for k, v in batch.items()}
    pair = {
        **pair,
        "input_ids": pair["input_ids"][:, : lengths[b]],
        "attention_mask": pair["attention_mask"][:, : lengths[b]],
    }
    partial = PartialModel(system.backbone, ["encoder", "decoder"])
    alone = []
    for i in (a, b):  # batch size 1, no padding: the reference's computation
        one = {k: v[i : i + 1] for k, v in batch.items()}
        one = {
            **one,
            "input_ids": one["input_ids"][:, : lengths[i]],
            "attention_mask": one["attention_mask"][:, : lengths[i]],
        }
        alone.append({k: v.double() for k, v in partial.ffn_scores(system, [one]).items()})
    together = partial.ffn_scores(system, [pair])
    tokens = (lengths[[a, b]] + 20).double()  # the encoder's mask counts the 20 prompt positions
    for stack in ("encoder", "decoder"):
        expected = (alone[0][stack] + alone[1][stack]) / 2
        torch.testing.assert_close(together[stack].double(), expected, rtol=1e-4, atol=1e-6)  # padding: fp32 noise
    per_token = (tokens[0] * alone[0]["encoder"] + tokens[1] * alone[1]["encoder"]) / tokens.sum()
    gap = ((per_token - together["encoder"]) / together["encoder"].clamp(min=1e-3)).abs().max()
    assert gap > 0.01, gap  # a mean over all tokens would be another score: the test tells them apart


def test_neurons_are_scored_on_shuffled_validation_examples_by_default(make_cfg):
    """The reference scored 1,000 shuffled validation samples; the draw has its own seeded generator."""
    assert make_cfg("method=fpt").callbacks.fpt.score_split == "val"
    assert make_cfg("method=fpt").callbacks.fpt.score_samples == 1000
    cfg = make_cfg(*SHORT, "seed=3")  # score_samples=16, of 21 validation examples
    tokenizer = build_tokenizer(cfg.model.name_or_path)
    datamodule = build_datamodule(cfg, tokenizer)
    system = build_system(cfg, datamodule, tokenizer)
    trainer = SimpleNamespace(datamodule=datamodule)
    fpt = instantiate(cfg.callbacks.fpt)
    assert fpt.score_seed == 3
    state = torch.get_rng_state()
    batches = fpt._score_batches(trainer, system)
    assert torch.equal(torch.get_rng_state(), state)  # the run's random stream is untouched
    val = datamodule.splits["val"]
    picked = torch.randperm(len(val), generator=torch.Generator().manual_seed(3))[:16].tolist()
    assert picked != sorted(picked)  # shuffled, not the first 16
    expected = datamodule.collate([val[i] for i in picked])
    assert sum(len(b["input_ids"]) for b in batches) == 16 and torch.equal(
        batches[0]["input_ids"], expected["input_ids"]
    )
    train = instantiate(cfg.callbacks.fpt, score_split="train", score_samples=10**6)._score_batches(trainer, system)
    assert sum(len(b["input_ids"]) for b in train) == len(datamodule.splits["train"])  # all of a smaller split
    with pytest.raises(ValueError, match="score_split=test is not one of: val, train"):
        ProgressiveTraining(score_split="test")


def test_gradient_clipping_at_norm_1_unless_the_trainer_says_otherwise(make_cfg):
    """The reference clips at --max-norm 1.0 every step; `trainer.gradient_clip_val`, when set, wins."""
    assert make_cfg("experiment=fpt_t5large").trainer.gradient_clip_val == 1.0
    for overrides in (["method=fpt"], ["callbacks=fpt", "method=smop"]):  # the clipping follows the callback
        assert make_cfg(*overrides).callbacks.fpt.gradient_clip_val == 1.0
    system, _ = build(make_cfg("method=fpt", *SYNTHETIC))
    for trainer_value, callback_value, applied in [
        (None, 1.0, 1.0),
        (0.5, 1.0, 0.5),
        (0.0, 1.0, 0.0),
        (None, None, None),
    ]:
        trainer = L.Trainer(gradient_clip_val=trainer_value, logger=False, enable_checkpointing=False)
        ProgressiveTraining(gradient_clip_val=callback_value).setup(trainer, system, "fit")
        assert trainer.gradient_clip_val == applied
    trainer = L.Trainer(logger=False, enable_checkpointing=False)
    ProgressiveTraining().setup(trainer, system, "validate")
    assert trainer.gradient_clip_val is None  # only training clips


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"reduce": "width"}, "reduce=width is not one of: layers, ffn, both"),
        ({"stage_steps": [1, 2]}, "one entry per fraction"),
        ({"stacks": ["encoder", "lm_head"]}, "subset of: encoder, decoder"),
        ({"fractions": [0.5, 1.5]}, r"shares in \(0, 1\]"),
        ({"score_samples": 0}, "score_samples=0 must be >= 1"),
        ({"gradient_clip_val": -1.0}, "gradient_clip_val=-1.0 must be >= 0"),
    ],
)
def test_bad_options_name_the_allowed_values(options, message):
    with pytest.raises(ValueError, match=message):
        ProgressiveTraining(**options)
