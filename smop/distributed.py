"""DDP ranks under Hydra: each rank of a job re-runs train.py with that job's overrides, in that job's folder.

Lightning's `ddp` starts ranks 1..N-1 by re-running the script with `sys.argv`. Inside a Hydra multirun that is
the whole sweep (`-m seed=0,1,2`): every rank would start the sweep again. We give Lightning the command of this
job instead: the job's own overrides (`hydra.overrides.task`, sweep values filled in) as a single run in the
job's output folder. For a single run this is the command Lightning would build itself.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch
from hydra.core.hydra_config import HydraConfig
from hydra.utils import get_original_cwd, to_absolute_path


def job_rank_command(local_rank: int) -> tuple[Sequence[str], str]:
    """(command, working directory) that starts rank `local_rank` of the current Hydra job."""
    import __main__

    hydra = HydraConfig.get()
    if __main__.__spec__ is None:
        command = [sys.executable, to_absolute_path(sys.argv[0])]
    else:
        command = [sys.executable, "-m", __main__.__spec__.name]
    command += list(hydra.overrides.task)
    command += [
        f'hydra.run.dir="{hydra.runtime.output_dir}"',
        f"hydra.job.name=train_ddp_process_{local_rank}",
        "hydra.output_subdir=null",
        "hydra.mode=RUN",  # a job of a search (hparams_search sets MULTIRUN) must not start the search again
    ]
    return command, get_original_cwd()


def launch_ranks_per_job() -> None:
    """Make Lightning's script launcher start ranks with `job_rank_command` (a no-op outside Hydra)."""
    from lightning.pytorch.strategies.launchers import subprocess_script

    if HydraConfig.initialized() and hasattr(subprocess_script, "_hydra_subprocess_cmd"):
        subprocess_script._hydra_subprocess_cmd = job_rank_command


RANK_VARIABLES = ("MASTER_ADDR", "MASTER_PORT", "NODE_RANK", "LOCAL_RANK", "WORLD_SIZE", "RANK", "LOCAL_WORLD_SIZE")


@contextmanager
def isolated_job() -> Iterator[None]:
    """Leave no DDP state behind for the next job of a multirun in this process.

    Lightning's launcher writes the rank variables into `os.environ` and opens a process group; the next job
    would read LOCAL_RANK=0, believe its ranks were started outside, and wait for ranks that never come.
    """
    before = {name: os.environ.get(name) for name in RANK_VARIABLES}
    try:
        yield
    finally:
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
        for name, value in before.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
