"""The system: what trains, what stays frozen, what a checkpoint holds."""

from __future__ import annotations

import pytest
import torch
from helpers import SYNTHETIC, build

from smop.module import consistency_loss
from smop.run import run

METHODS = ["smop", "prompt_tuning", "p_tuning"]


def one_step(system, batch) -> None:
    optimizer = torch.optim.AdamW([p for p in system.parameters() if p.requires_grad], lr=0.1)
    system.train()
    loss, _, _ = system(batch["input_ids"], batch["attention_mask"], batch["labels"])
    loss.backward()
    optimizer.step()


@pytest.mark.parametrize("method", METHODS)
def test_training_step_leaves_backbone_bit_for_bit_and_moves_the_prompt(make_cfg, method):
    system, batch = build(make_cfg(f"method={method}", "method.prompt_length=5", *SYNTHETIC))
    backbone_before = {k: v.clone() for k, v in system.backbone.state_dict().items()}
    prompt_before = {k: v.clone() for k, v in system.prompt.state_dict().items()}
    assert not any(p.requires_grad for p in system.backbone.parameters())
    one_step(system, batch)
    for name, value in system.backbone.state_dict().items():
        assert torch.equal(value, backbone_before[name]), name
    assert any(not torch.equal(v, prompt_before[k]) for k, v in system.prompt.state_dict().items())
    assert system.backbone.training  # the frozen backbone's dropout is live in training, as in the references


@pytest.mark.parametrize(("method", "live"), [("smop", True), ("prompt_tuning", True), ("fpt", False)])
def test_backbone_dropout_in_training_follows_the_reference_and_is_seeded(make_cfg, method, live):
    """SMoP, prompt tuning (and DePT, LoPA) train with the frozen T5's dropout live; FPT's scripts set it to 0.
    Either way evaluation has none, and the same seed gives the same losses."""
    cfg = make_cfg(f"method={method}", "method.prompt_length=5", *SYNTHETIC)
    assert cfg.method.train_dropout is live
    system, batch = build(cfg)
    assert system.backbone.training is live  # as built: Lightning's fit keeps the modes it finds
    args = (batch["input_ids"], batch["attention_mask"], batch["labels"])

    def losses(seed: int) -> list[float]:
        torch.manual_seed(seed)
        return [system(*args)[0].item() for _ in range(2)]

    system.train()
    assert system.backbone.training is live
    assert (losses(0)[0] != losses(0)[1]) is live  # dropout draws new masks each pass, or there is none
    assert losses(0) == losses(0)  # deterministic per seed
    system.eval()
    assert not system.backbone.training
    assert losses(0)[0] == losses(1)[1]
    off, _ = build(make_cfg(f"method={method}", "method.prompt_length=5", "method.train_dropout=false", *SYNTHETIC))
    assert not off.train().backbone.training


@pytest.mark.parametrize("method", ["lora_smop", "lora_prompt_tuning", "lora_p_tuning"])
def test_lora_adapters_and_prompt_train_base_weights_do_not(make_cfg, method):
    system, batch = build(make_cfg(f"method={method}", "method.prompt_length=5", *SYNTHETIC))
    trainable = {k for k, p in system.backbone.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in k for k in trainable)
    before = {k: v.clone() for k, v in system.named_parameters()}
    one_step(system, batch)
    after = dict(system.named_parameters())
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert {f"backbone.{k}" for k in trainable if "lora_B" in k} <= changed  # B starts at 0 and moves first
    assert any(k.startswith("prompt.") for k in changed)
    assert all("lora_" in k or k.startswith("prompt.") for k in changed)  # no base weight moved
    prompt_group, adapter_group = system.param_groups()  # two learning rates: method.lr and method.lora.lr
    assert "lr" not in prompt_group and adapter_group["lr"] == 1e-3
    assert {id(p) for p in adapter_group["params"]} == {id(p) for p in system.backbone.parameters() if p.requires_grad}


def test_full_fine_tuning_trains_every_weight(make_cfg):
    system, batch = build(make_cfg("method=full", *SYNTHETIC))
    before = {k: v.clone() for k, v in system.backbone.named_parameters()}
    one_step(system, batch)
    assert all(p.requires_grad for p in system.backbone.parameters())
    changed = [k for k, v in system.backbone.named_parameters() if not torch.equal(v, before[k])]
    assert len(changed) == len(before)


def test_trainable_parameters_match_the_paper_formula(make_cfg):
    system, _ = build(make_cfg(*SYNTHETIC))  # SMoP 4x5 on d_model=128: 20*d + d*K
    trainable = sum(p.numel() for p in system.parameters() if p.requires_grad)
    assert trainable == 20 * 128 + 128 * 4


def test_checkpoint_holds_only_trainable_weights_and_loads_with_weights_only(make_cfg, tmp_path):
    system, _ = build(make_cfg(*SYNTHETIC))
    checkpoint = {"state_dict": system.state_dict(), "hyper_parameters": dict(system.hparams)}
    system.on_save_checkpoint(checkpoint)
    assert set(checkpoint["state_dict"]) == {"prompt.prompts", "prompt.router.linear.weight"}
    torch.save(checkpoint, tmp_path / "c.ckpt")
    loaded = torch.load(tmp_path / "c.ckpt", weights_only=True)
    system.on_load_checkpoint(loaded)  # matches: no error


def test_checkpoint_of_the_earlier_per_prompt_layout_loads_for_evaluation_only(make_cfg):
    """SMoP's prompts were once a [K, L, d] parameter; now one [K*L, d] table (as released). The same weights
    load; resuming training from such a checkpoint is refused (its Adafactor factors are per prompt)."""
    system, _ = build(make_cfg(*SYNTHETIC))
    checkpoint = {"state_dict": system.state_dict(), "hyper_parameters": dict(system.hparams)}
    system.on_save_checkpoint(checkpoint)
    table = checkpoint["state_dict"]["prompt.prompts"].clone()
    assert table.shape == (20, 128)
    checkpoint["state_dict"]["prompt.prompts"] = table.view(4, 5, 128).clone()  # the old layout
    fresh, _ = build(make_cfg("seed=1", *SYNTHETIC))
    fresh.on_load_checkpoint(checkpoint)
    fresh.load_state_dict(checkpoint["state_dict"], strict=False)
    assert torch.equal(fresh.prompt.prompts, table)
    assert torch.equal(fresh.prompt.per_prompt[2], table[10:15])  # prompt k is rows k*L .. (k+1)*L - 1

    class Fitting:
        training = True

    checkpoint["state_dict"]["prompt.prompts"] = table.view(4, 5, 128).clone()
    checkpoint["optimizer_states"] = [{"state": {}}]
    fresh._trainer = Fitting()
    with pytest.raises(ValueError, match=r"\[K, L, d\] parameter .* train=false"):
        fresh.on_load_checkpoint(checkpoint)


def test_mismatched_checkpoint_is_refused_with_what_differs(make_cfg):
    smop, _ = build(make_cfg(*SYNTHETIC))
    wider, _ = build(make_cfg("method.num_prompts=6", *SYNTHETIC))
    pt, _ = build(make_cfg("method=prompt_tuning", "method.prompt_length=5", *SYNTHETIC))
    checkpoint = {"state_dict": wider.state_dict()}
    wider.on_save_checkpoint(checkpoint)
    with pytest.raises(ValueError, match="shape"):
        smop.on_load_checkpoint(checkpoint)
    with pytest.raises(ValueError, match="missing trainable weights"):
        pt.on_load_checkpoint(checkpoint)


def test_checkpoint_of_another_backbone_is_refused_even_with_equal_shapes(make_cfg):
    """Same trainable shapes, other frozen model (2 layers instead of 1): the prompt would be meaningless."""
    one_layer, _ = build(make_cfg(*SYNTHETIC))
    two_layers, _ = build(make_cfg("model.tiny.num_layers=2", *SYNTHETIC))
    checkpoint = {"state_dict": two_layers.state_dict(), "hyper_parameters": dict(two_layers.hparams)}
    two_layers.on_save_checkpoint(checkpoint)
    with pytest.raises(ValueError, match="model: checkpoint .*num_layers.: 2.* != this run .*num_layers.: 1"):
        one_layer.on_load_checkpoint(checkpoint)


@pytest.mark.parametrize("content", [b"", b"PK\x03\x04 truncated zip", b"not a checkpoint at all"])
def test_corrupt_checkpoint_is_refused_before_anything_is_built(make_cfg, tmp_path, content):
    path = tmp_path / "broken.ckpt"
    path.write_bytes(content)
    with pytest.raises(ValueError, match="broken.ckpt is not a readable checkpoint"):
        run(make_cfg("train=false", f"ckpt_path={path}", *SYNTHETIC))


def test_foreign_checkpoint_is_refused(make_cfg, tmp_path):
    path = tmp_path / "foreign.ckpt"
    torch.save({"model": torch.zeros(2)}, path)
    with pytest.raises(ValueError, match="lacks state_dict, hyper_parameters"):
        run(make_cfg(f"ckpt_path={path}", *SYNTHETIC))


def test_consistency_loss_is_the_released_batchmean_kl_with_gradient_through_each_input():
    """0.5 * (kl_div(log q_a, sg p_b) + kl_div(log q_b, sg p_a)), `batchmean`: the sum over every position (label
    padding included) and the vocabulary, over B. d/d logits_a = 0.5 * (q_a - p_b) / B: only through the input."""
    logits_a = torch.randn(2, 3, 11, dtype=torch.float64, requires_grad=True)
    logits_b = torch.randn(2, 3, 11, dtype=torch.float64, requires_grad=True)
    p_a, p_b = logits_a.softmax(-1), logits_b.softmax(-1)
    by_hand = 0.5 * ((p_b * (p_b.log() - p_a.log())).sum() + (p_a * (p_a.log() - p_b.log())).sum()) / 2
    loss = consistency_loss(logits_a, logits_b)
    torch.testing.assert_close(loss.double(), by_hand)
    loss.backward()
    torch.testing.assert_close(logits_a.grad, (0.5 * (p_a - p_b) / 2).detach())
    torch.testing.assert_close(logits_b.grad, (0.5 * (p_b - p_a) / 2).detach())
    assert consistency_loss(logits_a, logits_a).item() == pytest.approx(0.0, abs=1e-6)


def test_stochastic_router_with_consistency_runs_two_passes(make_cfg):
    system, batch = build(make_cfg("router=stochastic", "router.consistency_weight=0.1", *SYNTHETIC))
    assert system.prompt.consistency_weight == 0.1
    system.train()
    loss = system.training_step(batch, 0)
    single, _, _ = system(batch["input_ids"], batch["attention_mask"], batch["labels"])
    assert loss > single  # CE1 + CE2 + alpha * KL: more than one pass's loss


class _ReadsExtraIds(torch.nn.Module):
    """A prompt module that declares an extra batch field and records what it was handed."""

    batch_inputs = ("extra_input_ids", "extra_attention_mask")

    def __init__(self, prompt) -> None:
        super().__init__()
        self.inner, self.seen = prompt, []

    def __getattr__(self, name):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self.inner, name)

    def forward(self, input_embeds, attention_mask, inputs):
        self.seen.append(dict(inputs))
        return self.inner(input_embeds, attention_mask)


def test_a_declared_extra_field_is_collated_generically_and_handed_to_the_prompt(make_cfg):
    """Any `<prefix>input_ids` field of the rows is padded with its mask by the DataModule, and the system gives
    the prompt module exactly the fields it declares; a batch without them is refused by name."""
    from smop.backbones import build_tokenizer
    from smop.builders import build_datamodule

    cfg = make_cfg("method=prompt_tuning", "method.prompt_length=4", *SYNTHETIC)
    system, _ = build(cfg)
    datamodule = build_datamodule(cfg, build_tokenizer(cfg.model.name_or_path))
    rows = [
        dict(row, extra_input_ids=list(range(1, n + 1)))
        for row, n in zip(datamodule.splits["train"][:2], (3, 1), strict=True)
    ]
    batch = datamodule.collate(rows)
    assert batch["extra_input_ids"].tolist() == [[1, 2, 3], [1, 0, 0]]
    assert batch["extra_attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    system.prompt = _ReadsExtraIds(system.prompt)
    system.training_step(batch, 0)
    assert set(system.prompt.seen[-1]) == {"extra_input_ids", "extra_attention_mask"}
    assert torch.equal(system.prompt.seen[-1]["extra_input_ids"], batch["extra_input_ids"])
    without = {key: value for key, value in batch.items() if not key.startswith("extra_")}
    with pytest.raises(ValueError, match=r"reads batch fields \['extra_input_ids', 'extra_attention_mask'\]"):
        system.training_step(without, 0)


@pytest.mark.parametrize("method", ["prompt_tuning", "p_tuning", "smop", "dept"])
def test_export_asks_the_module_for_its_static_prompt(make_cfg, method):
    system, batch = build(make_cfg(f"method={method}", "method.prompt_length=4", *SYNTHETIC))
    table = system.prompt.static_prompt()
    if method in ("smop", "dept"):  # routed / input-updating prompts depend on the input
        assert table is None
        return
    embeds = system.backbone.get_input_embeddings()(batch["input_ids"])
    prompt = system.prompt(embeds, batch["attention_mask"]).prompt
    assert table.shape == (4, embeds.shape[-1]) and torch.allclose(prompt[0].float(), table)
