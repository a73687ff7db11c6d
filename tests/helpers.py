"""Building a system and a batch from the real config tree, for tests that drive the module directly."""

from __future__ import annotations

import os
import signal
import signal as signal_module
import threading
from typing import Any

import torch
from conftest import CONFIGS
from lightning.pytorch.callbacks import Callback
from omegaconf import DictConfig, OmegaConf
from transformers import ByT5Tokenizer, PreTrainedTokenizerBase

from smop.backbones import build_tokenizer
from smop.builders import build_datamodule, build_system
from smop.data import TaskDataModule
from smop.module import PromptTuningSystem

# 201 rows: 180 train (the floor of 90% of each label), an even count that two DDP ranks share without padding
SYNTHETIC = ["dataset=synthetic_mixture", "dataset.synthetic.num_train=201", "dataset.synthetic.num_test=40"]


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


class SignalAt(Callback):
    """Sends this process a real signal (`times` times) in the middle of something: the optimizer step after `step`
    steps (after its backward, before its update), the validation of epoch `validation_epoch`, or the final test."""

    def __init__(
        self,
        signal: str = "SIGTERM",
        step: int | None = None,
        validation_epoch: int | None = None,
        test: bool = False,
        times: int = 1,
    ) -> None:
        self.signum = getattr(signal_module, signal)
        self.step, self.validation_epoch, self.test, self.times = step, validation_epoch, test, times
        self.sent = False

    def _send(self) -> None:
        if not self.sent:
            self.sent = True
            for _ in range(self.times):
                os.kill(os.getpid(), self.signum)

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        if trainer.global_step == self.step:
            self._send()

    def on_validation_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0) -> None:
        if trainer.state.fn == "fit" and not trainer.sanity_checking and trainer.current_epoch == self.validation_epoch:
            self._send()

    def on_test_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0) -> None:
        if self.test:
            self._send()


class SigkillAt(Callback):
    """SIGKILLs this process `delay` seconds after a moment of the test's choosing, which nothing in the process can
    react to: the update of optimizer step `step` (`at=step`), the validation of epoch `epoch` (`at=validation`), or
    the writing of the checkpoint at step `step` (`at=checkpoint`)."""

    def __init__(self, at: str, step: int | None = None, epoch: int | None = None, delay: float = 0.0) -> None:
        self.at, self.step, self.epoch, self.delay = at, step, epoch, delay
        self.armed = False

    def _kill(self) -> None:
        if not self.armed:
            self.armed = True
            threading.Timer(self.delay, os.kill, (os.getpid(), signal_module.SIGKILL)).start()

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        if self.at == "step" and trainer.global_step == self.step:
            self._kill()

    def on_validation_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0) -> None:
        if self.at == "validation" and trainer.state.fn == "fit" and trainer.current_epoch == self.epoch:
            self._kill()

    def on_save_checkpoint(self, trainer, pl_module, checkpoint) -> None:
        if self.at == "checkpoint" and trainer.global_step == self.step:
            self._kill()


class LastCheckpointSteps(Callback):
    """Records the step that checkpoints/last.ckpt holds at the start of every epoch."""

    steps: list[int] = []

    def __init__(self, path: str) -> None:
        self.path = path
        LastCheckpointSteps.steps = []

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        if os.path.exists(self.path):
            LastCheckpointSteps.steps.append(torch.load(self.path, weights_only=True)["global_step"])


def build_with_data(cfg: DictConfig) -> tuple[PromptTuningSystem, TaskDataModule]:
    """The system and its datamodule (set up), for tests that compose their own batches."""
    tokenizer = build_tokenizer(cfg.model.name_or_path)
    datamodule = build_datamodule(cfg, tokenizer)
    return build_system(cfg, datamodule, tokenizer), datamodule


def task_datamodule(task: str, tokenizer: PreTrainedTokenizerBase | None = None, **overrides: Any) -> TaskDataModule:
    """The DataModule of smop/configs/dataset/<task>.yaml (byte-level tokenizer, split seed 0), with overrides; its
    interpolations resolved as in a composed config (a template style chooses the template)."""

    raw = OmegaConf.load(CONFIGS / "dataset" / f"{task}.yaml")
    raw.split_seed = 0
    for key in ("template_style", "templates"):  # read by the template's interpolation (record.yaml)
        if key in overrides:
            raw[key] = overrides.pop(key)
    options = OmegaConf.to_container(OmegaConf.create({"dataset": raw}), resolve=True)["dataset"]
    options = {k: v for k, v in options.items() if k not in ("_target_", "epochs")}
    options.update(overrides)
    return TaskDataModule(tokenizer=tokenizer or ByT5Tokenizer(), **options)
