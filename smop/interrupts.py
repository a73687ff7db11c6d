"""Survive interruptions: a checkpoint on SIGTERM / Ctrl+C, which `ckpt_path=last` then resumes from."""

from __future__ import annotations

from typing import Any

import lightning as L
from lightning.pytorch.callbacks import OnExceptionCheckpoint
from lightning.pytorch.utilities.exceptions import SIGTERMException


class InterruptCheckpoint(OnExceptionCheckpoint):
    """Lightning's on-exception checkpoint, written only when the run is stopped from outside.

    SIGTERM (a scheduler's preemption, `kill`, submitit's timeout) and Ctrl+C stop the loop at a step boundary,
    so the state is consistent. Any other exception (a NaN loss, a bug) may leave the state bad: nothing is
    written then, and the checkpoints saved so far stay the last good ones. `ckpt_path=last` picks the newest
    of this file and `last.ckpt`; a run that finishes deletes this file.
    """

    def on_exception(self, trainer: L.Trainer, *args: Any, **kwargs: Any) -> None:
        exception = args[-1] if args else kwargs.get("exception")
        if isinstance(exception, SIGTERMException | KeyboardInterrupt) and trainer.training:
            super().on_exception(trainer, *args, **kwargs)
