"""The cost benchmark: runs end to end on the tiny T5, and its measuring instruments count what they claim.

Timings are not asserted here (they belong in the benchmark's own output), only what must hold on any machine.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from omegaconf import DictConfig
from transformers import ByT5Tokenizer, LlamaConfig

from smop.backbones import build_backbone, freeze
from smop.backbones.causal import CausalKind
from smop.backbones.seq2seq import t5_inference_flops
from smop.benchmark import (
    LiveTensorBytes,
    PartsFailed,
    causal_sequence,
    prompt_module_flops,
    run_benchmark,
    twin_on_same_weights,
)
from smop.costs import eager_attention, inference_flops
from smop.data.tasks import Task
from smop.methods import IDPG, DecomposedPromptTuning, PromptTuning, PTuning, SparseMixtureOfPrompts
from smop.methods.lora import add_lora, has_lora, remove_lora
from smop.methods.routers import LinearRouter
from smop.module import PromptTuningSystem

ROOT = Path(__file__).resolve().parents[1]
VARIANTS = {
    "smop_4x5",
    "pt_5",
    "pt_20",
    "pt_50",
    "pt_100",
    "p_tuning_100",
    "full",
    "peft_pt_100",
    "bare_pt_100",
    "lightning_pt_100",
    "dept_60",
    "idpg_10",
    "lopa_10",
    "lora_pt_100",
    "lora_smop_4x5",
}
TINY = [
    "benchmark.model=t5-tiny",
    "benchmark.threads=1",
    "benchmark.batch_size=4",
    "benchmark.warmup_steps=1",
    "benchmark.steps=2",
    "benchmark.memory_steps=1",
    "benchmark.tasks=[rte]",
    "benchmark.max_length=200",
]
SMALL = dict(
    vocab_size=300,
    d_model=32,
    d_ff=48,
    d_kv=8,
    num_heads=2,
    num_layers=2,
    num_decoder_layers=1,
    decoder_start_token_id=0,
    pad_token_id=0,
    eos_token_id=1,
)


# Decoder-only shapes with random weights: GQA (2 key/value heads for 4 query heads), a head_dim that is not
# hidden / heads, the Llama-shaped Qwen2 and Mistral, and GPT-2 (fused projections, LayerNorms that fvcore counts)
CAUSAL_SMALL = dict(
    vocab_size=300,
    hidden_size=48,
    intermediate_size=80,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    pad_token_id=0,
    eos_token_id=1,
    bos_token_id=1,
)
CAUSAL_SHAPES = {
    "llama-gqa": {**CAUSAL_SMALL, "model_type": "llama"},
    "llama-head-dim": {**CAUSAL_SMALL, "model_type": "llama", "head_dim": 16},
    "qwen2": {**CAUSAL_SMALL, "model_type": "qwen2"},
    "mistral": {**CAUSAL_SMALL, "model_type": "mistral"},
    "gpt2": dict(model_type="gpt2", vocab_size=300, n_embd=48, n_layer=2, n_head=4, pad_token_id=0, eos_token_id=1),
}
TASK = Task("rte", "{premise}", ["a", "b"])


def compose_benchmark(overrides: list[str]) -> DictConfig:
    GlobalHydra.instance().clear()
    with initialize_config_dir(str(ROOT / "smop" / "configs"), version_base="1.3"):
        return compose("benchmark", overrides=overrides)


def test_benchmark_runs_end_to_end_on_tiny_t5_and_reports_every_variant(tmp_path):
    cfg = compose_benchmark([*TINY, "benchmark.fixed_lengths=[24]", "benchmark.pipeline.max_batches=2"])
    report = run_benchmark(cfg, tmp_path)
    assert json.loads((tmp_path / "benchmark.json").read_text())["settings"] == json.loads(
        json.dumps(report["settings"])
    )
    assert (tmp_path / "benchmark.md").read_text().count("| smop_4x5 |") == 2
    assert [s["kind"] for s in report["settings"]] == ["real", "fixed"]
    for setting in report["settings"]:
        variants = setting["variants"]
        assert set(variants) == VARIANTS
        assert all(v["step_time_s_median"] > 0 for v in variants.values())
        assert all(
            v["peak_memory_bytes"] > 0 and v["step_cpu_s_median"] > 0
            for k, v in variants.items()
            if k != "lightning_pt_100"
        )
        assert variants["pt_100"]["trainable_params"] == variants["peft_pt_100"]["trainable_params"] == 100 * 128
        assert variants["smop_4x5"]["trainable_params"] == 20 * 128 + 128 * 4
        ratios = setting["ratios"]
        assert ratios["smop_over_pt_flops"] < 1
        assert ratios["flops_delta_rel_error"] < 0.01  # fvcore's SMoP vs PT-100 difference = the analytic count
        assert ratios["smop_over_pt_memory"] < 1 and ratios["smop_over_pt_step_memory"] < 1  # 95 fewer tokens
        # the relatives: DePT on PT-100's budget; LoRA's r=8 pairs on q and v of the encoder's self-attention and
        # the decoder's self- and cross-attention (one layer each): 6 x 8 x (128 + 128)
        assert variants["dept_60"]["trainable_params"] <= 100 * 128
        lora = 6 * 8 * (128 + 128)
        assert variants["lora_pt_100"]["trainable_params"] == 100 * 128 + lora
        assert variants["lora_smop_4x5"]["trainable_params"] == 20 * 128 + 128 * 4 + lora
        flops = {name: v.get("inference_flops_per_example") for name, v in variants.items()}
        assert flops["lora_pt_100"] > flops["pt_100"] and flops["lora_smop_4x5"] > flops["smop_4x5"]
        assert flops["idpg_10"] > flops["pt_20"]  # 10 tokens, but a second encoder pass over the input
        assert variants["dept_60"]["analytic_flops_per_example"] == pytest.approx(flops["dept_60"], rel=1e-9)
        assert variants["idpg_10"]["analytic_flops_per_example"] is None  # no formula: "-", not a wrong figure
    assert report["settings"][0]["lengths"].startswith("real ids")
    assert report["pipeline"]["dynamic"]["examples"] == report["pipeline"]["max_length"]["examples"] == 8
    # against the hardware limit: a CPU has no table peak (MFU null, with the reason) but a measured matmul
    hardware = report["hardware"]
    assert hardware["peak_tflops_bf16"] is None and hardware["measured_matmul_tflops"] > 0
    for setting in report["settings"]:
        for name, v in setting["variants"].items():
            assert v["train_mfu"] is None, name
            if name in ("idpg_10", "lopa_10"):  # a second encoder pass: no formula, no figure
                assert v["train_tflops_per_s"] is None and "no model FLOP count" in v["mfu_note"], name
            else:
                assert v["train_tflops_per_s"] > 0 and v["of_measured_matmul"] > 0 and "CPU" in v["mfu_note"], name
        v = setting["variants"]
        # full fine-tuning: 3x forward; PT-100 (ours, peft, bare: the same shapes) 2x; PT-5 2x over 5 more tokens
        assert v["pt_100"]["model_flops_per_step"] == v["bare_pt_100"]["model_flops_per_step"]
        assert 1.2 < v["full"]["model_flops_per_step"] / v["pt_5"]["model_flops_per_step"] < 1.5
    evaluation = report["eval"]
    assert evaluation["generate"]["examples"] == evaluation["score"]["examples"] == 4 * 4
    assert evaluation["generate"]["examples_per_s"] > 0 and evaluation["score_over_generate_speed"] > 0
    assert "| score / generate |" in (tmp_path / "benchmark.md").read_text()
    assert "Device: cpu" in (tmp_path / "benchmark.md").read_text()


def test_fast_variants_store_the_backbone_in_bf16_compile_their_step_and_a_step_is_profiled(tmp_path):
    """The fast path as the GPU command runs it (here with the aot_eager backend: inductor compiles for minutes on a
    CPU): the bf16-stored backbone halves the weights' memory, the ratios against the plain and peft runs are
    reported, and the profile lists the top operators of two steps. On a CPU the fast variants run only when named."""
    assert not VARIANTS & {"pt_100_fast", "smop_4x5_fast"}  # the default list on a CPU leaves them out
    fast = ["pt_100", "peft_pt_100", "pt_100_fast", "smop_4x5_fast"]
    backend = [f"benchmark.variants.{name}.fast.compile.backend=aot_eager" for name in fast[2:]]
    cfg = compose_benchmark(
        [*TINY, "benchmark.precision=bf16", f"benchmark.run_variants=[{','.join(fast)}]", *backend]
        + ["benchmark.fixed_lengths=[24]", "benchmark.pipeline.enabled=false", "benchmark.eval.enabled=false"]
        + ["benchmark.profile.variant=pt_100_fast", "benchmark.profile.setting='fixed 24'", "benchmark.profile.rows=5"]
    )
    report = run_benchmark(cfg, tmp_path)
    for setting in report["settings"]:
        ratios = setting["ratios"]
        assert 0 < ratios["fast_over_plain_memory"] < 1 and ratios["fast_over_peft_step_time"] > 0
        assert ratios["smop_over_pt_fast_step_time"] > 0
    profiled = report["profile"]
    assert profiled["variant"] == "pt_100_fast" and profiled["steps"] == 2 and len(profiled["rows"]) == 5
    assert (
        all(row["self_ms_per_step"] > 0 for row in profiled["rows"]) and sum(r["share"] for r in profiled["rows"]) <= 1
    )
    assert "| kernel / operator |" in (tmp_path / "benchmark.md").read_text()
    with pytest.raises(ValueError, match=r"fast.dtype=bfloat16 stores the frozen weights in bfloat16, which computes"):
        run_benchmark(compose_benchmark([*TINY, "benchmark.run_variants=[pt_100_fast]"]), tmp_path / "fp32")
    typo = [*TINY, "benchmark.precision=bf16", "benchmark.run_variants=[pt_100_fast]"]
    typo.append("benchmark.variants.pt_100_fast.fast.compile.backend=inductr")
    with pytest.raises(ValueError, match=r"fast.compile.backend=inductr is not a torch.compile backend here: one of"):
        run_benchmark(compose_benchmark(typo), tmp_path / "typo")  # before anything is measured
    assert not (tmp_path / "typo").exists()


def test_a_failing_variant_costs_its_own_figures_only_and_a_cut_run_keeps_the_settings_done(tmp_path, monkeypatch):
    """On a GPU lent for minutes, a compiler error or an out-of-memory in one variant must not lose the others'
    figures, and a run stopped by a timeout must leave what it measured: the report is written after every setting
    (`complete` false until the end), a failed part is on record, and the run still fails at the end."""
    if "failing_backend_TESTING_ONLY" not in torch._dynamo.list_backends(exclude_tags=()):

        @torch._dynamo.register_backend
        def failing_backend_TESTING_ONLY(graph, example_inputs):  # a compiler error at the first compiled call
            raise RuntimeError("the compiler failed (a test backend)")

    # first a run that compiles the same step with another backend, in this process: dynamo's cache, keyed by the
    # function's code and guarded partly by object ids that the freed run's successors reuse, would serve its graphs
    # to the next run whatever that one's backend (smop.compiling drops the cache when the options change)
    quick = [*TINY, "benchmark.precision=bf16", "benchmark.run_variants=[pt_100_fast]", "benchmark.fixed_lengths=[]"]
    quick += ["benchmark.pipeline.enabled=false", "benchmark.eval.enabled=false"]
    run_benchmark(
        compose_benchmark([*quick, "benchmark.variants.pt_100_fast.fast.compile.backend=aot_eager"]), tmp_path
    )
    cfg = compose_benchmark(
        [*TINY, "benchmark.precision=bf16", "benchmark.run_variants=[pt_100,pt_100_fast]", "benchmark.rounds=2"]
        + ["benchmark.variants.pt_100_fast.fast.compile.backend=failing_backend_TESTING_ONLY"]
        + ["benchmark.fixed_lengths=[24]"]
        + ["benchmark.pipeline.enabled=false", "benchmark.eval.enabled=false"]
    )
    with pytest.raises(
        PartsFailed, match=r"2 part\(s\) failed .*pt_100_fast on rte \(sample lengths\): .*the compiler failed"
    ):
        run_benchmark(cfg, tmp_path / "failed")
    report = json.loads((tmp_path / "failed" / "benchmark.json").read_text())
    assert report["complete"] is True and len(report["failures"]) == 2  # once per setting, not again in round 2
    for setting in report["settings"]:
        assert setting["variants"]["pt_100"]["step_time_s_median"] > 0
        assert "the compiler failed" in setting["variants"]["pt_100_fast"]["error"]
        assert setting["ratios"]["fast_over_plain_memory"] is None
    assert "| pt_100_fast | failed: " in (tmp_path / "failed" / "benchmark.md").read_text()

    import smop.benchmark as benchmark

    def cut_after_the_first(bench):
        first = next(benchmark_settings(bench))
        yield first
        raise KeyboardInterrupt  # what a timeout's signal does to the run, between settings

    benchmark_settings = benchmark.settings
    monkeypatch.setattr(benchmark, "settings", cut_after_the_first)
    with pytest.raises(KeyboardInterrupt):
        run_benchmark(
            compose_benchmark([*TINY, "benchmark.run_variants=[pt_100]", "benchmark.fixed_lengths=[24]"]),
            tmp_path / "cut",
        )
    report = json.loads((tmp_path / "cut" / "benchmark.json").read_text())
    assert report["complete"] is False and [s["name"] for s in report["settings"]] == ["rte (sample lengths)"]
    assert "**Incomplete" in (tmp_path / "cut" / "benchmark.md").read_text()


@pytest.mark.slow
def test_module_entry_point_writes_into_its_hydra_output_dir(tmp_path):
    command = [
        sys.executable,
        "-m",
        "smop.benchmark",
        *TINY,
        "benchmark.run_variants=[smop_4x5,pt_100]",
        "benchmark.fixed_lengths=[]",
        "benchmark.pipeline.enabled=false",
        f"hydra.run.dir={tmp_path}",
    ]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert str(tmp_path / "benchmark.md") in done.stdout.replace("\n", "")
    report = json.loads((tmp_path / "benchmark.json").read_text())
    assert set(report["settings"][0]["variants"]) == {"smop_4x5", "pt_100"}
    assert report["command"].startswith("python -m smop.benchmark benchmark.model=t5-tiny")


def test_analytic_flops_equal_fvcore_for_every_prompt_module():
    torch.manual_seed(0)  # a gated FFN here; the end-to-end run checks the ReLU one
    backbone = build_backbone("tiny", {**SMALL, "feed_forward_proj": "gated-gelu"})
    embedding = backbone.get_input_embeddings()
    prompts = [
        None,
        PromptTuning(embedding, prompt_length=7),
        PTuning(embedding, prompt_length=6, hidden_size=16),
        SparseMixtureOfPrompts(embedding, lambda **kw: LinearRouter(**kw), num_prompts=3, prompt_length=4),
        DecomposedPromptTuning(embedding, prompt_length=5, rank=3, max_positions=16, init="random"),
    ]
    batch = {
        "input_ids": torch.randint(3, 250, (3, 11)),
        "attention_mask": torch.ones(3, 11, dtype=torch.long),
        "labels": torch.randint(3, 250, (3, 4)),
    }
    batch["attention_mask"][0, 6:] = 0  # padding changes nothing: the padded width is computed
    for prompt in prompts:
        system = PromptTuningSystem(
            backbone, ByT5Tokenizer(), Task("rte", "{premise}", ["a", "b"]), prompt, optimizer=torch.optim.SGD
        )
        with eager_attention(system):
            measured = inference_flops(system, batch)
        length = 11 + (prompt.prompt_length if prompt is not None else 0)
        expected = t5_inference_flops(backbone.config, length, 4) + prompt_module_flops(prompt, 3, 11)
        assert measured == pytest.approx(expected, rel=1e-9), type(prompt).__name__


def padded_batch(rows: int = 3, width: int = 11, target: int = 4) -> dict[str, torch.Tensor]:
    """Random ids with a short source (row 0) and a short target (row 1): the padded widths are what is computed."""
    batch = {
        "input_ids": torch.randint(3, 250, (rows, width)),
        "attention_mask": torch.ones(rows, width, dtype=torch.long),
        "labels": torch.randint(3, 250, (rows, target)),
    }
    batch["attention_mask"][0, 6:] = 0
    batch["labels"][1, 2:] = -100
    return batch


@pytest.mark.parametrize("shape", CAUSAL_SHAPES)
def test_causal_analytic_flops_equal_fvcore_over_prompt_source_and_target(shape):
    """One pass over T = prompt + padded source + padded target positions, the LM head at every one of them."""
    torch.manual_seed(0)
    backbone = freeze(build_backbone("tiny", CAUSAL_SHAPES[shape]))
    embedding = backbone.get_input_embeddings()
    batch = padded_batch()
    router = lambda **kw: LinearRouter(**kw)  # noqa: E731
    for prompt in [None, PromptTuning(embedding, prompt_length=7), SparseMixtureOfPrompts(embedding, router, 3, 4)]:
        system = PromptTuningSystem(backbone, ByT5Tokenizer(), TASK, prompt, optimizer=torch.optim.SGD)
        with eager_attention(system):
            measured = inference_flops(system, batch)
        length = 11 + (prompt.prompt_length if prompt is not None else 0)
        expected = CausalKind().analytic_flops(backbone.config, length, 4) + prompt_module_flops(prompt, 3, 11)
        assert measured == pytest.approx(expected, rel=1e-12), (shape, type(prompt).__name__)


def test_causal_analytic_flops_by_hand_and_none_for_an_unknown_model_type():
    """The tiny Llama of configs/model/llama-tiny.yaml (d 128, f 256, V 384, one layer, 4 heads of 32, no GQA) over
    T = 15 + 5 positions; with 2 key/value heads k and v cost half."""
    config = LlamaConfig(
        vocab_size=384, hidden_size=128, intermediate_size=256, num_hidden_layers=1, num_attention_heads=4
    )
    t, d = 20, 128
    full = 4 * t * d * d + 2 * t * t * d + 3 * t * d * 256 + t * d * 384
    assert CausalKind().analytic_flops(config, 15, 5) == full
    config.num_key_value_heads = 2
    assert CausalKind().analytic_flops(config, 15, 5) == full - 2 * t * d * d // 2
    config.model_type = "no-such-model"
    assert CausalKind().analytic_flops(config, 15, 5) is None  # "-" in the table, not a wrong figure


def test_prompt_modules_report_their_own_analytic_flops():
    """What the benchmark adds to the backbone's count, by hand (d = 32, a batch of 3 rows of 11 tokens)."""
    torch.manual_seed(0)
    backbone = build_backbone("tiny", SMALL)
    embedding = backbone.get_input_embeddings()
    top = lambda k: lambda **kw: LinearRouter(topk=k, **kw)  # noqa: E731
    figures = {
        "none": prompt_module_flops(None, 3, 11),
        "prompt tuning": PromptTuning(embedding, prompt_length=7).analytic_flops(3, 11),
        # the MLP d -> h -> h -> d over the 6 table rows, once a batch: 6 (32 16 + 16 16 + 16 32) / 3
        "p-tuning": PTuning(embedding, prompt_length=6, hidden_size=16).analytic_flops(3, 11),
        # the router d K, and the weighted sum of k prompts of L x d
        "smop top-1": SparseMixtureOfPrompts(embedding, top(1), num_prompts=3, prompt_length=4).analytic_flops(3, 11),
        "smop top-2": SparseMixtureOfPrompts(embedding, top(2), num_prompts=3, prompt_length=4).analytic_flops(3, 11),
        # A[:11] B, r = 3, once a batch: 11 x 3 x 32 / 3
        "dept": DecomposedPromptTuning(embedding, 5, rank=3, max_positions=16, init="random").analytic_flops(3, 11),
        "idpg": IDPG(embedding, backbone, prompt_length=4).analytic_flops(3, 11),  # a whole encoder pass: no formula
    }
    assert figures == {
        "none": 0.0,
        "prompt tuning": 0.0,
        "p-tuning": 2560.0,
        "smop top-1": 32 * 3 + 4 * 32,
        "smop top-2": 32 * 3 + 2 * 4 * 32,
        "dept": 352.0,
        "idpg": None,
    }


def test_benchmark_runs_on_a_causal_backbone_with_its_peers(tmp_path):
    """benchmark.kind=causal: the tiny Llama, ours vs peft's causal prompt tuning vs the bare loop."""
    variants = "[smop_4x5,pt_100,peft_pt_100,bare_pt_100,dept_60]"
    causal = [
        *(o for o in TINY if not o.startswith("benchmark.model=")),
        "benchmark.kind=causal",
        "benchmark.fixed_lengths=[24]",
        f"benchmark.run_variants={variants}",
    ]
    report = run_benchmark(compose_benchmark([*causal, "benchmark.pipeline.max_batches=1"]), tmp_path)
    assert report["kind"] == "causal" and report["model"] == "llama-tiny"
    assert (tmp_path / "benchmark.md").read_text().startswith("# Benchmark: llama-tiny (causal, fp32, batch 4, cpu)")
    for setting in report["settings"]:
        v = setting["variants"]
        assert all(x["step_time_s_median"] > 0 and x["peak_memory_bytes"] > 0 for x in v.values())
        assert v["pt_100"]["trainable_params"] == v["peft_pt_100"]["trainable_params"] == 100 * 128
        assert v["bare_pt_100"]["trainable_params"] == 100 * 128
        for name in ("smop_4x5", "pt_100", "dept_60"):  # the causal formula + the module's, on the run's own batches
            assert v[name]["analytic_flops_per_example"] == pytest.approx(v[name]["inference_flops_per_example"])
        ratios = setting["ratios"]
        assert ratios["flops_delta_rel_error"] < 1e-9 and ratios["smop_over_pt_flops"] < 1
        assert ratios["ours_over_peft_step_time"] is not None and ratios["ours_over_bare_step_time"] is not None
    # the max_length padding leaves room for the target of a causal row: 200 - 100 - 15 ("not_entailment" + EOS)
    assert report["pipeline"]["max_length_input"] == 200 - 100 - 15
    with pytest.raises(ValueError, match="t5-tiny is a seq2seq architecture, but benchmark.kind=causal"):
        run_benchmark(compose_benchmark([*causal, "benchmark.model=t5-tiny"]), tmp_path / "refused")


def test_peft_causal_prompt_tuning_computes_our_loss_on_unpadded_rows():
    """The peer does the work ours does: on rows without padding, peft's prompt before [source ; target] with our
    prompt's values gives our loss (same sequence, same positions), so timing them compares implementations."""
    from peft import PromptTuningConfig, TaskType, get_peft_model

    torch.manual_seed(0)
    backbone = freeze(build_backbone("tiny", CAUSAL_SHAPES["llama-gqa"]))
    prompt = PromptTuning(backbone.get_input_embeddings(), prompt_length=5)
    system = PromptTuningSystem(backbone, ByT5Tokenizer(), TASK, prompt, optimizer=torch.optim.SGD).eval()
    batch = padded_batch()
    batch["attention_mask"][:] = 1
    batch["labels"][1, 2:] = 7  # every target 4 tokens: no padding anywhere
    config = PromptTuningConfig(task_type=TaskType.CAUSAL_LM, num_virtual_tokens=5)
    peer = get_peft_model(twin_on_same_weights(backbone), config).eval()
    with torch.no_grad():
        peer.prompt_encoder["default"].embedding.weight.copy_(prompt.prompt)
        ours, _, _ = system(batch["input_ids"], batch["attention_mask"], batch["labels"])
        theirs = peer(**causal_sequence(batch, pad_id=0)).loss
    assert theirs == pytest.approx(ours.item(), rel=1e-5)
    padded = causal_sequence(padded_batch(), pad_id=0)  # with padding: left-aligned, -100 but on the real target
    assert padded["attention_mask"][0].tolist() == [0] * 5 + [1] * 10 and padded["attention_mask"][1, :2].sum() == 0
    assert padded["labels"].ne(-100).sum(1).tolist() == [4, 2, 4] and padded["labels"][:, -1].ne(-100).all()


def test_live_tensor_bytes_counts_new_storages_until_freed_and_not_views_or_in_place():
    before = torch.ones(1000)  # existed before: never counted, even when an op returns it
    with LiveTensorBytes() as tracker:
        a = torch.ones(1000)  # 4000 bytes
        b = a * 2  # 4000 more
        before.add_(1)
        view = b.view(10, 100).t()  # a view: same storage
        del a
        c = torch.ones(500)  # 2000, after 4000 were freed
    assert tracker.peak == 8000
    assert tracker.live == 6000
    assert view.shape == (100, 10) and c.numel() == 500


def test_live_tensor_bytes_sees_autograd_saved_tensors_and_gradients():
    weight = torch.nn.Parameter(torch.randn(64, 64))
    with LiveTensorBytes() as tracker:
        x = torch.randn(32, 64)
        loss = torch.relu(x @ weight).sum()
        loss.backward()
    assert weight.grad is not None
    assert tracker.peak >= 32 * 64 * 4 * 2 + 64 * 64 * 4  # input, saved activation, gradient


def test_removing_lora_gives_back_the_bare_shared_backbone():
    """The benchmark trains LoRA + X on the backbone every other variant shares: afterwards it is as it was."""
    model = build_backbone("tiny", SMALL)
    before = {name: (type(module), id(module)) for name, module in model.named_modules()}
    add_lora(model, target_modules=["q", "v"])
    assert has_lora(model) and any("lora_A" in name for name, _ in model.named_parameters())
    remove_lora(model)
    assert not has_lora(model) and not hasattr(model, "peft_config")
    assert {name: (type(module), id(module)) for name, module in model.named_modules()} == before


@pytest.mark.parametrize("architecture", [SMALL, CAUSAL_SHAPES["llama-gqa"]], ids=["t5", "llama"])
def test_peft_twin_uses_the_same_weight_storage_and_computes_the_same(architecture):
    model = build_backbone("tiny", architecture).eval()
    twin = twin_on_same_weights(model)
    ours = {p.data_ptr() for p in model.parameters()} | {b.data_ptr() for b in model.buffers()}
    assert all(p.data_ptr() in ours for p in twin.parameters())
    assert all(b.data_ptr() in ours for b in twin.buffers())  # Llama's rotary inv_freq is not in the state dict
    assert twin is not model and twin.config is not model.config
    ids = torch.randint(3, 250, (2, 6))
    inputs = {"input_ids": ids, "labels": ids} if model.config.is_encoder_decoder else {"input_ids": ids}
    with torch.no_grad():
        assert torch.equal(twin(**inputs).logits, model(**inputs).logits)
