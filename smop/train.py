"""Train and evaluate one configuration: `python train.py method=smop dataset=rte model=t5-base` in a checkout,
`python -m smop.train ...` or `smop-train ...` wherever the package is installed (the config tree is smop/configs).

With no overrides it runs the embedded default offline (SMoP 4x5 on the bundled RTE sample, tiny T5).

Exit status: 0 completed; 1 failed; 130 / 143 stopped by SIGINT / SIGTERM (resumable with ckpt_path=last).
"""

import os
import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.errors import CompactHydraException
from hydra.types import RunMode
from omegaconf import DictConfig

from smop.plugins import MissingPluginError, require_plugins

CONFIG_DIR = Path(__file__).resolve().parent / "configs"  # the config tree, installed with the package


class OneLineError(CompactHydraException):
    """Hydra prints a CompactHydraException as its message alone, without the traceback."""


def full_error() -> bool:
    return os.environ.get("HYDRA_FULL_ERROR") == "1"


@hydra.main(version_base="1.3", config_path=str(CONFIG_DIR), config_name="train.yaml")
def main(cfg: DictConfig) -> float | None:
    """Returns the validation score, the value a Hydra sweeper optimises."""
    from smop.run import BRIEF_ERRORS, run  # torch & co. load in the jobs: a launcher's own process only submits

    try:
        results = run(cfg)
    except BRIEF_ERRORS as err:
        # a hub that cannot be reached, a command refused before anything was built: the message says what to
        # do, in one line; the chained traceback only with HYDRA_FULL_ERROR=1
        if full_error():
            raise
        if HydraConfig.get().mode == RunMode.RUN:
            print(f"train.py: {err}", file=sys.stderr)
            sys.exit(1)
        raise OneLineError(str(err)) from err  # a multirun's other jobs go on; Hydra prints this one line at the end
    return (results["metrics"]["val"] or {}).get("score")


def cli() -> None:
    """The command line: a launcher or sweeper whose plugin is missing says which package to install, before Hydra
    starts."""
    try:
        require_plugins(sys.argv[1:])
    except MissingPluginError as err:
        sys.exit(f"train.py: {err}")
    main()


if __name__ == "__main__":
    cli()
