"""What a run costs, measured by callbacks: training time, peak memory, FLOPs per example.

Time excludes evaluation. FLOPs are counted once, before the timed loop, on real batches of the
training data (dynamic padding included), with eager attention so that the attention matmuls count:
fvcore for the inference forward (seq2seq: encoder + decoder over the label length; causal: one pass over prompt,
input and label) and torch's FlopCounterMode for a training step (forward + backward), both as multiply-adds
(fvcore's convention).
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


class TrainingCost(Callback):
    """Training wall time without evaluation, median step time, examples per second, peak memory."""

    def __init__(self) -> None:
        self.step_times: list[float] = []
        self.train_time = 0.0
        self.examples = 0
        self._epoch_start: float | None = None
        self._step_start = 0.0
        self.memory: tuple[int, str] | None = None

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
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

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._pause(pl_module)
        self.memory = peak_memory(pl_module.device)
        for logger in trainer.loggers:
            logger.log_metrics({f"cost/{k}": v for k, v in self.cost().items() if isinstance(v, int | float)})

    def cost(self) -> dict[str, Any]:
        if not self.step_times:
            return {}
        memory, kind = self.memory or (None, None)
        return {
            "train_time_s": self.train_time,
            "step_time_s_median": statistics.median(self.step_times),
            "train_examples_per_s": self.examples / self.train_time if self.train_time else None,
            "peak_memory_bytes": memory,
            "memory_kind": kind,
        }


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
