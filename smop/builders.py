"""Building a run's parts from its config: the DataModule, the prompt module, the system, callbacks and loggers.

The job runner (smop.run), export, serving, prediction, the benchmark and the tests build through here."""

from __future__ import annotations

import logging
from typing import Any

import torch
from hydra.utils import get_class, instantiate
from omegaconf import DictConfig, OmegaConf

from smop.backbones import CAUSAL, build_backbone, model_kind
from smop.backbones.decoding import Decoding
from smop.checks import method_routes
from smop.data import TaskDataModule
from smop.fast_path import FastPath, resolve_fast_path
from smop.methods.base import PromptModule
from smop.methods.instance import encoder_tokenizer
from smop.module import PromptTuningSystem

log = logging.getLogger(__name__)


def build_datamodule(
    cfg: DictConfig, tokenizer: Any, setup: bool = True, kind: str | None = None, fast: FastPath | None = None
) -> TaskDataModule:
    """Read, split and tokenize the data now, so a malformed file fails before the model is built.

    `setup=False` reads nothing: the task and the training's truncation, for labelling new inputs (smop.predict).
    `kind`: the backbone's kind when the caller has read it already (else it is read from the model's config).
    `fast`: the run's resolved fast path (else resolved here): dataset.pad_to_multiple_of, sort_eval_by_length."""
    if kind is None:
        kind = model_kind(cfg.model)
    fast = fast or resolve_fast_path(cfg)
    options = {k: v for k, v in cfg.dataset.items() if k != "epochs"}  # `epochs` is read by the trainer config
    options["pad_to_multiple_of"] = fast.pad_to_multiple_of  # `auto` resolved
    options["sort_eval_by_length"] = fast.sort_eval_by_length
    datamodule = instantiate(
        OmegaConf.create(options),
        tokenizer=tokenizer,
        prompt_length=cfg.method.get("prompt_length", 0),
        seed=cfg.seed,
        # IDPG/LoPA with a separate encoder
        encoder_tokenizer=encoder_tokenizer(
            cfg.method.get("encoder"), remote_code=bool(cfg.method.get("encoder_remote_code", False))
        ),
        causal=kind == CAUSAL,  # source and target as a causal LM reads them
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


def build_system(
    cfg: DictConfig, datamodule: TaskDataModule, tokenizer: Any, init_from: bool = True, fast: FastPath | None = None
) -> PromptTuningSystem:
    """`init_from=False`: leave method.init_from unread (a saved config rebuilt to take its own trained weights).
    `fast`: the run's resolved fast path (else resolved here): the backbone's dtype and attention, compile."""
    fast = fast or resolve_fast_path(cfg)
    tiny = OmegaConf.to_container(cfg.model.tiny) if cfg.model.get("tiny") else None
    backbone = build_backbone(cfg.model.name_or_path, tiny, fast.backbone_dtype, fast.attention)
    prompt = build_prompt(cfg, backbone, tokenizer)
    if init_from and prompt is not None and cfg.method.get("init_from"):
        initialise_prompt(cfg, prompt, backbone.get_input_embeddings().embedding_dim)
    lora = OmegaConf.to_container(cfg.method.lora, resolve=True) if cfg.method.get("lora") else None
    if lora is not None and lora.get("target_modules") is None:  # the architecture's modules (Llama: q_proj, v_proj)
        targets = cfg.model.get("lora_target_modules")
        lora["target_modules"] = list(targets) if targets is not None else None
    return PromptTuningSystem(
        backbone=backbone,
        tokenizer=tokenizer,
        task=datamodule.task,
        prompt=prompt,
        optimizer=instantiate(cfg.optimizer),
        warmup_ratio=cfg.warmup_ratio,
        warmup_steps=cfg.get("warmup_steps"),
        lr_schedule=cfg.method.get("lr_schedule", "linear"),
        max_new_tokens=datamodule.max_target_length,
        train_backbone=cfg.method.train_backbone,
        train_dropout=cfg.method.get("train_dropout", True),
        lora=lora,
        config=OmegaConf.to_container(cfg, resolve=True),
        decoding=Decoding(**datamodule.decoding),  # a code task's sampling (dataset.decoding); greedy otherwise
        sandbox=datamodule.sandbox,
        seed=cfg.seed,
        eval_mode=OmegaConf.select(cfg, "eval.mode", default="generate"),
        compile_options=fast.compile_options if fast.compile else None,
    )


def initialise_prompt(cfg: DictConfig, prompt: PromptModule, width: int) -> None:
    """The prompt's trained weights from method.init_from; a checkpoint to resume or evaluate replaces them anyway."""
    from smop.methods.init_from import initialise  # it reads our checkpoints through smop.loading, which builds here

    if cfg.get("ckpt_path"):
        log.info("method.init_from=%s left unread: ckpt_path=%s holds the weights", cfg.method.init_from, cfg.ckpt_path)
        return
    initialise(prompt, cfg, width)


def instantiate_group(group: DictConfig | None) -> list[Any]:
    """Callbacks or loggers: every entry of the group that has a `_target_`."""
    return [instantiate(entry) for entry in (group or {}).values() if entry is not None and "_target_" in entry]


def count_parameters(module: torch.nn.Module) -> dict[str, int]:
    return {
        "trainable": sum(p.numel() for p in module.parameters() if p.requires_grad),
        "total": sum(p.numel() for p in module.parameters()),
    }
