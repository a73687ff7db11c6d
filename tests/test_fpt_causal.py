"""FPT on decoder-only backbones: a partial Llama / Mistral / Qwen2 / Qwen3 / Phi-3 / Phi / GPT-2 / CodeGen is a
smaller model of its own class (first and last layers kept, KV-cache generation included), a narrowed FFN computes
what the full one does with the dropped neurons zeroed, neurons are scored on the teacher-forced sequence, the full
model comes back bit-for-bit, and `method=fpt` runs on the tiny Llama and GPT-2."""

from __future__ import annotations

import copy

import pytest
import torch
from helpers import SYNTHETIC, build
from transformers import AutoConfig, AutoModelForCausalLM
from transformers.pytorch_utils import Conv1D

from smop.backbones import tiny_config
from smop.methods.fpt import ARCHITECTURES, FULL, PartialModel, Shape, kept_neurons
from smop.run import run

SIZES = {"hidden_size": 32, "num_attention_heads": 4, "vocab_size": 64, "pad_token_id": 0}
GATED = {**SIZES, "num_key_value_heads": 2, "intermediate_size": 64, "bos_token_id": 1, "eos_token_id": 1}
TINY = {  # 4 layers of width 32 and FFNs of 64 neurons (GPT-2, CodeGen: n_inner, 4 x 32 = 128 by default)
    "llama": GATED,
    "mistral": GATED,
    "qwen2": {**GATED, "use_sliding_window": True, "sliding_window": 3, "max_window_layers": 2},  # full, then sliding
    "qwen3": {**GATED, "head_dim": 8},
    "phi3": GATED,
    "phi": {**GATED, "num_key_value_heads": 4},
    "gpt2": {**SIZES, "n_head": 4, "bos_token_id": 1, "eos_token_id": 1},
    "codegen": {**SIZES, "n_head": 4, "rotary_dim": 4, "bos_token_id": 1, "eos_token_id": 1},
}
WIDTH = {"gpt2": "n_inner", "codegen": "n_inner"}  # the config key of the FFN width; the others: intermediate_size
CAUSAL = [t for t, arch in ARCHITECTURES.items() if list(arch.stacks) == ["decoder"]]
LAYERS4 = {"llama-tiny": "model.tiny.num_hidden_layers=4", "gpt2-tiny": "model.tiny.n_layer=4"}


def tiny_lm(model_type: str, **changes) -> AutoModelForCausalLM:
    torch.manual_seed(0)
    config = AutoConfig.for_model(model_type, **{**TINY[model_type], "num_hidden_layers": 4, **changes})
    return AutoModelForCausalLM.from_config(config).requires_grad_(False).eval()  # frozen, as the system holds it


def random_scores(model_type: str) -> dict[str, torch.Tensor]:
    """Neuron scores of the 4 layers, no ties: any kept set is as good a test as the scored one."""
    d_ff = 128 if model_type in WIDTH else 64
    return {"decoder": torch.rand(4, d_ff, generator=torch.Generator().manual_seed(1))}


def test_every_decoder_only_architecture_is_tested():
    assert sorted(CAUSAL) == sorted(TINY)


@pytest.mark.parametrize("model_type", CAUSAL)
def test_partial_decoder_only_lm_is_a_smaller_one_of_its_class_and_the_full_one_comes_back(model_type):
    """Half the layers (the first and the last of 4) and half the neurons: the partial model computes what a model of
    its class built with those layers and neurons computes, KV-cache greedy generation included (the kept layers
    write cache slots 0 and 1, Qwen2's sliding layers keep their own masks); FULL brings back the very same modules,
    weights, layer indices and config."""
    model = tiny_lm(model_type)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    modules, config = dict(model.named_modules()), model.config.to_dict()
    partial = PartialModel(model)  # the default stack: the decoder
    partial.scores = random_scores(model_type)
    full_blocks = partial.blocks["decoder"]
    indices = [[m.layer_idx for m in b.modules() if hasattr(m, "layer_idx")] for b in full_blocks]
    assert [set(i) for i in indices] == [{0}, {1}, {2}, {3}]
    partial.apply(Shape(0.5, 0.5))
    stack = model.get_submodule(ARCHITECTURES[model_type].stacks["decoder"])
    kept = getattr(stack, ARCHITECTURES[model_type].blocks)
    assert list(kept) == [full_blocks[0], full_blocks[3]]  # the first and last layers, the same objects
    assert [{m.layer_idx for m in b.modules() if hasattr(m, "layer_idx")} for b in kept] == [{0}, {1}]
    width = len(kept_neurons(partial.scores["decoder"][0], 0.5))
    small_config = {"num_hidden_layers": 2, WIDTH.get(model_type, "intermediate_size"): width}
    if isinstance(config.get("layer_types"), list):
        small_config["layer_types"] = [config["layer_types"][i] for i in (0, 3)]
    small = tiny_lm(model_type, **small_config)
    small.load_state_dict(model.state_dict())  # strict: the partial model has exactly the smaller model's layout
    ids = torch.randint(2, 64, (2, 7), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, small(ids).logits)
        generate = {"max_new_tokens": 6, "do_sample": False, "pad_token_id": 0}
        assert torch.equal(model.generate(ids, **generate), small.generate(ids, **generate))
    partial.apply(FULL)
    assert dict(model.named_modules()) == modules and model.config.to_dict() == config
    assert [[m.layer_idx for m in b.modules() if hasattr(m, "layer_idx")] for b in full_blocks] == indices
    after = model.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)


def zero_dropped_neurons(block: torch.nn.Module, keep: torch.Tensor) -> None:
    """Zero, by hand, what the dropped neurons read and write: Llama's gate/up rows and down columns (nn.Linear,
    [out, in]); GPT-2's c_fc columns and bias, c_proj rows (Conv1D, [in, out])."""
    mlp = block.mlp
    with torch.no_grad():
        if hasattr(mlp, "c_fc"):
            assert isinstance(mlp.c_fc, Conv1D)
            dropped = torch.ones(mlp.c_fc.weight.shape[1], dtype=torch.bool)
            dropped[keep] = False
            mlp.c_fc.weight[:, dropped] = 0
            mlp.c_fc.bias[dropped] = 0
            mlp.c_proj.weight[dropped, :] = 0
        else:
            dropped = torch.ones(mlp.down_proj.weight.shape[1], dtype=torch.bool)
            dropped[keep] = False
            mlp.gate_proj.weight[dropped, :] = 0
            mlp.up_proj.weight[dropped, :] = 0
            mlp.down_proj.weight[:, dropped] = 0


@pytest.mark.parametrize("model_type", ["llama", "gpt2"])
def test_narrowed_ffns_compute_what_the_full_ones_do_with_the_dropped_neurons_zeroed(model_type):
    model = tiny_lm(model_type)
    zeroed = copy.deepcopy(model)
    partial = PartialModel(model)
    partial.scores = random_scores(model_type)
    blocks = getattr(zeroed.base_model, ARCHITECTURES[model_type].blocks)
    for block, scores in zip(blocks, partial.scores["decoder"], strict=True):
        zero_dropped_neurons(block, kept_neurons(scores, 0.25))
    partial.apply(Shape(1.0, 0.25))
    ids = torch.randint(2, 64, (3, 9), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        narrowed, reference = model(ids).logits, zeroed(ids).logits
        partial.apply(FULL)
        full = model(ids).logits
    torch.testing.assert_close(narrowed, reference, rtol=1e-5, atol=1e-5)
    assert (narrowed - full).abs().max() > 1e-3  # the narrowing changes the model: the check can fail


def test_neuron_scores_of_a_causal_backbone_count_prompt_source_and_target_and_no_padding(make_cfg):
    """A sample's score is the mean |input of down_proj| over the sequence training feeds the stack, [P ; source ;
    target]: by hand on a sample without padding; a padded batch scores as its samples one at a time."""
    cfg = make_cfg("model=llama-tiny", "method=fpt", LAYERS4["llama-tiny"], "dataset.batch_size=8", *SYNTHETIC)
    system, batch = build(cfg)
    system.eval()
    partial = PartialModel(system.backbone)
    lengths, targets = batch["attention_mask"].sum(1), batch["labels"].ne(-100).sum(1)
    assert lengths[0] != lengths[1]  # one of the pair is padded

    def alone(i: int) -> dict[str, torch.Tensor]:
        n, t = int(lengths[i]), int(targets[i])
        return {
            "input_ids": batch["input_ids"][i : i + 1, :n],
            "attention_mask": batch["attention_mask"][i : i + 1, :n],
            "labels": batch["labels"][i : i + 1, :t],
        }

    scores = [partial.ffn_scores(system, [alone(i)])["decoder"].double() for i in (0, 1)]
    seen = []
    handle = system.backbone.model.layers[2].mlp.down_proj.register_forward_pre_hook(lambda m, a: seen.append(a[0]))
    with torch.no_grad():
        system(*alone(0).values())  # the training forward
    handle.remove()
    assert seen[0].shape[1] == 20 + lengths[0] + targets[0]  # prompt, source, target
    torch.testing.assert_close(scores[0][2], seen[0][0].abs().mean(0).double(), rtol=1e-5, atol=1e-7)
    pair = partial.ffn_scores(system, [{k: v[:2] for k, v in batch.items()}])["decoder"].double()
    torch.testing.assert_close(pair, (scores[0] + scores[1]) / 2, rtol=1e-4, atol=1e-6)


def test_greedy_generation_through_the_system_on_a_partial_llama(make_cfg):
    """The system's prompted greedy decode (KV cache, left padding) on a 2-of-4-layer, half-width Llama equals the
    same decode on a Llama built with those layers and neurons, and differs from the full model's."""
    cfg = make_cfg("model=llama-tiny", "method=fpt", LAYERS4["llama-tiny"], "dataset.batch_size=8", *SYNTHETIC)
    system, batch = build(cfg)
    system.eval()
    partial = PartialModel(system.backbone)
    partial.ffn_scores(system, [batch])
    assert partial.scores["decoder"].shape == (4, 256) and (partial.scores["decoder"] >= 0).all()
    partial.apply(Shape(0.5, 0.5))
    small = AutoModelForCausalLM.from_config(
        tiny_config({**cfg.model.tiny, "num_hidden_layers": 2, "intermediate_size": 128})
    ).eval()
    small.load_state_dict(system.backbone.state_dict())
    embeds, mask, _ = system.encoder_inputs(batch["input_ids"], batch["attention_mask"])
    generated = system.kind.generate(system.backbone, embeds, mask, 8, system.tokenizer)
    assert torch.equal(generated, system.kind.generate(small, embeds, mask, 8, system.tokenizer))
    partial.apply(FULL)
    assert not torch.equal(generated, system.kind.generate(system.backbone, embeds, mask, 8, system.tokenizer))


@pytest.mark.parametrize(("model", "width"), [("llama-tiny", 256), ("gpt2-tiny", 512)])
def test_method_fpt_runs_on_a_causal_backbone(make_cfg, model, width):
    """fast_dev_run with 1-step stages: one step on 2 of 4 layers and a quarter of the neurons, then validation on
    the partial model of the next stage (its generation with the KV cache), test on the full model."""
    stages = ["callbacks.fpt.fractions=[0.25,0.5]", "callbacks.fpt.stage_steps=1", "callbacks.fpt.validate_on=partial"]
    small = ["dataset.batch_size=4", "dataset.eval_batch_size=8", "callbacks.fpt.score_samples=8"]
    small += ["callbacks.fpt.flop_batches=1", "callbacks.flop_counter=null"]  # FLOPs of the FPT stages only
    results = run(
        make_cfg(
            f"model={model}", "method=fpt", LAYERS4[model], "trainer.fast_dev_run=true", *SYNTHETIC, *stages, *small
        )
    )
    assert results["status"] == "completed" and set(results["metrics"]["test"]) >= {"accuracy"}
    cost = results["cost"]
    quarter, half = f"{width // 4}/{width}", f"{width // 2}/{width}"
    assert cost["fpt_stages"] == [
        f"decoder 2/4 layers x {quarter} ffn",
        f"decoder 2/4 layers x {half} ffn",
        f"decoder 4/4 layers x {width}/{width} ffn",
    ]
    assert cost["fpt_stage_steps"] == [1, 0, 0]
    flops = cost["fpt_stage_train_flops"]
    assert flops[0] < flops[1] < 0.6 * flops[2]
