"""torch.compile of the training step's backbone call (model.compile), and its compilation timed apart.

What is compiled is the backbone kind's loss function (backbone forward + loss), not a module: no wrapper enters
the module tree, so state_dict keys and checkpoints are the same with and without compile, and generation and FLOP
counting (fvcore traces, eager attention) run the plain modules."""

from __future__ import annotations

import functools
import time
import weakref
from collections.abc import Callable
from typing import Any

import lightning as L
import torch
import torch.fx.experimental._config as fx_config
from lightning.pytorch.callbacks import Callback
from torch import nn
from torch.utils.data import DataLoader

from smop.costs import sync

# What the last compile in this process was for: its options and the model it ran. Dynamo caches compiled graphs on
# the function's code, guarded partly by object ids, which a freed model's successor may reuse: a later
# torch.compile of the same code can be served the earlier graphs whatever its own backend or mode (seen with a
# benchmark's second run in one process). And each new model adds entries to that one cache until dynamo's
# recompile limit (8), after which it runs eager without saying so: the ninth job of a multirun in one process
# would train uncompiled. Another model or other options therefore drop the cache; the same model with the same
# options (a benchmark's variants and settings on its one backbone) keeps it.
_compiled_for: tuple[dict[str, Any], weakref.ref] | None = None


def compile_loss(loss: Callable[..., Any], options: dict[str, Any], model: nn.Module) -> Callable[..., Any]:
    """`loss` compiled lazily (on its first call) with model.compile_options: backend, mode, dynamic, for `model`
    (the backbone it runs: see _compiled_for).

    Traced without duck shaping: by default dynamo gives sizes that happen to be equal at the first call one symbol
    (batch 8 and an 8-token target) and recompiles once they differ, a recompilation per coincidence (tens of
    seconds each with inductor on a GPU, and none after the recompile limit). Each size its own symbol, the step
    compiles once for every batch size and length but 1 (which torch always specialises)."""
    global _compiled_for
    if _compiled_for is not None and (_compiled_for[0] != options or _compiled_for[1]() is not model):
        torch.compiler.reset()  # see _compiled_for
    _compiled_for = (dict(options), weakref.ref(model))
    compiled = torch.compile(loss, backend=options["backend"], mode=options.get("mode"), dynamic=options.get("dynamic"))

    @functools.wraps(loss)
    def step_loss(*args: Any, **kwargs: Any) -> Any:
        with fx_config.patch(use_duck_shape=False):  # read while tracing only; the guards do not depend on it
            return compiled(*args, **kwargs)

    return step_loss


class CompileWarmup(Callback):
    """Compiles before the timed loop, so step times and examples/s exclude compilation: one forward + backward of
    the compiled step on the first training batch (file order), under the run's precision, reported as
    cost.compile_time_s (compilation plus that one step). Gradients are dropped and every random state restored, so
    the run continues exactly as without the warm-up (as the FLOP counter does).

    With several ranks it is skipped (a backward outside DDP's forward would confuse its reducer): the first steps
    compile then, and compile_time_s is null."""

    def __init__(self) -> None:
        self.compile_time: float | None = None

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        from smop.module import rng_state, set_rng_state

        if getattr(pl_module, "compile_options", None) is None or trainer.world_size > 1:
            return
        if trainer.datamodule is None:
            return
        state = rng_state()  # building a loader's iterator draws a seed from the global generator
        loader = trainer.datamodule.train_dataloader()
        fixed = DataLoader(loader.dataset, batch_size=loader.batch_size, collate_fn=loader.collate_fn, shuffle=False)
        batch = pl_module.transfer_batch_to_device(next(iter(fixed)), pl_module.device, 0)
        sync(pl_module.device)
        start = time.perf_counter()
        with trainer.precision_plugin.train_step_context():
            loss, _, _ = pl_module(
                batch["input_ids"],
                batch["attention_mask"],
                batch["labels"],
                pl_module.prompt_inputs(batch),
                loss_fn=pl_module.step_loss,
            )
        loss.backward()
        sync(pl_module.device)
        self.compile_time = time.perf_counter() - start
        pl_module.zero_grad(set_to_none=True)
        set_rng_state(state)

    def cost(self) -> dict[str, Any]:
        return {"compile_time_s": self.compile_time}


def compile_callbacks(system: L.LightningModule) -> list[Callback]:
    """The warm-up when the system's step is compiled; none otherwise."""
    return [CompileWarmup()] if getattr(system, "compile_options", None) is not None else []
