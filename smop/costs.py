"""What a run costs, measured by callbacks: training time, peak memory, FLOPs per example.

Time excludes evaluation. FLOPs are counted once, before the timed loop, on real batches of the
training data (dynamic padding included), with eager attention so that the attention matmuls count:
fvcore for the inference forward (seq2seq: encoder + decoder over the label length; causal: one pass over prompt,
input and label) and torch's FlopCounterMode for a training step (forward + backward), both as multiply-adds
(fvcore's convention).

Against the hardware limit (smop.hardware): every training step's model FLOPs from the analytic formula of the
backbone kind (`analytic_flops`, checked against fvcore) on the step's own padded shapes, 2 FLOPs per
multiply-add, times the method's training multiplier (`training_multiplier`), give `train_tflops_per_s` and
`train_mfu`; evaluation is timed as examples per second (`EvaluationCost`).
"""

from __future__ import annotations

import contextlib
import itertools
import re
import resource
import statistics
import sys
import time
from collections.abc import Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import lightning as L
import torch
from fvcore.nn import FlopCountAnalysis
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.strategies import DeepSpeedStrategy, FSDPStrategy
from torch import Tensor, nn
from torch.utils.data import DataLoader
from torch.utils.flop_counter import FlopCounterMode

from smop.hardware import Peak, device_peak, hardware, mfu
from smop.methods.lora import has_lora


def reset_peak_memory(device: torch.device) -> None:
    """Start a fresh peak: CUDA's allocator statistics, or Linux's per-process high-water mark (VmHWM).

    Without the reset, jobs that share a process (a Hydra multirun with the basic launcher) would each
    report the peak of every job before them.
    """
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    elif Path("/proc/self/clear_refs").exists():
        with contextlib.suppress(OSError):
            Path("/proc/self/clear_refs").write_text("5")


def peak_memory(device: torch.device) -> tuple[int, str]:
    """CUDA's max allocated bytes since the last reset, else the process's peak resident set size."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device), "cuda_max_allocated"
    status = Path("/proc/self/status")
    if status.exists():
        match = re.search(r"VmHWM:\s+(\d+) kB", status.read_text())
        if match:
            return int(match.group(1)) * 1024, "cpu_peak_rss"
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss if sys.platform == "darwin" else rss * 1024, "cpu_peak_rss"


def sync(device: torch.device) -> None:
    """Wait for queued CUDA work, so that wall-clock timings cover it; a no-op elsewhere."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def training_multiplier(system: nn.Module) -> tuple[float, str]:
    """Training FLOPs over forward FLOPs of the backbone, and the reason.

    Backward through a frozen backbone computes activation gradients (about one forward) but no weight gradients
    (another forward's worth), so a prompt method's step costs 2x its forward, full fine-tuning 3x. LoRA + X is
    counted as its frozen backbone (2x): the adapters' own work (r=8 on q and v: under 1% of the step) is left out,
    so its figure is a lower bound."""
    if getattr(system, "train_backbone", False):
        return 3.0, "3x forward: the backbone's weights train (forward + activation and weight gradients)"
    if has_lora(system.backbone):
        return 2.0, "2x forward of the frozen backbone; LoRA adapters' own FLOPs not counted (a lower bound)"
    return 2.0, "2x forward: frozen backbone, activation gradients only"


def step_model_flops(system: nn.Module, batch: Mapping[str, Tensor]) -> tuple[float | None, str]:
    """Model FLOPs (2 per multiply-add) of one training step on `batch`, from the analytic formulas, and how they
    were counted (or why they could not be: a backbone or a prompt module without a formula).

    Backbone: `kind.analytic_flops` over prompt + padded input and the padded target, times
    `training_multiplier`; the prompt module's own forward (router, MLP) 3x (its weights train); two forward
    passes when the method adds a consistency pass (stochastic routing)."""
    rows, width = batch["input_ids"].shape
    prompt = getattr(system, "prompt", None)
    length = prompt.prompt_length if prompt is not None else 0
    backbone = system.kind.analytic_flops(system.backbone.config, length + width, batch["labels"].shape[1])
    if backbone is None:
        return None, f"no analytic formula for model_type={system.backbone.config.model_type}"
    module = prompt.analytic_flops(rows, width) if prompt is not None else 0.0
    if module is None:
        return None, f"no analytic formula for the {type(prompt).__name__} prompt module (a second encoder pass)"
    multiplier, why = training_multiplier(system)
    passes = 2 if prompt is not None and getattr(prompt, "consistency_weight", 0.0) > 0 else 1
    per_example = 2 * passes * (multiplier * backbone + 3 * module)
    note = why + (", two passes (consistency)" if passes == 2 else "")
    return per_example * rows, note + "; 2 FLOPs per multiply-add, analytic, padded shapes"


class TrainingCost(Callback):
    """Training wall time without evaluation, median step time, examples per second, peak memory; model FLOPs per
    second and MFU against the device's peak (`measure_peak`: also time a large matmul before training, a
    fraction of a second on a GPU, tens of milliseconds on a CPU; off by default)."""

    def __init__(self, measure_peak: bool = False) -> None:
        self.measure_peak = measure_peak
        self.hardware: dict[str, Any] | None = None
        self.peak: Peak | None = None
        self.model_flops: float | None = 0.0
        self.flops_note = ""
        self.step_times: list[float] = []
        self.train_time = 0.0
        self.examples = 0
        self._epoch_start: float | None = None
        self._step_start = 0.0
        self.memory: tuple[int, str] | None = None

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.hardware is None:  # before the timed loop: the matmul is not training time
            self.peak = device_peak(pl_module.device)
            self.hardware = hardware(pl_module.device, measure=self.measure_peak)
        reset_peak_memory(pl_module.device)

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        sync(pl_module.device)
        self._epoch_start = time.perf_counter()

    def _pause(self, pl_module: L.LightningModule) -> None:
        if self._epoch_start is not None:
            sync(pl_module.device)
            self.train_time += time.perf_counter() - self._epoch_start
            self._epoch_start = None

    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._pause(pl_module)  # evaluation inside fit is not training time

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.training:
            self.on_train_epoch_start(trainer, pl_module)

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._pause(pl_module)

    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        sync(pl_module.device)
        self._step_start = time.perf_counter()

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        sync(pl_module.device)
        self.step_times.append(time.perf_counter() - self._step_start)
        self.examples += batch["input_ids"].shape[0]
        if self.model_flops is not None:  # a formula: microseconds, after the step's time is taken
            flops, self.flops_note = step_model_flops(pl_module, batch)
            self.model_flops = None if flops is None else self.model_flops + flops

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._pause(pl_module)
        self.memory = peak_memory(pl_module.device)
        for logger in trainer.loggers:
            logger.log_metrics({f"cost/{k}": v for k, v in self.cost().items() if isinstance(v, int | float)})

    def cost(self) -> dict[str, Any]:
        if not self.step_times:
            return {}
        memory, kind = self.memory or (None, None)
        flops_per_s = self.model_flops / self.train_time if self.model_flops is not None and self.train_time else None
        utilisation, why = mfu(flops_per_s, self.peak) if self.peak is not None else (None, "no device peak")
        return {
            "train_time_s": self.train_time,
            "step_time_s_median": statistics.median(self.step_times),
            "train_examples_per_s": self.examples / self.train_time if self.train_time else None,
            "peak_memory_bytes": memory,
            "memory_kind": kind,
            "train_model_flops_per_example": self.model_flops / self.examples if self.model_flops is not None else None,
            "train_tflops_per_s": flops_per_s / 1e12 if flops_per_s is not None else None,
            "train_mfu": utilisation,
            "train_mfu_note": why,
            "model_flops_note": self.flops_note,
            "hardware": self.hardware,
        }


class EvaluationCost(Callback):
    """Examples per second of the final validation and test passes (generation, or scoring with eval.mode=score):
    wall time from the first batch to the last, the device synchronised, per split."""

    def __init__(self) -> None:
        self.figures: dict[str, dict[str, float]] = {}
        self._start: float | None = None
        self._examples = 0

    def _begin(self, pl_module: L.LightningModule) -> None:
        sync(pl_module.device)
        self._start, self._examples = time.perf_counter(), 0

    def _end(self, split: str, pl_module: L.LightningModule) -> None:
        if self._start is None or not self._examples:
            return
        sync(pl_module.device)
        seconds = time.perf_counter() - self._start
        self.figures[split] = {
            "examples": self._examples,
            "seconds": seconds,
            "examples_per_s": self._examples / seconds,
        }
        self._start = None

    def on_validation_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.state.fn == "validate":  # the final validate(), not the evaluations inside fit
            self._begin(pl_module)

    def on_validation_batch_end(
        self,
        trainer: L.Trainer,
        pl_module: L.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        if self._start is not None:  # a timed pass: not the validations inside fit
            self._examples += batch["input_ids"].shape[0]

    on_test_batch_end = on_validation_batch_end  # a test pass is always timed (on_test_epoch_start)

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._end("val", pl_module)

    def on_test_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._begin(pl_module)

    def on_test_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._end("test", pl_module)

    def cost(self) -> dict[str, Any]:
        return {f"eval_{split}_{k}": v for split, figures in self.figures.items() for k, v in figures.items()}


@contextmanager
def eager_attention(model: nn.Module):
    """Count attention: neither fvcore nor FlopCounterMode sees the matmuls inside SDPA kernels.

    Every sub-model's config is switched, not only the top one: T5's encoder and decoder hold their own copies,
    and `set_attn_implementation` of some transformers releases (5.17) leaves those on SDPA.
    """
    # the whole model: the backbone and a prompt module's own encoder (IDPG/LoPA with method.encoder=<model>)
    configs = {
        id(m.config): m.config for m in model.modules() if hasattr(getattr(m, "config", None), "_attn_implementation")
    }
    previous = {key: config._attn_implementation for key, config in configs.items()}
    for config in configs.values():
        config._attn_implementation = "eager"
    try:
        yield
    finally:
        for key, config in configs.items():
            config._attn_implementation = previous[key]


class _InferenceForward(nn.Module):
    """What inference costs per example: a seq2seq backbone's encoder over [prompt ; input] and decoder over the label
    length; a causal backbone's one pass over prompt, input and label."""

    def __init__(self, system: nn.Module, inputs: Mapping[str, Tensor]) -> None:
        super().__init__()
        self.system, self.inputs = system, inputs

    def forward(self, input_ids: Tensor, attention_mask: Tensor, labels: Tensor) -> Tensor:
        embeds, mask, _ = self.system.encoder_inputs(input_ids, attention_mask, self.inputs)
        return self.system.kind.inference_logits(self.system.backbone, embeds, mask, labels)


def inference_flops(system: nn.Module, batch: dict[str, Tensor]) -> float:
    """fvcore FLOPs (multiply-adds) of one inference forward, per example of `batch`."""
    wrapper = _InferenceForward(system, system.prompt_inputs(batch))
    was_training = system.training
    system.eval()
    try:
        analysis = FlopCountAnalysis(wrapper, (batch["input_ids"], batch["attention_mask"], batch["labels"]))
        analysis.unsupported_ops_warnings(False)
        analysis.uncalled_modules_warnings(False)
        analysis.tracer_warnings("none")
        return analysis.total() / batch["input_ids"].shape[0]
    finally:
        system.train(was_training)


def train_step_flops(system: nn.Module, batch: dict[str, Tensor]) -> float:
    """FLOPs (multiply-adds) of forward + backward of one training step, per example of `batch`.

    Backward through a frozen backbone computes activation gradients only, so a prompt method's step
    costs about 2x its forward; full fine-tuning's about 3x.
    """
    was_training = system.training
    system.train()
    try:
        with FlopCounterMode(display=False) as counter:
            loss, _, _ = system(
                batch["input_ids"], batch["attention_mask"], batch["labels"], system.prompt_inputs(batch)
            )
            loss.backward()
    finally:
        system.zero_grad(set_to_none=True)
        system.train(was_training)
    return counter.get_total_flops() / 2 / batch["input_ids"].shape[0]


class FlopCounter(Callback):
    """Counts FLOPs per example once, on `num_batches` real training batches, outside the timed loop."""

    def __init__(self, num_batches: int = 4, count_training: bool = True) -> None:
        self.num_batches = num_batches
        self.count_training = count_training
        self.figures: dict[str, float] = {}

    def _count(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.figures or trainer.datamodule is None:
            return
        if isinstance(trainer.strategy, FSDPStrategy | DeepSpeedStrategy):
            # sharded weights cannot be traced module by module; FLOPs per example do not depend on the strategy
            self.figures["flops_note"] = "not counted under sharded training; run once with trainer=gpu to count"
            return
        rng = torch.get_rng_state()  # counting must not change the run's random stream (loader seed, noise)
        # The first batches in file order, unshuffled: every method and seed is counted on the same inputs.
        loader = trainer.datamodule.train_dataloader()
        fixed = DataLoader(loader.dataset, batch_size=loader.batch_size, collate_fn=loader.collate_fn, shuffle=False)
        device = pl_module.device
        batches = [pl_module.transfer_batch_to_device(b, device, 0) for b in itertools.islice(fixed, self.num_batches)]
        with eager_attention(pl_module):
            self.figures["inference_flops_per_example"] = statistics.mean(
                inference_flops(pl_module, b) for b in batches
            )
            if self.count_training:
                self.figures["train_flops_per_example"] = statistics.mean(
                    train_step_flops(pl_module, b) for b in batches
                )
        torch.set_rng_state(rng)
        self.figures["mean_input_tokens"] = statistics.mean(
            float(b["attention_mask"].sum(1).float().mean()) for b in batches
        )
        for logger in trainer.loggers:
            logger.log_metrics({f"cost/{k}": v for k, v in self.figures.items() if isinstance(v, float)})

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._count(trainer, pl_module)

    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.training:  # evaluation-only runs are counted too
            with torch.enable_grad(), torch.inference_mode(False):
                self._count(trainer, pl_module)

    def cost(self) -> dict[str, float]:
        return dict(self.figures)
