"""Config checks that run before any model is built, so a bad command line fails in a second."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

from hydra.utils import get_class
from omegaconf import DictConfig, OmegaConf

from smop.data.sources import DEFAULT_SPLITS, SOURCES, check_official, file_aliases, split_file
from smop.data.splits import check_k_shot, check_max_train_records, check_protocol
from smop.data.tasks import check_train_targets, choose_template
from smop.validation import check_ranges

CONFIG_DIR = Path(__file__).resolve().parent / "configs"
DTYPE_NAMES = ("float32", "bfloat16", "float16")  # model.dtype: the frozen weights' precision (null: the checkpoint's)


EVAL_MODES = ("generate", "score")  # eval.mode: greedy generation + exact match (the papers), or label-word scoring


def check_eval_mode(mode: str, target: str, dataset: str) -> None:
    """eval.mode is one of EVAL_MODES, and score only where there is a closed set of label words to score."""
    if mode not in EVAL_MODES:
        raise ValueError(f"eval.mode={mode} is not one of: {', '.join(EVAL_MODES)}")
    if mode == "score" and target != "labels":
        raise ValueError(
            f"eval.mode=score scores label words, but dataset {dataset} has target={target} (no closed set of label "
            "words to score): use eval.mode=generate"
        )


def options(group: str) -> list[str]:
    """The config names available in a group of the config tree."""
    return sorted(p.stem for p in (CONFIG_DIR / group).glob("*.yaml"))


def method_routes(cfg: DictConfig) -> bool:
    module = cfg.method.get("module")
    return module is not None and bool(getattr(get_class(module._target_), "routes", False))


def check_step_budget(cfg: DictConfig) -> None:
    """experiment=dept_glue / dept_superglue take trainer.max_steps from dataset.dept_steps, null for a task DePT
    released no run of (COPA): say so, rather than the range check's bare `trainer.max_steps=None`."""
    trainer = cfg.get("trainer")
    if trainer is not None and "max_steps" in trainer and trainer.max_steps is None:
        name = cfg.dataset.name if cfg.get("dataset") is not None else "?"
        raise ValueError(
            f"trainer.max_steps=null: dataset {name} has no released DePT step count (dataset.dept_steps=null); "
            "give trainer.max_steps=N"
        )


def check_config(cfg: DictConfig, router_name: str | None = None) -> None:
    """Raise ValueError / FileNotFoundError naming the bad value and the allowed ones."""
    check_step_budget(cfg)
    check_ranges(cfg)  # every numeric option in its range first: the checks below compare them
    from smop.fast_path import check_fast_path

    check_fast_path(cfg)  # model.dtype, attention, compile; dataset.pad_to_multiple_of: refused here, before anything
    method = cfg.method.name
    routers = ", ".join(options("router"))
    if method_routes(cfg):
        if cfg.get("router") is None:
            raise ValueError(f"method={method} routes instances and needs a router; choose one of: {routers}")
        topk, k = cfg.router.get("topk", 1), cfg.method.num_prompts
        fixed = cfg.router.get("num_prompts")
        if fixed is not None and fixed != k:
            raise ValueError(f"router={router_name} uses {fixed} prompt(s), but method.num_prompts={k}")
        if not 1 <= topk <= k:
            raise ValueError(f"router.topk={topk} must be between 1 and the number of prompts method.num_prompts={k}")
    elif cfg.get("router") is not None:
        routing = [m for m in options("method") if m in {"smop"} or m.endswith("_smop")]
        raise ValueError(
            f"router={router_name or cfg.router._target_} was given, but method={method} does not "
            f"route; routers apply to: {', '.join(routing)}"
        )
    data = cfg.dataset
    if data.source not in SOURCES:
        raise ValueError(f"dataset.source={data.source} is not one of: {', '.join(SOURCES)}")
    templates = data.get("templates")  # an unknown template_style leaves dataset.template null (oc.select)
    templates = dict(templates) if templates is not None else None
    choose_template(data.name, data.get("template"), templates, data.get("template_style"))
    check_train_targets(data.get("train_targets", "first"), data.name, data.get("target", "labels"))
    official_files = dict(data.official_files) if data.get("official_files") else None
    check_official(official_files, data.get("official_format"), data.name)
    if data.source == "dir":
        if not data.get("data_dir"):
            raise ValueError("dataset.source=dir needs dataset.data_dir=/path/to/folder (one file per split)")
        folder = Path(data.data_dir).expanduser()
        if not folder.is_dir():
            raise FileNotFoundError(f"dataset.data_dir={data.data_dir} does not exist or is not a folder")
        named = {**DEFAULT_SPLITS, **{k: v for k, v in dict(data.get("splits") or {}).items() if v}}
        # every protocol reads these (a test file when used); a one-file task (code) reads its one file
        roles = ["all"] if "all" in named else [r for r in ("train", "validation", "validation_alt") if r in named]
        for role in roles:
            try:
                aliases = file_aliases(data.get("split_files"), named[role])
                split_file(folder, named[role], aliases, official_files)
            except FileNotFoundError as err:
                skip = f" (or leave it out: dataset.splits.{role}=null)" if role == "validation_alt" else ""
                raise FileNotFoundError(f"dataset.data_dir={data.data_dir}: {err}{skip}") from err
    named_roles = {k for k, v in dict(data.get("splits") or {}).items() if v} | set(DEFAULT_SPLITS)
    synthetic = data.source == "synthetic"
    check_protocol(
        data.get("split_protocol", "smop"), None if synthetic else named_roles, data.name, data.get("official_ranges")
    )
    if data.get("decoding"):
        check_decoding(data.decoding)
    check_k_shot(data.get("k_shot"), data.name, data.get("target", "labels"), data.get("format", "flat"))
    check_max_train_records(data.get("max_train_records"))
    check_eval_mode(OmegaConf.select(cfg, "eval.mode", default="generate"), data.get("target", "labels"), data.name)
    prompt_length = cfg.method.get("prompt_length", 0)
    if data.max_length <= prompt_length + 1:
        raise ValueError(
            f"dataset.max_length={data.max_length} leaves no room for input after a "
            f"{prompt_length}-token prompt (method.prompt_length)"
        )
    init_from = cfg.method.get("init_from")
    if not cfg.train and not cfg.get("ckpt_path") and not init_from:
        raise ValueError(
            "train=false evaluates a checkpoint: give ckpt_path=/path/to/checkpoint.ckpt, or method.init_from=PATH "
            "(a checkpoint, an export, a peft prompt-tuning or a DePT folder) to evaluate that prompt in this config"
        )
    if init_from:
        from smop.methods.init_from import check_init_from  # it imports Refused from here

        check_init_from(cfg)
    if cfg.get("ckpt_path") and cfg.ckpt_path != "last":
        check_checkpoint(cfg.ckpt_path)


def check_decoding(decoding: Any) -> None:
    """dataset.decoding (a code task's sampling) as smop.backbones.decoding.Decoding takes it, named by its key."""
    from omegaconf import OmegaConf

    from smop.backbones.decoding import Decoding, DecodingError

    options = OmegaConf.to_container(decoding, resolve=True) if isinstance(decoding, DictConfig) else dict(decoding)
    unknown = sorted(set(options) - set(Decoding.__dataclass_fields__))
    if unknown:
        raise ValueError(f"dataset.decoding has {unknown}; its options: {', '.join(Decoding.__dataclass_fields__)}")
    try:
        Decoding(**options)
    except DecodingError as err:
        raise ValueError(f"dataset.{err}") from err


def check_method_on_kind(cfg: DictConfig, kind: str) -> None:
    """Refuse, before any model is built, FPT (`method=fpt` or `callbacks.fpt`, any method) on a backbone whose
    architecture it cannot reduce, or on a stack that the backbone (seq2seq or causal) lacks. Reads config.json only."""
    fpt = (cfg.get("callbacks") or {}).get("fpt")
    if not fpt:
        return
    from smop.backbones import load_config
    from smop.methods.fpt import ARCHITECTURES

    tiny = cfg.model.get("tiny")
    config = load_config(str(cfg.model.name_or_path), dict(tiny) if tiny is not None else None)
    what = f"method={cfg.method.name}" if cfg.method.name == "fpt" else "callbacks.fpt"
    where = f"model.name_or_path={cfg.model.name_or_path}"
    arch = ARCHITECTURES.get(config.model_type)
    if arch is None:
        raise Refused(
            f"{what} does not support model_type={config.model_type} ({kind} backbone, {where}): it drops layers "
            f"and narrows FFNs of these model types only: {', '.join(ARCHITECTURES)}"
        )
    stacks = fpt.get("stacks")
    if stacks is not None and set(stacks) - set(arch.stacks):
        raise Refused(
            f"callbacks.fpt.stacks={list(stacks)}: a {config.model_type} backbone ({kind}, {where}) has the stacks "
            f"{', '.join(arch.stacks)}; callbacks.fpt.stacks=null reduces its {next(iter(arch.stacks))}"
        )


def check_devices(trainer: DictConfig) -> None:
    """What the trainer config asks of this machine: run in the job itself, where it will train (a SLURM login
    node that submits GPU jobs has no GPU), before any model is built."""
    import torch

    problems = []
    accelerator, strategy = str(trainer.get("accelerator", "auto")), str(trainer.get("strategy", "auto"))
    if accelerator in ("gpu", "cuda") and not torch.cuda.is_available():
        problems.append(
            f"trainer.accelerator={accelerator}, but torch {torch.__version__} sees no CUDA device here: use "
            "trainer=default (whatever device there is), trainer=cpu, or trainer=ddp_sim for DDP on CPU processes"
        )
    if strategy.startswith("deepspeed") and importlib.util.find_spec("deepspeed") is None:
        problems.append(
            f"trainer.strategy={strategy} needs the deepspeed package: pip install deepspeed (on a machine with the "
            "CUDA toolkit; it builds its kernels on first use)"
        )
    if problems:
        raise ValueError("; ".join(problems))


class Refused(ValueError):
    """A command line that would reuse, lose or misreport a run's state, or names a checkpoint that cannot be used:
    refused before anything is built, with the ways on. train.py prints it as one line."""


class MissingCheckpoint(Refused, FileNotFoundError):
    """ckpt_path names no file."""


CHECKPOINT_HINT = "give a checkpoint from a run's checkpoints/ folder (best-*.ckpt, last.ckpt or interrupted.ckpt)"


def unreadable(path: Path, err: Exception) -> str:
    """Why torch could not load `path`, in the user's terms (torch's own text is about zip internals and pickle
    opcodes: `[Errno 22] Invalid argument`, `Unsupported operand 101`)."""
    with path.open("rb") as file:
        head = file.read(4)
    if not head:
        return "it is empty (0 bytes): its writing was cut off before it began"
    if head.startswith(b"PK"):
        if type(err).__name__ == "UnpicklingError":
            return "it holds objects that cannot be loaded safely (weights_only=True), so train.py did not write it"
        return "it is a truncated or damaged zip archive: its writing was cut off, or it was copied part way"
    return "it is not a zip archive written by torch.save"


def check_checkpoint(path: str | Path) -> dict[str, Any]:
    """A file that torch can load safely (weights_only) and that holds our keys: not truncated, not foreign.

    Returns the checkpoint (memory-mapped: its tensors are not read), whose config the caller compares."""
    import torch

    path = Path(path)
    if not path.is_file():
        raise MissingCheckpoint(f"ckpt_path={path} does not exist: {CHECKPOINT_HINT}, or ckpt_path=last to resume")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as err:  # a truncated zip, a pickle of arbitrary objects, not a checkpoint at all
        reason = unreadable(path, err)
        raise Refused(f"ckpt_path={path} is not a readable checkpoint: {reason}; {CHECKPOINT_HINT}") from err
    keys = checkpoint if isinstance(checkpoint, dict) else {}
    missing = [key for key in ("state_dict", "hyper_parameters") if key not in keys]
    if missing:
        raise Refused(
            f"ckpt_path={path} is not a checkpoint of this framework: it lacks {', '.join(missing)}; {CHECKPOINT_HINT}"
        )
    from smop.methods import current_targets

    checkpoint["hyper_parameters"] = current_targets(checkpoint["hyper_parameters"])
    return checkpoint
