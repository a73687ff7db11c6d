"""Building a system and a batch from the real config tree, for tests that drive the module directly."""

from __future__ import annotations

import os
import signal

import torch
from lightning.pytorch.callbacks import Callback
from omegaconf import DictConfig

from smop.backbones import build_tokenizer
from smop.module import PromptTuningSystem
from smop.run import build_datamodule, build_system

SYNTHETIC = ["dataset=synthetic_mixture", "dataset.synthetic.num_train=200", "dataset.synthetic.num_test=40"]


def build(cfg: DictConfig) -> tuple[PromptTuningSystem, dict]:
    """The system `train.py` would build for `cfg`, and a fixed batch: the first rows of its train split
    (the same for every method, whatever the methods' initialisations do to the shuffling RNG)."""
    tokenizer = build_tokenizer(cfg.model.name_or_path)
    datamodule = build_datamodule(cfg, tokenizer)
    system = build_system(cfg, datamodule, tokenizer)
    return system, datamodule.collate(datamodule.splits["train"][: datamodule.batch_size])


def fit_fixed_batch(system: PromptTuningSystem, batch: dict, optimizer, steps: int) -> list[float]:
    """Train on one batch for `steps` steps; the losses, to check that a method can learn at all."""
    system.train()
    losses = []
    for _ in range(steps):
        loss, _, _ = system(batch["input_ids"], batch["attention_mask"], batch["labels"])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses


class SigtermAt(Callback):
    """Sends this process a real SIGTERM after a given optimizer step or at the end of a given epoch."""

    def __init__(self, step: int | None = None, epoch_end: int | None = None) -> None:
        self.step, self.epoch_end = step, epoch_end

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step == self.step:
            os.kill(os.getpid(), signal.SIGTERM)

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        if trainer.current_epoch == self.epoch_end:
            os.kill(os.getpid(), signal.SIGTERM)


class FirstStep(Callback):
    """Records the optimizer step a (resumed) fit starts at."""

    first: int | None = None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if FirstStep.first is None:
            FirstStep.first = trainer.global_step


class PoisonPromptAt(Callback):
    """Turns the prompt into NaN before a given step: the loss of that step is NaN."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step == self.step:
            with torch.no_grad():
                next(pl_module.prompt.parameters()).fill_(float("nan"))
