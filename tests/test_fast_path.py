"""The GPU fast path's switches on CPU: how `auto` resolves, bad values refused by name, and each part computing what
the plain path computes (bf16-stored weights, SDPA vs eager attention, padding to a multiple of 8)."""

from __future__ import annotations

import tempfile
from pathlib import Path

import pytest
import torch
from helpers import SYNTHETIC, build
from transformers import T5ForConditionalGeneration

from smop.backbones import build_backbone
from smop.checks import check_config
from smop.costs import eager_attention
from smop.fast_path import resolve_fast_path
from smop.resume import differences

T5_TINY = {"vocab_size": 384, "d_model": 128, "d_ff": 256, "d_kv": 32, "num_heads": 4, "num_layers": 1}


def seeded(make_cfg, *overrides: str):
    torch.manual_seed(0)
    return build(make_cfg(*SYNTHETIC, *overrides))


def attn_implementations(model: torch.nn.Module) -> set[str]:
    configs = [m.config for m in model.modules() if hasattr(getattr(m, "config", None), "_attn_implementation")]
    return {config._attn_implementation for config in configs}


# --- resolution --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("cuda", "overrides", "dtype", "compiled"),
    [
        (False, [], None, False),  # CPU: everything as before
        (False, ["trainer.precision=bf16-mixed"], None, False),  # bf16 autocast on CPU: weights stay as they are
        (True, [], None, True),  # CUDA in fp32: no bf16 weights; compile on
        (True, ["trainer=gpu"], "bfloat16", True),
        (True, ["trainer=gpu", "trainer.precision=bf16-true"], "bfloat16", True),
        (True, ["trainer=gpu", "method=full"], None, True),  # trained weights keep their fp32 copy
        (True, ["trainer=gpu", "method=lora_prompt_tuning"], "bfloat16", True),  # the adapters stay fp32
        (True, ["trainer=gpu", "train=false", "ckpt_path=null", "method.init_from=x"], "bfloat16", False),
        (True, ["trainer=fsdp"], None, False),  # sharded: the strategy owns dtypes and wrapping
        (True, ["trainer=gpu", "trainer.accelerator=cpu"], None, False),
        (True, ["trainer=gpu", "model.dtype=float32", "model.compile=false"], "float32", False),
        (False, ["model.dtype=bfloat16", "model.compile=true"], "bfloat16", True),  # asked for: done on CPU too
    ],
)
def test_auto_resolves_to_the_fast_path_on_cuda_bf16_only(make_cfg, monkeypatch, cuda, overrides, dtype, compiled):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    fast = resolve_fast_path(make_cfg(*overrides))
    assert (fast.backbone_dtype, fast.compile) == (dtype, compiled)
    assert fast.pad_to_multiple_of == (8 if compiled else None)  # auto follows compile
    assert fast.attention == "sdpa"
    assert fast.sort_eval_by_length == (cuda and "trainer.accelerator=cpu" not in overrides)  # any CUDA run


def test_cpu_defaults_are_the_plain_path(make_cfg):
    from smop.run import run

    results = run(make_cfg(*SYNTHETIC, "trainer.fast_dev_run=true"))
    assert results["backbone_dtype"] is None and "compile_time_s" not in results["cost"]
    assert results["fast_path"] == {
        "backbone_dtype": None,
        "attention": "sdpa",
        "compile": False,
        "compile_options": {"backend": "inductor", "mode": None, "dynamic": True},
        "pad_to_multiple_of": None,
        "sort_eval_by_length": False,
    }
    assert results["config"]["model"]["dtype"] == "auto"  # the config keeps `auto`: a GPU checkpoint evaluates on CPU


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("model.dtype=float8", r"model.dtype=float8 is not one of: null, auto, float32, bfloat16, float16"),
        ("model.attention=flash", r"model.attention=flash is not one of: sdpa, eager"),
        ("model.compile=maybe", r"model.compile=maybe is not one of: false, true, auto"),
        ("+model.compile_options.fullgraph=true", r"model.compile_options has \['fullgraph'\]; allowed keys: backend"),
        ("model.compile_options.dynamic=sometimes", r"model.compile_options.dynamic=sometimes is not one of"),
        (
            "model.compile_options.backend=inductr",
            r"backend=inductr is not a torch.compile backend here: one of .*induc",
        ),
        ("dataset.pad_to_multiple_of=0", r"dataset.pad_to_multiple_of=0 is not one of: null, auto, an integer >= 1"),
        ("dataset.pad_to_multiple_of=eight", r"dataset.pad_to_multiple_of=eight is not one of"),
        (
            "dataset.sort_eval_by_length=longest",
            r"dataset.sort_eval_by_length=longest is not one of: false, true, auto",
        ),
    ],
)
def test_a_bad_fast_path_value_is_refused_by_name(make_cfg, override, message):
    with pytest.raises(ValueError, match=message):
        check_config(make_cfg(override))


def test_a_compiled_run_resumes_and_evaluates_uncompiled_but_dtype_changes_are_compared(make_cfg):
    saved = {"model": {"compile": True, "compile_options": {"backend": "inductor"}, "dtype": "auto"}}
    ours = {"model": {"compile": False, "compile_options": {"backend": "eager"}, "dtype": "auto"}}
    assert differences(saved, ours, train=True) == [] and differences(saved, ours, train=False) == []
    assert differences({"dataset": {"pad_to_multiple_of": 8}}, {"dataset": {"pad_to_multiple_of": None}}, True) == []
    assert differences({"model": {"dtype": "auto"}}, {"model": {"dtype": "float32"}}, True) != []


# --- bf16-stored weights ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_a_llama_built_from_a_config_keeps_its_rotary_buffers_in_float32_as_from_pretrained(dtype):
    llama = {"model_type": "llama", "vocab_size": 384, "hidden_size": 64, "intermediate_size": 128}
    built = build_backbone("tiny", {**llama, "num_hidden_layers": 1, "num_attention_heads": 2}, dtype)
    assert {p.dtype for p in built.parameters()} == {getattr(torch, dtype)}
    assert {name: b.dtype for name, b in built.named_buffers()} == {
        "model.rotary_emb.inv_freq": torch.float32,
        "model.rotary_emb.original_inv_freq": torch.float32,
    }


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_a_t5_built_from_a_config_keeps_the_dtypes_from_pretrained_gives(dtype):
    """transformers keeps T5's `wo` in float32 for float16 only (bf16 has fp32's range); `.to(dtype)` of a model built
    from a config would cast it too. Built here and loaded from a folder, the dtypes are the same."""
    torch_dtype = getattr(torch, dtype)
    built = build_backbone("tiny", T5_TINY, dtype)
    kept = {name for name, p in built.named_parameters() if p.dtype == torch.float32}
    folder = Path(tempfile.mkdtemp())
    build_backbone("tiny", T5_TINY).save_pretrained(folder)
    loaded = T5ForConditionalGeneration.from_pretrained(folder, dtype=torch_dtype)
    assert kept == {name for name, p in loaded.named_parameters() if p.dtype == torch.float32}
    assert kept == (
        {"encoder.block.0.layer.1.DenseReluDense.wo.weight", "decoder.block.0.layer.2.DenseReluDense.wo.weight"}
        if dtype == "float16"
        else set()
    )
    assert {p.dtype for name, p in built.named_parameters() if name not in kept} == {torch_dtype}


def test_bf16_backbone_trains_a_float32_prompt_with_float32_optimizer_state(make_cfg):
    system, batch = seeded(make_cfg, "model.dtype=bfloat16", "trainer.precision=bf16-mixed")
    assert {p.dtype for p in system.backbone.parameters()} == {torch.bfloat16}
    optimizer = torch.optim.AdamW([p for p in system.parameters() if p.requires_grad], lr=0.1)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss, _, _ = system(batch["input_ids"], batch["attention_mask"], batch["labels"])
    loss.backward()
    optimizer.step()
    trained = [p for p in system.parameters() if p.requires_grad]
    assert trained and {p.dtype for p in trained} == {torch.float32} == {p.grad.dtype for p in trained}
    states = [t for s in optimizer.state.values() for t in s.values() if torch.is_tensor(t) and t.is_floating_point()]
    assert {t.dtype for t in states} == {torch.float32}


def test_lora_adapters_stay_float32_on_a_bf16_backbone_and_train(make_cfg):
    system, batch = seeded(make_cfg, "method=lora_prompt_tuning", "method.prompt_length=4", "model.dtype=bfloat16")
    adapters = {n: p for n, p in system.backbone.named_parameters() if "lora_" in n}
    assert adapters and {p.dtype for p in adapters.values()} == {torch.float32}
    assert all(p.requires_grad for p in adapters.values())
    assert {p.dtype for n, p in system.backbone.named_parameters() if "lora_" not in n} == {torch.bfloat16}
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss, _, _ = system(batch["input_ids"], batch["attention_mask"], batch["labels"])
    loss.backward()
    assert torch.isfinite(loss) and all(p.grad is not None and p.grad.dtype == torch.float32 for p in adapters.values())
    assert all(p.grad.abs().sum() > 0 for n, p in adapters.items() if "lora_B" in n)  # B starts at 0, so A's grad is 0


def loss_grads_texts(system, batch, autocast: bool = True) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """The loss and prompt gradient (eval mode: no dropout), and the greedy texts; under bf16 autocast or in fp32."""
    system.eval()
    system.zero_grad(set_to_none=True)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        loss, _, _ = system(batch["input_ids"], batch["attention_mask"], batch["labels"])
        loss.backward()
        texts, _ = system.generate_texts(batch["input_ids"], batch["attention_mask"])
    return loss.detach().float(), system.prompt.prompt.grad.clone(), texts


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize("model", ["t5-tiny", "llama-tiny"])
def test_bf16_stored_weights_compute_what_fp32_weights_compute_under_bf16_autocast(make_cfg, model):
    """Autocast casts fp32 weights to bf16 for every matmul anyway: storing them in bf16 changes only the ops that
    autocast leaves in fp32 (the embedding lookup, norms), by bf16's rounding. The yardstick is what autocast itself
    changes against fp32: the tiny Llama (initializer_range 0.5, loss ~16) is sharp, and moves its prompt gradient by
    ~20% under autocast alone, the tiny T5 by ~1%; bf16 storage must stay within twice that, and flip no more greedy
    predictions than autocast does."""
    plain, batch = seeded(make_cfg, f"model={model}", "method=prompt_tuning", "method.prompt_length=5")
    stored, _ = seeded(
        make_cfg, f"model={model}", "method=prompt_tuning", "method.prompt_length=5", "model.dtype=bfloat16"
    )
    stored.prompt.load_state_dict(plain.prompt.state_dict())  # the same prompt (its init reads the embeddings)
    for name, weight in stored.backbone.named_parameters():  # the same weights, rounded
        torch.testing.assert_close(weight, plain.backbone.get_parameter(name).to(weight.dtype), rtol=0, atol=0)
    loss_32, grad_32, texts_32 = loss_grads_texts(plain, batch, autocast=False)
    loss_a, grad_a, texts_a = loss_grads_texts(plain, batch)
    loss_b, grad_b, texts_b = loss_grads_texts(stored, batch)
    torch.testing.assert_close(loss_b, loss_a, rtol=1e-2, atol=0)
    assert relative(grad_b, grad_a) <= 2 * relative(grad_a, grad_32) + 0.01
    assert torch.nn.functional.cosine_similarity(grad_a.flatten(), grad_b.flatten(), dim=0) > 0.97
    # greedy texts: no more flips against autocast than autocast makes against fp32 (T5: none; the Llama: 1 of 32)
    flips = sum(b != a for a, b in zip(texts_a, texts_b, strict=True))
    assert flips <= sum(a != c for a, c in zip(texts_a, texts_32, strict=True))


# --- attention -------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("model", ["t5-tiny", "llama-tiny"])
def test_sdpa_and_eager_attention_give_the_same_loss_and_gradients(make_cfg, model):
    """T5's relative position bias goes into SDPA as its additive mask: the same attention as eager."""
    runs = {}
    for attention in ("sdpa", "eager"):
        system, batch = seeded(make_cfg, f"model={model}", "method=prompt_tuning", f"model.attention={attention}")
        assert attn_implementations(system.backbone) == {attention}
        system.eval()
        loss, _, _ = system(batch["input_ids"], batch["attention_mask"], batch["labels"])
        loss.backward()
        runs[attention] = loss.detach(), system.prompt.prompt.grad.clone()
    torch.testing.assert_close(runs["sdpa"][0], runs["eager"][0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(runs["sdpa"][1], runs["eager"][1], rtol=1e-3, atol=1e-5)


def test_flop_counting_switches_an_sdpa_backbone_to_eager_and_back(make_cfg):
    system, _ = seeded(make_cfg, "model.attention=sdpa")
    assert attn_implementations(system.backbone) == {"sdpa"}
    with eager_attention(system):
        assert attn_implementations(system.backbone) == {"eager"}
    assert attn_implementations(system.backbone) == {"sdpa"}


# --- padding to a multiple -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("model", ["t5-tiny", "llama-tiny"])
def test_padding_to_a_multiple_of_8_keeps_the_loss_and_the_predictions(make_cfg, model):
    runs = {}
    for multiple in ("null", "8"):
        system, batch = seeded(
            make_cfg, f"model={model}", "method=prompt_tuning", f"dataset.pad_to_multiple_of={multiple}"
        )
        system.eval()
        loss, _, _ = system(batch["input_ids"], batch["attention_mask"], batch["labels"])
        loss.backward()
        texts, _ = system.generate_texts(batch["input_ids"], batch["attention_mask"])
        runs[multiple] = batch, loss.detach(), system.prompt.prompt.grad.clone(), texts
    plain, padded = runs["null"][0], runs["8"][0]
    assert plain["input_ids"].shape[1] % 8 != 0 and padded["input_ids"].shape[1] % 8 == 0  # the test pads something
    assert padded["labels"].shape[1] % 8 == 0 and (padded["labels"][:, plain["labels"].shape[1] :] == -100).all()
    assert torch.equal(padded["attention_mask"].sum(1), plain["attention_mask"].sum(1))
    torch.testing.assert_close(runs["8"][1], runs["null"][1], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(runs["8"][2], runs["null"][2], rtol=1e-4, atol=1e-6)
    assert runs["8"][3] == runs["null"][3]
