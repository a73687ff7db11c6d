"""wandb as a first-class logger: one wandb run per job, grouped per sweep, with routing histograms and cost tables.

`logger=wandb` builds Lightning's WandbLogger through `wandb_logger` (checks that fail before training starts);
`smop.run` adds `WandbReport` to the callbacks when a WandbLogger is configured and calls `finish_wandb` at the end
of every job, which logs the final figures and closes the run, so the jobs of a multirun never merge.
Nothing here imports wandb at import time: with the default logger (csv) wandb is never loaded.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import lightning as L
from hydra.core.hydra_config import HydraConfig
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import Logger, WandbLogger
from lightning.pytorch.utilities import rank_zero_only

from smop.results import METRIC_SPLITS

log = logging.getLogger(__name__)

INSTALL = 'pip install -e ".[wandb]"'
MODES = ("online", "offline", "disabled")
LOCAL_MODES = ("offline", "dryrun", "disabled")  # modes that need no account (dryrun: wandb's old name for offline)
MAX_TAG_LENGTH = 64  # wandb refuses longer tags


def job_folders() -> Path:
    """The job's output folder (Hydra's runtime.output_dir)."""
    return Path(HydraConfig.get().runtime.output_dir) if HydraConfig.initialized() else Path.cwd()


def default_group_and_name(output_dir: Path) -> tuple[str, str]:
    """Group = the folder that holds the job's folder, name = the job's folder. In a multirun that is the sweep
    folder (one group per sweep; sweep.py: the grid's folder) and the job's subfolder; in a single run
    (`outputs/runs/<method>_<dataset>/<time>`) it is `<method>_<dataset>` and the start time."""
    return output_dir.parent.name or "smop", output_dir.name or "run"


def clean_tags(tags: Iterable[Any] | None) -> list[str]:
    """Strings, no nulls (a method without a router), no repeats, within wandb's length limit."""
    seen: dict[str, None] = {}
    for tag in tags or ():
        if tag is not None and str(tag):
            seen.setdefault(str(tag)[:MAX_TAG_LENGTH], None)
    return list(seen)


def import_wandb() -> Any:
    try:
        import wandb
    except ImportError as err:
        raise ModuleNotFoundError(f"logger=wandb needs the wandb package: {INSTALL} (or pip install wandb)") from err
    return wandb


def check_mode(mode: str | None) -> str:
    """The mode wandb will run in, refused early when it is unknown or when it needs an account that is missing."""
    if mode is not None and mode not in MODES:
        raise ValueError(f"logger.wandb.mode={mode!r} is not a wandb mode; allowed: {', '.join(MODES)}, or null")
    effective = mode or os.environ.get("WANDB_MODE") or "online"
    if effective in LOCAL_MODES:
        return effective
    if sys.stdin.isatty() and sys.stderr.isatty():
        return effective  # wandb.init asks for a key (or offers offline) when training starts
    if not import_wandb().login(verify=False, prompt=False):  # env, settings file or .netrc; no network
        raise RuntimeError(
            "logger=wandb runs online, but no W&B API key is configured and there is no terminal to ask for one. "
            "Log in (`wandb login`, or set WANDB_API_KEY), or run without an account: WANDB_MODE=offline "
            "(or logger.wandb.mode=offline; upload later with `wandb sync <output_dir>/wandb/offline-run-*`), "
            "or WANDB_MODE=disabled."
        )
    return effective


def wandb_logger(
    *,
    save_dir: str,
    project: str = "smop",
    entity: str | None = None,
    group: str | None = None,
    name: str | None = None,
    tags: Sequence[Any] | None = None,
    mode: str | None = None,
    log_model: bool | str = False,
    **kwargs: Any,
) -> WandbLogger:
    """Lightning's WandbLogger, built after the checks that would otherwise fail only once training starts
    (package missing, unknown mode, no API key without a terminal). `group`/`name` default to one group per
    sweep and one name per job (`default_group_and_name`)."""
    import_wandb()
    check_mode(mode)
    default_group, default_name = default_group_and_name(job_folders())
    Path(save_dir).mkdir(parents=True, exist_ok=True)  # wandb falls back to a temporary folder when it is missing
    return WandbLogger(
        save_dir=save_dir,
        project=project,
        entity=entity,
        group=group or default_group,
        name=name or default_name,
        tags=clean_tags(tags),
        mode=mode,  # passed to wandb.init; Lightning's own `offline` flag would set WANDB_MODE for the whole process
        log_model=log_model,
        **kwargs,
    )


def wandb_loggers(loggers: Iterable[Logger]) -> list[WandbLogger]:
    return [logger for logger in loggers if isinstance(logger, WandbLogger)]


def routing_histogram(counts: Sequence[int]) -> Any:
    """One bin per prompt, centred on its index: the bin heights are the instances routed to each prompt."""
    import wandb

    edges = [k - 0.5 for k in range(len(counts) + 1)]
    return wandb.Histogram(np_histogram=(list(counts), edges))


class WandbReport(Callback):
    """Logs, at every train/val/test epoch end, how many instances each prompt received, as a wandb histogram.

    The module computes `routing_counts[split]` in its own `on_*_epoch_end`, which Lightning calls *after* the
    callbacks' hook of the same name. So the counts are read one hook later: `on_validation_end` and
    `on_test_end` for evaluation; for training, at the start of the next epoch or at the end of training.
    """

    def __init__(self) -> None:
        self.train_epoch_ended = False

    def log_counts(self, trainer: L.Trainer, pl_module: L.LightningModule, split: str) -> None:
        counts = getattr(pl_module, "routing_counts", {}).get(split)
        if not counts or not trainer.is_global_zero:
            return
        for logger in wandb_loggers(trainer.loggers):
            # No step: wandb puts it at the last `trainer/global_step` (step_sync), the step of the epoch's metrics.
            logger.log_metrics({f"routing/{split}/histogram": routing_histogram(counts)})

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.train_epoch_ended = True  # the module's counts for this epoch come right after this hook

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.log_train_counts(trainer, pl_module)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.log_train_counts(trainer, pl_module)

    def log_train_counts(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.train_epoch_ended:
            self.train_epoch_ended = False
            self.log_counts(trainer, pl_module, "train")

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.sanity_checking:
            self.log_counts(trainer, pl_module, "val")

    def on_test_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.log_counts(trainer, pl_module, "test")


def wandb_callbacks(loggers: Iterable[Logger]) -> list[Callback]:
    """The callbacks wandb logging adds to a run: none unless a WandbLogger is among the loggers."""
    return [WandbReport()] if wandb_loggers(loggers) else []


def flat_cost(cost: dict[str, Any]) -> dict[str, Any]:
    """results.json's cost with its nested sections (`hardware`) as `hardware_<key>` columns: one scalar a cell."""
    out: dict[str, Any] = {}
    for key, value in cost.items():
        if isinstance(value, dict):
            out.update({f"{key}_{inner}": v for inner, v in value.items()})
        else:
            out[key] = value
    return out


def final_tables(results: dict[str, Any]) -> dict[str, Any]:
    """The run's cost (one row), metrics and routing counts (one row per value) as wandb Tables. Each row starts
    with what ran, so the workspace can stack the tables of a sweep's runs into one."""
    import wandb

    ids = {key: results.get(key) for key in ("method", "router", "dataset", "model", "seed")}
    params = results.get("params") or {}
    cost = {
        "status": results.get("status"),
        **{f"params_{k}": v for k, v in params.items()},
        **flat_cost(results["cost"]),
    }
    metrics = results.get("metrics") or {}
    rows = [[split, name, value] for split in METRIC_SPLITS for name, value in (metrics.get(split) or {}).items()]
    routing = [
        [split, prompt, count]
        for split, counts in (results.get("routing") or {}).get("counts", {}).items()
        for prompt, count in enumerate(counts)
    ]

    def table(columns: list[str], data: list[list[Any]]) -> Any:
        rows = [[*ids.values(), *row] for row in data]
        return wandb.Table(columns=[*ids, *columns], data=rows, allow_mixed_types=True)

    tables = {"final/cost": table(list(cost), [list(cost.values())])}
    if rows:
        tables["final/metrics"] = table(["split", "metric", "value"], rows)
    if routing:
        tables["final/routing"] = table(["split", "prompt", "count"], routing)
    return tables


def final_summary(results: dict[str, Any]) -> dict[str, Any]:
    """Scalar run-summary values: what the runs table of the workspace shows and sorts by."""
    metrics = results.get("metrics") or {}
    summary: dict[str, Any] = {
        "status": results.get("status"),
        "best_epoch": metrics.get("best_epoch"),
        "best_step": metrics.get("best_step"),
    }
    if results.get("error"):
        summary["error"] = results["error"]
    summary.update({f"params/{k}": v for k, v in (results.get("params") or {}).items()})
    summary.update({f"cost/{k}": v for k, v in flat_cost(results["cost"]).items()})
    for split in METRIC_SPLITS:
        summary.update({f"final/{split}/{k}": v for k, v in (metrics.get(split) or {}).items()})
    return {key: value for key, value in summary.items() if value is not None}


def finish_wandb(callbacks: Iterable[Callback], results: dict[str, Any]) -> None:
    """At the end of a job: log the final cost, metrics and routing counts to its wandb run, then close the run
    (exit code 1 for a failed run) so that the next job of a multirun starts its own. A no-op unless this run has
    a WandbLogger (the `WandbReport` callback) whose wandb run started; never raises, so a failed run's own
    error stays the one reported. Only rank 0 has a wandb run."""
    wandb = sys.modules.get("wandb")
    if (
        rank_zero_only.rank != 0
        or wandb is None
        or getattr(wandb, "run", None) is None
        or not any(isinstance(callback, WandbReport) for callback in callbacks)
    ):
        return
    try:
        wandb.run.summary.update(final_summary(results))
        wandb.run.log(final_tables(results))
    except Exception as err:  # the results are in results.json anyway
        log.warning("wandb: could not log the final results: %s: %s", type(err).__name__, err)
    finally:
        try:
            wandb.finish(exit_code=1 if results.get("status") == "failed" else 0)
        except Exception as err:
            log.warning("wandb: could not finish the run: %s: %s", type(err).__name__, err)
