"""Config checks that run before any model is built, so a bad command line fails in a second."""

from __future__ import annotations

import importlib.util
from pathlib import Path

from hydra.utils import get_class
from omegaconf import DictConfig

from smop.data.sources import SOURCES, SPLIT_FILES

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"


def options(group: str) -> list[str]:
    """The config names available in a group of the config tree."""
    return sorted(p.stem for p in (CONFIG_DIR / group).glob("*.yaml"))


def method_routes(cfg: DictConfig) -> bool:
    module = cfg.method.get("module")
    return module is not None and bool(getattr(get_class(module._target_), "routes", False))


def check_config(cfg: DictConfig, router_name: str | None = None) -> None:
    """Raise ValueError / FileNotFoundError naming the bad value and the allowed ones."""
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
    if data.source == "dir":
        if not data.get("data_dir"):
            raise ValueError("dataset.source=dir needs dataset.data_dir=/path/to/folder (train.jsonl, val.jsonl)")
        folder = Path(data.data_dir).expanduser()
        if not folder.is_dir():
            raise FileNotFoundError(f"dataset.data_dir={data.data_dir} does not exist or is not a folder")
        missing = [name for name in SPLIT_FILES.values() if not (folder / name).is_file()]
        if missing:
            raise FileNotFoundError(
                f"dataset.data_dir={data.data_dir} lacks {', '.join(missing)} "
                "(the official SuperGLUE train.jsonl and val.jsonl)"
            )
    prompt_length = cfg.method.get("prompt_length", 0)
    if data.max_length <= prompt_length + 1:
        raise ValueError(
            f"dataset.max_length={data.max_length} leaves no room for input after a "
            f"{prompt_length}-token prompt (method.prompt_length)"
        )
    if not cfg.train and not cfg.get("ckpt_path"):
        raise ValueError("train=false evaluates a checkpoint: give ckpt_path=/path/to/checkpoint.ckpt")
    if cfg.get("ckpt_path") and cfg.ckpt_path != "last":
        check_checkpoint(cfg.ckpt_path)


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


def check_checkpoint(path: str) -> None:
    """A file that torch can load safely (weights_only) and that holds our keys: not truncated, not foreign."""
    import torch

    if not Path(path).is_file():
        raise FileNotFoundError(f"ckpt_path={path} does not exist (ckpt_path=last resumes from this run's folder)")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # a truncated zip, a pickle of arbitrary objects, not a checkpoint at all
        raise ValueError(f"ckpt_path={path} is not a readable checkpoint (corrupt or truncated?): {err}") from err
    missing = [key for key in ("state_dict", "hyper_parameters") if key not in checkpoint]
    if missing:
        raise ValueError(f"ckpt_path={path} is not a checkpoint of this framework: it lacks {', '.join(missing)}")
