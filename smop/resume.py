"""What a run starts from: nothing (a new folder), its own checkpoint (`ckpt_path=last`), or a given checkpoint.

A run never silently reuses, loses or misreports state. So, before anything is built:
- a new run into a folder that already holds a run is refused (resume it with ckpt_path=last, or use another folder);
- a completed run is not resumed: it is evaluated or continued from its checkpoint in a new folder;
- `ckpt_path=last` is resolved here to the newer of last.ckpt and interrupted.ckpt, and results.json records it;
- a checkpoint whose saved config contradicts the command line is refused, naming each difference;
- `train=false` evaluates with the checkpoint's own method, router, model and dataset where the command line
  does not name them.
"""

from __future__ import annotations

import json
import logging
import shlex
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hydra.core.hydra_config import HydraConfig
from lightning.pytorch.utilities import rank_zero_only
from omegaconf import DictConfig, OmegaConf, open_dict

from smop.checks import CONFIG_DIR, Refused, check_checkpoint
from smop.interrupts import INTERRUPTED, LAST
from smop.results import RESULTS_FILE

log = logging.getLogger(__name__)

# What a checkpoint was trained as: taken from it by train=false where the command line does not name them.
GROUPS = ("method", "router", "model", "dataset")
ADOPTED = (*GROUPS, "seed", "optimizer", "warmup_ratio", "warmup_steps")
# A resumed run may change how it runs and for how long, not what it trains: everything else must match.
FREE_ON_RESUME = ("paths", "trainer", "callbacks", "logger", "hydra", "ckpt_path", "train", "test", "hparams_search")
FREE_LEAVES = ("dataset.epochs", "dataset.eval_batch_size", "dataset.num_workers", "dataset.data_dir")
# How the step runs, not what it computes (smop.fast_path): a compiled run resumes or evaluates uncompiled, and back
HOW_IT_RUNS = ("model.compile", "model.compile_options", "dataset.pad_to_multiple_of", "dataset.sort_eval_by_length")
# What an evaluation needs to match: the model and the shapes of what was trained, not how it was trained.
TRAINING_ONLY = {"init", "init_text", "dropout", "lr", "lr_lowrank", "weight_decay", "encoder_lr", "shared_lr"}
ROUTING = ("router._target_", "router.topk", "router.num_prompts")


@dataclass
class Start:
    """Where fit (or the evaluation) starts: `checkpoint` is None for a fresh run."""

    checkpoint: Path | None = None
    epoch: int | None = None
    step: int | None = None
    adopted: list[str] = field(default_factory=list)

    def record(self) -> dict[str, Any] | None:
        """results.json's `resumed_from`: the file actually loaded, not the `ckpt_path` that was typed."""
        if self.checkpoint is None:
            return None
        return {"path": str(self.checkpoint), "epoch": self.epoch, "step": self.step}


# --- the run folder -----------------------------------------------------------------------------------------------
def read_results(folder: Path) -> dict[str, Any] | None:
    try:
        return json.loads((folder / RESULTS_FILE).read_text())
    except (OSError, ValueError):
        return None


def saved_checkpoints(cfg: DictConfig) -> list[Path]:
    """This run's checkpoints, and any that Lightning's SLURM requeue handler left in the folder (hpc_ckpt_*.ckpt,
    which Lightning would resume from by itself)."""
    folder, root = Path(cfg.paths.checkpoint_dir), Path(cfg.paths.output_dir)
    return sorted([*folder.glob("*.ckpt"), *root.glob("hpc_ckpt_*.ckpt")])


def resumes_this_folder(cfg: DictConfig) -> bool:
    """`ckpt_path=last`, or a checkpoint of this folder's own, to train on: the one way to write into a used folder."""
    path = cfg.get("ckpt_path")
    if not cfg.train or not path:
        return False
    folder = Path(cfg.paths.checkpoint_dir).resolve()
    return path == "last" or Path(path).resolve().parent == folder


def check_run_folder(cfg: DictConfig) -> dict[str, Any] | None:
    """Refuse a command that would write into a folder holding another run; returns the folder's results.json.

    A folder holds a run when it has checkpoints, or the results.json of a completed run (a run that failed
    before saving anything leaves nothing to lose). DDP ranks > 0 share rank 0's folder and skip this."""
    folder = Path(cfg.paths.output_dir)
    previous = read_results(folder)
    if rank_zero_only.rank != 0:
        return previous
    checkpoints = saved_checkpoints(cfg)
    completed = previous is not None and previous.get("status") == "completed"
    elsewhere = "start a new run in another folder (hydra.run.dir=<new folder>, or no hydra.run.dir: a new dated one)"
    if completed:  # resuming it would overwrite its results: evaluate it, or continue it in a new folder
        last = Path(cfg.paths.checkpoint_dir) / LAST
        best = [p for p in checkpoints if p.name.startswith("best-")]
        evaluate = best[0] if best else last if last.is_file() else (previous.get("config") or {}).get("ckpt_path")
        continued = (
            f"; continue it with more epochs: ckpt_path={last} trainer.max_epochs=<more>" if last.is_file() else ""
        )
        raise Refused(
            f"{folder} holds a completed run, which is never resumed or overwritten: evaluate it with train=false "
            f"ckpt_path={evaluate}{continued} ({'both ' if continued else ''}in a new folder); or {elsewhere}"
        )
    if checkpoints and not resumes_this_folder(cfg):
        held = ", ".join(str(path.relative_to(folder)) for path in checkpoints[:3])
        raise Refused(
            f"{folder} already holds a run ({held}); a new run never writes into it: resume that run with the same "
            f"command and ckpt_path=last, or {elsewhere}"
        )
    return previous


# --- ckpt_path=last -------------------------------------------------------------------------------------------------
def progress(checkpoint: dict[str, Any]) -> tuple[int, int]:
    return int(checkpoint.get("global_step", 0)), int(checkpoint.get("epoch", 0))


def newest_checkpoint(cfg: DictConfig) -> tuple[Path, dict[str, Any]] | None:
    """The newer of checkpoints/last.ckpt (end of an epoch) and interrupted.ckpt (a signal), by training step;
    on a tie interrupted.ckpt, written after the epoch's end. None when neither exists."""
    folder = Path(cfg.paths.checkpoint_dir)
    paths = [folder / name for name in (INTERRUPTED, LAST) if (folder / name).is_file()]
    found = [(path, check_checkpoint(path)) for path in paths]
    return max(found, key=lambda item: progress(item[1])) if found else None  # max keeps the first of equals


# --- the checkpoint's own config ------------------------------------------------------------------------------------
def leaves(config: Any, prefix: str = "") -> dict[str, Any]:
    """{dotted key: value} of a nested dict; lists are values."""
    if not isinstance(config, dict) or not config:
        return {prefix: config} if prefix else {}
    out: dict[str, Any] = {}
    for key, value in config.items():
        out.update(leaves(value, f"{prefix}.{key}" if prefix else str(key)))
    return out


def how_it_runs(key: str) -> bool:
    return any(key == name or key.startswith(f"{name}.") for name in HOW_IT_RUNS)


def resume_keys(key: str) -> bool:
    return key.split(".")[0] not in FREE_ON_RESUME and key not in FREE_LEAVES and not how_it_runs(key)


def evaluation_keys(key: str, tiny: bool) -> bool:
    if how_it_runs(key):
        return False
    if key.startswith("model.") or key in ("method.name", "method.prompt_length", "method.train_backbone"):
        return True
    if key.startswith(("method.module.", "method.lora.")):
        return key.split(".")[-1] not in TRAINING_ONLY
    return key in ROUTING or (tiny and key == "seed")  # the tiny T5's random weights come from the seed


def differences(saved: dict[str, Any], config: dict[str, Any], train: bool) -> list[str]:
    ours, theirs = leaves(config), leaves(saved)
    tiny = ours.get("model.name_or_path") == "tiny"
    wanted = resume_keys if train else (lambda k: evaluation_keys(k, tiny))
    # a key in only one of them: a config written by another version of this framework, nothing to compare
    return [
        f"{key}: checkpoint {theirs[key]!r}, this command {ours[key]!r}"
        for key in sorted(ours.keys() & theirs.keys())
        if wanted(key) and ours[key] != theirs[key]
    ]


def override_key(override: str) -> str:
    return override.lstrip("+~").split("=", 1)[0].split("@", 1)[0]


def touched(overrides: list[str], name: str) -> bool:
    """Whether the command line names a config group or one of its keys (`method=...`, `method.lr=...`)."""
    keys = [override_key(o) for o in overrides]
    return any(key in ("experiment", name) or key.startswith(f"{name}.") for key in keys)


def selected(overrides: list[str], name: str) -> bool:
    """Whether the command line chooses a config group itself (`method=smop`, an experiment) or sets `seed=...`."""
    return any(override_key(o) in ("experiment", name) for o in overrides)


def task_overrides() -> list[str] | None:
    """The command line's overrides, or None outside Hydra (then nothing is taken from a checkpoint)."""
    return list(HydraConfig.get().overrides.task) if HydraConfig.initialized() else None


def adopt(cfg: DictConfig, saved: dict[str, Any], overrides: list[str]) -> list[str]:
    """train=false: the checkpoint's own method, router, model, dataset, seed and optimizer wherever the command
    line does not choose them; a key the command line sets (dataset.eval_batch_size=7) is applied on top."""
    composed = OmegaConf.create(OmegaConf.to_container(cfg, resolve=True))
    saved = {"router": None, **saved}  # a method that does not route has no router key at all
    adopted = [name for name in ADOPTED if name in saved and not selected(overrides, name)]
    with open_dict(cfg):
        for name in adopted:
            cfg[name] = saved[name]
        for override in overrides:
            key = override_key(override)
            if not override.startswith("~") and "." in key and key.split(".")[0] in adopted:
                OmegaConf.update(cfg, key, OmegaConf.select(composed, key), force_add=True)
    return [name for name in adopted if name in (*GROUPS, "seed")]


def describe(cfg: DictConfig, names: list[str]) -> str:
    def value(name: str) -> Any:
        item = cfg.get(name)
        if name == "router" and item is not None:
            return router_name(OmegaConf.to_container(item))
        return item.get("name", item.get("name_or_path")) if isinstance(item, DictConfig) else item

    return ", ".join(f"{name}={value(name)}" for name in names)


def router_name(router: dict[str, Any] | None) -> str | None:
    """The router config file a saved router config came from (its class name if none matches)."""
    if router is None:
        return None
    for path in sorted((CONFIG_DIR / "router").glob("*.yaml")):
        if OmegaConf.to_container(OmegaConf.load(path)) == router:
            return path.stem
    return str(router.get("_target_", "?")).rsplit(".", 1)[-1]


# --- all together -----------------------------------------------------------------------------------------------------
def starting_point(cfg: DictConfig, overrides: list[str] | None) -> Start:
    """Resolve ckpt_path (setting cfg.ckpt_path to the file), take the checkpoint's config where train=false
    leaves it open (changing cfg), and refuse a checkpoint that contradicts the command line."""
    ckpt_path = cfg.get("ckpt_path")
    if not ckpt_path:
        return Start()
    if ckpt_path == "last":
        newest = newest_checkpoint(cfg)
        if newest is None:
            if not cfg.train:
                raise Refused(
                    f"ckpt_path=last with train=false: {cfg.paths.checkpoint_dir} holds no checkpoint (a new run's "
                    "folder is empty); give the checkpoint to evaluate, ckpt_path=/path/to/run/checkpoints/best-*.ckpt"
                )
            log.info(
                "ckpt_path=last: %s holds no checkpoint yet, so this run starts from scratch", cfg.paths.output_dir
            )
            with open_dict(cfg):
                cfg.ckpt_path = None
            return Start()
        path, checkpoint = newest
    else:
        path, checkpoint = Path(ckpt_path), check_checkpoint(ckpt_path)
    saved = dict(checkpoint["hyper_parameters"])
    start = Start(path.resolve(), int(checkpoint.get("epoch", 0)), int(checkpoint.get("global_step", 0)))
    if not cfg.train and overrides is not None:
        start.adopted = adopt(cfg, saved, overrides)
        if start.adopted:
            log.info("train=false: evaluating %s with its own %s", path, describe(cfg, start.adopted))
    problems = differences(saved, OmegaConf.to_container(cfg, resolve=True), bool(cfg.train))
    if problems:
        raise Refused(mismatch(path, problems, bool(cfg.train), overrides))
    with open_dict(cfg):
        cfg.ckpt_path = str(start.checkpoint)
    return start


def mismatch(path: Path, problems: list[str], train: bool, overrides: list[str] | None) -> str:
    shown = "; ".join(problems[:6]) + (f"; and {len(problems) - 6} more" if len(problems) > 6 else "")
    if train:
        way = (
            "resume with the settings the run was started with (drop the overrides that differ), or start a new run "
            "in another folder without ckpt_path"
        )
    else:
        named = [o for o in overrides or [] if any(touched([o], g) for g in (*GROUPS, "seed"))]
        way = (
            f"leave {' '.join(shlex.quote(o) for o in named)} off the command line to evaluate with the checkpoint's "
            "own config, or give a checkpoint of this configuration"
            if named
            else "give a checkpoint of this configuration"
        )
    return f"ckpt_path={path} does not match this command ({shown}): {way}"


def resume_command(cfg: DictConfig, overrides: list[str] | None) -> str:
    """The command that resumes this run: its own overrides, its folder, ckpt_path=last."""
    kept = [o for o in overrides or [] if o.lstrip("+~").split("=", 1)[0] != "ckpt_path"]
    words = ["python", "train.py", *kept, f"hydra.run.dir={Path(cfg.paths.output_dir).resolve()}", "ckpt_path=last"]
    return " ".join(shlex.quote(word) for word in words)


def earlier_attempts(previous: dict[str, Any] | None) -> list[dict[str, Any]]:
    """The figures of the attempts before a resume (time, memory, routing, why each stopped): kept, never lost."""
    if previous is None:
        return []
    keys = ("status", "error", "stopped", "resumed_from", "metrics", "cost", "routing")
    return [*previous.get("attempts", []), {key: previous.get(key) for key in keys}]
