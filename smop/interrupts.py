"""Stopping a run from outside without losing or garbling its state.

- SIGINT (Ctrl+C) and SIGTERM (a scheduler's preemption or time limit, `kill`) take one path: the step in
  progress ends, a validation in progress ends, then Lightning's own stop-at-the-next-step (its SIGTERM flag)
  stops the loop and `InterruptCheckpoint` writes checkpoints/interrupted.ckpt. A second signal stops at once.
- `EpochCheckpoint` refreshes last.ckpt at every epoch end (Lightning 2.6 only does when a best checkpoint is
  saved), so a hard kill (SIGKILL, a power cut) loses at most the epoch in progress.
- Every checkpoint is written to a temporary file and renamed: a kill during a write never leaves half a file.
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import FrameType, TracebackType
from typing import Any
from weakref import proxy

import lightning as L
from lightning.pytorch.callbacks import Callback, EarlyStopping, ModelCheckpoint
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities.exceptions import SIGTERMException

log = logging.getLogger(__name__)

EXIT_CODES = {signal.SIGINT: 130, signal.SIGTERM: 143}  # 128 + the signal number, as a shell reports them
INTERRUPTED = "interrupted.ckpt"
LAST = "last.ckpt"


class RunStopped(SystemExit):
    """A run stopped by a signal: exits 130 (SIGINT) or 143 (SIGTERM), never 0; `message` says where and how on."""

    def __init__(self, message: str, code: int) -> None:
        super().__init__(code)
        self.message = message

    def __str__(self) -> str:
        return self.message


def save_atomically(trainer: L.Trainer, path: str | Path, weights_only: bool = False) -> None:
    """trainer.save_checkpoint into a temporary name, then a rename: the file at `path` is always whole."""
    path = str(path)
    partial = f"{path}.partial"
    trainer.save_checkpoint(partial, weights_only)  # ends with a barrier: every rank has written its part
    if trainer.is_global_zero:
        if os.path.isdir(path) and not os.path.islink(path):  # sharded strategies write a folder
            shutil.rmtree(path)
        os.replace(partial, path)


def fitting(trainer: L.Trainer) -> bool:
    return trainer.state.fn == TrainerFn.FITTING and not trainer.sanity_checking


def evaluating(trainer: L.Trainer) -> bool:
    return trainer.validating or trainer.sanity_checking


class StopSignals(Callback):
    """SIGINT and SIGTERM for the duration of one run, as a context manager and a callback of its trainer.

    In training the first signal asks for a stop at the next step boundary (Lightning's SIGTERM flag, which its
    loops check after each step and each epoch), deferred to the end of a validation in progress: so the step is
    not lost and the interrupted epoch is validated and checkpointed. Outside training, or at a second signal,
    it raises KeyboardInterrupt at once. `received` is the first signal, for the exit status.
    """

    def __init__(self) -> None:
        self.received: signal.Signals | None = None
        self.trainer: L.Trainer | None = None
        self._previous: dict[signal.Signals, Any] = {}

    # --- the handlers ----------------------------------------------------------------------------------------
    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():  # signal.signal works in the main thread only
            self._previous = {signum: signal.signal(signum, self._handle) for signum in EXIT_CODES}
        return self

    def __exit__(self, *exc: type[BaseException] | BaseException | TracebackType | None) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous = {}

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        first, self.received = self.received is None, self.received or signal.Signals(signum)
        trainer = self.trainer
        if not first or trainer is None or trainer.state.fn != TrainerFn.FITTING:
            raise KeyboardInterrupt
        # Lightning's own SIGTERM handler (composed before this one during fit) may have set the flag already:
        # during a validation it waits for `on_validation_end`, or the validation would be cut short
        trainer._signal_connector.received_sigterm = not evaluating(trainer)
        log.warning(
            "%s received: stopping after the %s in progress (send it again to stop at once)",
            signal.Signals(signum).name,
            "validation" if evaluating(trainer) else "step",
        )

    # --- the trainer's hooks ---------------------------------------------------------------------------------
    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.trainer = trainer

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._stop_if_asked(trainer)  # Lightning clears its flag when it installs its handlers, after on_fit_start

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._stop_if_asked(trainer)

    def _stop_if_asked(self, trainer: L.Trainer) -> None:
        if self.received is not None and trainer.state.fn == TrainerFn.FITTING:
            trainer._signal_connector.received_sigterm = True

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.trainer = None

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        self.trainer = None

    def stopped_by(self, err: BaseException) -> signal.Signals | None:
        """The signal behind `err`, if a signal stopped the run (Lightning turns Ctrl+C into SystemExit(1))."""
        if self.received is not None and isinstance(err, KeyboardInterrupt | SystemExit):
            return self.received
        if isinstance(err, SIGTERMException):
            return signal.SIGTERM
        return signal.SIGINT if isinstance(err, KeyboardInterrupt) else None


def between_epochs(trainer: L.Trainer) -> bool:
    """Whether the loop stands after an epoch that Lightning counted `completed`, before the next one began."""
    progress = trainer.fit_loop.epoch_progress.total
    return progress.ready == progress.completed > 0


def position(trainer: L.Trainer) -> tuple[str, int, int]:
    """Where training stands, in words, and as (epoch, step)."""
    if between_epochs(trainer):
        epoch = trainer.current_epoch - 1
        return f"at the end of epoch {epoch}, step {trainer.global_step}", epoch, trainer.global_step
    return f"at epoch {trainer.current_epoch}, step {trainer.global_step}", trainer.current_epoch, trainer.global_step


@contextmanager
def as_at_epoch_end(trainer: L.Trainer) -> Iterator[None]:
    """A stop between two epochs comes after Lightning counted the epoch `completed`; a checkpoint of that state
    resumes past the next epoch (Lightning's restart logic expects `processed = completed + 1`, the state of its
    own `on_train_epoch_end` checkpoints). Saved as that state, it resumes at the next epoch's first batch."""
    progress, shift = trainer.fit_loop.epoch_progress, between_epochs(trainer)
    if shift:
        progress.total.completed -= 1
        progress.current.completed -= 1
    try:
        yield
    finally:
        if shift:
            progress.total.completed += 1
            progress.current.completed += 1


class InterruptCheckpoint(Callback):
    """checkpoints/interrupted.ckpt when a signal stopped training at a step boundary; `ckpt_path=last` resumes
    from the newer of it and last.ckpt. Any other exception (a NaN loss, a bug, a second Ctrl+C in the middle of
    a step) may leave the state bad: nothing is written then, and the checkpoints saved so far stay the last good
    ones. A run whose training finishes deletes the file."""

    def __init__(self, dirpath: str, filename: str = "interrupted") -> None:
        self.path = Path(dirpath) / f"{filename}.ckpt"
        self.saved: Path | None = None

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        if isinstance(exception, SIGTERMException) and fitting(trainer) and not trainer.fast_dev_run:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with as_at_epoch_end(trainer):
                save_atomically(trainer, self.path)
            self.saved = self.path

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.is_global_zero and self.path.is_file():
            self.path.unlink()


class EpochCheckpoint(ModelCheckpoint):
    """Lightning's ModelCheckpoint (best by val/score, for the test set) that also writes last.ckpt at the end of
    every validation and every epoch, and writes each file atomically.

    Lightning 2.6.6 refreshes last.ckpt only when a best checkpoint is saved: after a hard kill `ckpt_path=last`
    could go back many epochs. This relies on ModelCheckpoint's `_save_last_checkpoint` and `_save_checkpoint`
    (lightning is pinned in constraints.txt)."""

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().on_train_start(trainer, pl_module)
        # resumed from the checkpoint of an epoch where early stopping ended the run (the run was stopped later,
        # in its final evaluation): Lightning does not save `should_stop`, and would train another epoch
        if any(isinstance(cb, EarlyStopping) and cb.stopped_epoch > 0 for cb in trainer.callbacks):
            trainer.should_stop = True

    def _refresh_last(self, trainer: L.Trainer) -> None:
        if self.save_last and not self._should_skip_saving_checkpoint(trainer):  # skips a step already saved
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().on_validation_end(trainer, pl_module)
        self._refresh_last(trainer)

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().on_train_epoch_end(trainer, pl_module)
        self._refresh_last(trainer)  # epochs without a validation (check_val_every_n_epoch > 1)

    def _save_checkpoint(self, trainer: L.Trainer, filepath: str) -> None:
        save_atomically(trainer, filepath, self.save_weights_only)
        self._last_global_step_saved = trainer.global_step
        self._last_checkpoint_saved = filepath
        if trainer.is_global_zero:  # as the parent: loggers that upload checkpoints (wandb log_model) hear of it
            for logger in trainer.loggers:
                logger.after_save_checkpoint(proxy(self))
