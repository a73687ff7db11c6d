"""One run, start to finish: check -> data -> backbone -> prompt -> system -> fit -> validate/test -> results.json."""

from __future__ import annotations

import logging
import signal
import warnings
from typing import Any

import lightning as L
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.utils import get_class, instantiate
from lightning.pytorch.callbacks import Callback, EarlyStopping, ModelCheckpoint
from lightning.pytorch.utilities import rank_zero_only
from omegaconf import DictConfig, OmegaConf

from smop.backbones import BackboneKindError, HubUnreachableError, build_tokenizer, model_kind
from smop.builders import build_datamodule, build_system, count_parameters, instantiate_group
from smop.checks import Refused, check_config, check_devices, check_method_on_kind
from smop.compiling import compile_callbacks
from smop.distributed import isolated_job, launch_ranks_per_job
from smop.fast_path import resolve_fast_path
from smop.interrupts import EXIT_CODES, InterruptCheckpoint, RunStopped, StopSignals, position
from smop.results import print_summary, versions, write_results
from smop.resume import (
    check_run_folder,
    earlier_attempts,
    newest_checkpoint,
    resume_command,
    router_name,
    saved_checkpoints,
    starting_point,
    task_overrides,
)
from smop.wandb_logging import finish_wandb, wandb_callbacks

log = logging.getLogger(__name__)
# Errors whose message is the whole story (what failed, what to do): train.py prints them as one line.
BRIEF_ERRORS = (HubUnreachableError, ConnectionError, Refused, BackboneKindError)
# With method.train_dropout=false (FPT) the frozen backbone is in eval mode on purpose.
warnings.filterwarnings("ignore", message=r".*module\(s\) in eval mode at the start of training")


def choice(group: str) -> str | None:
    """The config name chosen for a group (e.g. router=top2 -> "top2"), when Hydra is running."""
    return HydraConfig.get().runtime.choices.get(group) if HydraConfig.initialized() else None


def strip_prefix(metrics: dict[str, Any], split: str) -> dict[str, float]:
    return {k.split("/", 1)[1]: float(v) for k, v in metrics.items() if k.startswith(f"{split}/")}


def cost_summary(callbacks: list[Callback]) -> dict[str, Any]:
    """Every callback with a `cost()` method contributes its figures to results.json's `cost`."""
    cost: dict[str, Any] = {}
    for callback in callbacks:
        if hasattr(callback, "cost"):
            cost.update(callback.cost())
    return cost


def best_checkpoint(callbacks: list[Callback]) -> tuple[str | None, int | None, int | None]:
    """Path, epoch and optimizer step of the checkpoint with the best validation score (not the last one): the step
    places a step-based evaluation (trainer=steps) that the epoch does not."""
    for callback in callbacks:
        if isinstance(callback, ModelCheckpoint) and callback.best_model_path:
            saved = torch.load(callback.best_model_path, map_location="cpu", weights_only=True)
            return callback.best_model_path, saved["epoch"], saved["global_step"]
    return None, None, None


def final_checkpoint_only(callbacks: DictConfig | None) -> DictConfig | None:
    """The callbacks config of a run without a validation set (split_protocol=lopa, as the LoPA reference: the final
    checkpoint is tested): no early stopping, and the checkpoint kept is the newest, written at each epoch's end."""
    if callbacks is None:
        return None
    kept = {}
    for name, entry in callbacks.items():
        target = get_class(entry._target_) if entry is not None and "_target_" in entry else None
        if target is not None and issubclass(target, EarlyStopping):
            continue
        entry = OmegaConf.to_container(entry, resolve=True) if entry is not None else None  # paths resolved here
        if target is not None and issubclass(target, ModelCheckpoint):
            entry.update(monitor=None, save_on_train_epoch_end=True)
        kept[name] = entry
    return OmegaConf.create(kept)


def run(cfg: DictConfig) -> dict[str, Any]:
    """Train (or only evaluate) one configuration and write its results.json, also when it fails.

    Raises RunStopped (a SystemExit: 130 after SIGINT, 143 after SIGTERM) when a signal stops it, and
    checks.Refused, before anything is written, when the command would reuse or misreport another run's state."""
    with isolated_job():  # a multirun's next job in this process starts clean of this job's DDP state
        return run_job(cfg)


def describe(cfg: DictConfig, router: str | None) -> dict[str, Any]:
    """What ran, as results.json names it."""
    return {
        "method": cfg.method.name,
        "router": router if cfg.get("router") is not None else None,
        "dataset": cfg.dataset.name,
        "model": cfg.model.name_or_path,
        "seed": cfg.seed,
        "eval_mode": OmegaConf.select(cfg, "eval.mode", default="generate"),  # how val/test predictions were made
        "config": OmegaConf.to_container(cfg, resolve=True),
    }


def run_job(cfg: DictConfig) -> dict[str, Any]:
    results: dict[str, Any] = {
        **describe(cfg, choice("router")),
        "params": None,
        "metrics": {"val": None, "test": None, "best_epoch": None, "best_step": None},
        "cost": {},
        "routing": {"counts": {}},
        "versions": versions(),
        "split": None,
        "status": "running",
    }
    system, callbacks, trainer, stage = None, [], None, "setup"
    stop, owned = StopSignals(), False
    overrides = task_overrides()
    try:
        with stop:
            previous = check_run_folder(cfg)  # refused: the folder's files stay untouched
            # a new folder records any failure; an earlier attempt's record is replaced only by one that starts
            owned = previous is None and not saved_checkpoints(cfg)
            check_config(cfg, choice("router"))
            check_devices(cfg.trainer)
            # the kind from the checkpoint's own config, before any data is read: a folder of neither kind stops here,
            # and so does a method that does not run on this kind yet
            kind = model_kind(cfg.model)
            check_method_on_kind(cfg, kind)
            start = starting_point(cfg, overrides)  # may take the checkpoint's own config (train=false)
            if start.adopted:  # the checkpoint's model or method may differ from the command line's
                kind = model_kind(cfg.model)
                check_method_on_kind(cfg, kind)
            owned = True
            router = choice("router")
            if "router" in start.adopted and cfg.get("router") is not None:  # named after the checkpoint's own
                router = router_name(OmegaConf.to_container(cfg.router))
            results.update(describe(cfg, router), resumed_from=start.record() if cfg.train else None)
            if start.adopted:
                results["config_from_checkpoint"] = start.adopted
            if start.checkpoint is not None and cfg.train and previous is not None:
                results["attempts"] = earlier_attempts(previous)
            fast = resolve_fast_path(cfg)  # once, for this machine: the config keeps `auto`, results.json the choice
            results.update(backbone_dtype=fast.backbone_dtype, fast_path=fast.record())
            launch_ranks_per_job()
            L.seed_everything(cfg.seed, workers=True)
            tokenizer = build_tokenizer(cfg.model.name_or_path)
            datamodule = build_datamodule(cfg, tokenizer, kind=kind, fast=fast)
            results["split"] = datamodule.split_info  # protocol, sizes and member hashes of train / val / test
            system = build_system(cfg, datamodule, tokenizer, fast=fast)
            validates = datamodule.validates  # split_protocol=lopa: no validation set, the final checkpoint is tested
            callback_cfg = cfg.get("callbacks") if validates else final_checkpoint_only(cfg.get("callbacks"))
            callbacks, loggers = instantiate_group(callback_cfg), instantiate_group(cfg.get("logger"))
            callbacks += wandb_callbacks(loggers)  # routing histograms, when a WandbLogger is configured
            callbacks += compile_callbacks(system)  # compiles before the timed loop: cost.compile_time_s
            no_validation = {} if validates else {"limit_val_batches": 0}
            trainer = instantiate(cfg.trainer, callbacks=[*callbacks, stop], logger=loggers or False, **no_validation)
            results["params"] = count_parameters(system)
            log.info("parameters: {trainable:,} trainable / {total:,} total".format(**results["params"]))
            checkpoint = str(start.checkpoint) if start.checkpoint is not None else None
            if cfg.train:
                stage = "training"
                trainer.fit(system, datamodule=datamodule, ckpt_path=checkpoint)
                checkpoint, results["metrics"]["best_epoch"], results["metrics"]["best_step"] = best_checkpoint(
                    callbacks
                )
            stage = "evaluation"
            if validates:
                validated = trainer.validate(system, datamodule=datamodule, ckpt_path=checkpoint)
                results["metrics"]["val"] = strip_prefix(validated[0], "val")
            if cfg.test:
                tested = trainer.test(system, datamodule=datamodule, ckpt_path=checkpoint)
                logged = {key: value for metrics in tested for key, value in metrics.items()}  # one dict per set
                results["metrics"]["test"] = strip_prefix(logged, "test")
                if "test_alt" in datamodule.splits:  # the task's other validation file (MNLI mismatched)
                    results["metrics"]["test_alt"] = strip_prefix(logged, "test_alt")
            results["status"] = "completed"
    except BaseException as err:
        results["status"] = "failed"
        signum = stop.stopped_by(err)
        if signum is None:
            results["error"] = f"{type(err).__name__}: {err}"
            raise
        results["stopped"] = stopped(cfg, signum, stage, trainer, callbacks, overrides)
        results["error"] = results["stopped"]["message"]
        log.error(results["error"])
        raise RunStopped(results["error"], EXIT_CODES[signum]) from err
    finally:
        results["cost"] = cost_summary(callbacks)
        results["routing"]["counts"] = dict(system.routing_counts) if system is not None else {}
        if owned and rank_zero_only.rank == 0:  # one results.json per run, also under DDP
            write_results(cfg.paths.output_dir, results)
            finish_wandb(callbacks, results)  # final tables, then wandb.finish(): multirun jobs never merge
            if results["status"] == "completed":
                print_summary(results)
    return results


def stopped(
    cfg: DictConfig,
    signum: signal.Signals,
    stage: str,
    trainer: L.Trainer | None,
    callbacks: list[Callback],
    overrides: list[str] | None,
) -> dict[str, Any]:
    """Where a signal stopped the run and how to resume it: one line for the terminal and results.json."""
    at, epoch, step = position(trainer) if trainer is not None and stage == "training" else ("", None, None)
    where = {
        "setup": "before training began",
        "training": f"in training {at}",
        "evaluation": "in the final evaluation (training had finished)",
    }[stage]
    written = next((cb.saved for cb in callbacks if isinstance(cb, InterruptCheckpoint) and cb.saved), None)
    try:
        newest = newest_checkpoint(cfg)
    except ValueError:  # an unreadable file: say so below, as if there were none
        newest = None
    if newest is None:
        how, command = "nothing was saved; run the same command again", None
    else:
        path, checkpoint = newest
        command = resume_command(cfg, overrides)
        saved = "saved now" if written is not None and written.resolve() == path.resolve() else "the newest"
        at = f"epoch {checkpoint['epoch']}, step {checkpoint['global_step']}"
        how = f"checkpoints/{path.name} ({saved}: {at}); resume with: {command}"
    message = f"Stopped by {signum.name} {where}: {how}"
    return {
        "signal": signum.name,
        "exit_code": EXIT_CODES[signum],
        "stage": stage,
        "epoch": epoch,
        "step": step,
        "checkpoint": str(newest[0]) if newest is not None else None,
        "resume": command,
        "message": message,
    }
