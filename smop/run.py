"""One run, start to finish: check -> data -> backbone -> prompt -> system -> fit -> validate/test -> results.json."""

from __future__ import annotations

import logging
import warnings
from typing import Any

import lightning as L
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.utils import get_class, instantiate
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.utilities import rank_zero_only
from omegaconf import DictConfig, OmegaConf

from smop.backbones import build_backbone, build_tokenizer
from smop.checks import check_config, check_devices, method_routes
from smop.data import SuperGLUEDataModule
from smop.distributed import isolated_job, launch_ranks_per_job
from smop.module import PromptTuningSystem
from smop.prompts.base import PromptModule
from smop.prompts.instance import encoder_tokenizer
from smop.results import print_summary, versions, write_results
from smop.wandb_logging import finish_wandb, wandb_callbacks

log = logging.getLogger(__name__)
# The frozen backbone is in eval mode on purpose (no dropout in weights that do not train).
warnings.filterwarnings("ignore", message=r".*module\(s\) in eval mode at the start of training")


def choice(group: str) -> str | None:
    """The config name chosen for a group (e.g. router=top2 -> "top2"), when Hydra is running."""
    return HydraConfig.get().runtime.choices.get(group) if HydraConfig.initialized() else None


def build_datamodule(cfg: DictConfig, tokenizer: Any, setup: bool = True) -> SuperGLUEDataModule:
    """Read, split and tokenize the data now, so a malformed file fails before the model is built.

    `setup=False` reads nothing: the task and the training's truncation, for labelling new inputs (smop.predict)."""
    options = {k: v for k, v in cfg.dataset.items() if k != "epochs"}  # `epochs` is read by the trainer config
    datamodule = instantiate(
        OmegaConf.create(options),
        tokenizer=tokenizer,
        prompt_length=cfg.method.get("prompt_length", 0),
        seed=cfg.seed,
        encoder_tokenizer=encoder_tokenizer(cfg.method.get("encoder")),  # IDPG/LoPA with a separate encoder
        _convert_="all",
    )
    if setup:
        datamodule.setup()
    return datamodule


def build_prompt(cfg: DictConfig, backbone: torch.nn.Module, tokenizer: Any) -> PromptModule | None:
    if cfg.method.get("module") is None:
        return None
    extra = {"router": instantiate(cfg.router)} if method_routes(cfg) else {}
    if getattr(get_class(cfg.method.module._target_), "needs_backbone", False):
        extra["backbone"] = backbone
    return instantiate(cfg.method.module, embedding=backbone.get_input_embeddings(), tokenizer=tokenizer, **extra)


def build_system(cfg: DictConfig, datamodule: SuperGLUEDataModule, tokenizer: Any) -> PromptTuningSystem:
    tiny = OmegaConf.to_container(cfg.model.tiny) if cfg.model.get("tiny") else None
    backbone = build_backbone(cfg.model.name_or_path, tiny)
    return PromptTuningSystem(
        backbone=backbone,
        tokenizer=tokenizer,
        task=datamodule.task,
        prompt=build_prompt(cfg, backbone, tokenizer),
        optimizer=instantiate(cfg.optimizer),
        warmup_ratio=cfg.warmup_ratio,
        warmup_steps=cfg.get("warmup_steps"),
        lr_schedule=cfg.method.get("lr_schedule", "linear"),
        max_new_tokens=datamodule.max_target_length,
        train_backbone=cfg.method.train_backbone,
        train_dropout=cfg.method.get("train_dropout", True),
        lora=OmegaConf.to_container(cfg.method.lora) if cfg.method.get("lora") else None,
        config=OmegaConf.to_container(cfg, resolve=True),
    )


def instantiate_group(group: DictConfig | None) -> list[Any]:
    """Callbacks or loggers: every entry of the group that has a `_target_`."""
    return [instantiate(entry) for entry in (group or {}).values() if entry is not None and "_target_" in entry]


def count_parameters(module: torch.nn.Module) -> dict[str, int]:
    return {
        "trainable": sum(p.numel() for p in module.parameters() if p.requires_grad),
        "total": sum(p.numel() for p in module.parameters()),
    }


def strip_prefix(metrics: dict[str, Any], split: str) -> dict[str, float]:
    return {k.split("/", 1)[1]: float(v) for k, v in metrics.items() if k.startswith(f"{split}/")}


def cost_summary(callbacks: list[Callback]) -> dict[str, Any]:
    """Every callback with a `cost()` method contributes its figures to results.json's `cost`."""
    cost: dict[str, Any] = {}
    for callback in callbacks:
        if hasattr(callback, "cost"):
            cost.update(callback.cost())
    return cost


def best_checkpoint(callbacks: list[Callback]) -> tuple[str | None, int | None]:
    """Path and epoch of the checkpoint with the best validation score (not the last one)."""
    for callback in callbacks:
        if isinstance(callback, ModelCheckpoint) and callback.best_model_path:
            epoch = torch.load(callback.best_model_path, map_location="cpu", weights_only=True)["epoch"]
            return callback.best_model_path, epoch
    return None, None


def run(cfg: DictConfig) -> dict[str, Any]:
    """Train (or only evaluate) one configuration and write its results.json, also when it fails."""
    with isolated_job():  # a multirun's next job in this process starts clean of this job's DDP state
        return run_job(cfg)


def run_job(cfg: DictConfig) -> dict[str, Any]:
    results: dict[str, Any] = {
        "method": cfg.method.name,
        "router": choice("router") if cfg.get("router") is not None else None,
        "dataset": cfg.dataset.name,
        "model": cfg.model.name_or_path,
        "seed": cfg.seed,
        "params": None,
        "metrics": {"val": None, "test": None, "best_epoch": None},
        "cost": {},
        "routing": {"counts": {}},
        "versions": versions(),
        "config": OmegaConf.to_container(cfg, resolve=True),
        "status": "running",
    }
    system, callbacks = None, []
    try:
        check_config(cfg, choice("router"))
        check_devices(cfg.trainer)
        launch_ranks_per_job()
        L.seed_everything(cfg.seed, workers=True)
        tokenizer = build_tokenizer(cfg.model.name_or_path)
        datamodule = build_datamodule(cfg, tokenizer)
        system = build_system(cfg, datamodule, tokenizer)
        callbacks, loggers = instantiate_group(cfg.get("callbacks")), instantiate_group(cfg.get("logger"))
        callbacks += wandb_callbacks(loggers)  # routing histograms, when a WandbLogger is configured
        trainer: L.Trainer = instantiate(cfg.trainer, callbacks=callbacks, logger=loggers or False)
        results["params"] = count_parameters(system)
        log.info("parameters: {trainable:,} trainable / {total:,} total".format(**results["params"]))
        if cfg.train:
            trainer.fit(system, datamodule=datamodule, ckpt_path=cfg.get("ckpt_path"))
            checkpoint, results["metrics"]["best_epoch"] = best_checkpoint(callbacks)
        else:
            checkpoint = cfg.ckpt_path
        validated = trainer.validate(system, datamodule=datamodule, ckpt_path=checkpoint)
        results["metrics"]["val"] = strip_prefix(validated[0], "val")
        if cfg.test:
            tested = trainer.test(system, datamodule=datamodule, ckpt_path=checkpoint)
            results["metrics"]["test"] = strip_prefix(tested[0], "test")
        results["status"] = "completed"
    except BaseException as err:
        results["status"] = "failed"
        results["error"] = f"{type(err).__name__}: {err}"
        raise
    finally:
        results["cost"] = cost_summary(callbacks)
        results["routing"]["counts"] = dict(system.routing_counts) if system is not None else {}
        if rank_zero_only.rank == 0:  # one results.json per run, also under DDP
            write_results(cfg.paths.output_dir, results)
            finish_wandb(callbacks, results)  # final tables, then wandb.finish(): multirun jobs never merge
            if results["status"] == "completed":
                print_summary(results)
    return results
