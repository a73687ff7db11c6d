"""Train and evaluate one configuration: `python train.py method=smop dataset=rte model=t5-base`.

With no overrides it runs the embedded default offline (SMoP 4x5 on the bundled RTE sample, tiny T5).
"""

import sys

import hydra
from omegaconf import DictConfig

from smop.plugins import MissingPluginError, require_plugins


@hydra.main(version_base="1.3", config_path="configs", config_name="train.yaml")
def main(cfg: DictConfig) -> float | None:
    """Returns the validation score, the value a Hydra sweeper optimises."""
    from smop.run import run  # torch & co. load in the jobs: a launcher's own process only composes and submits

    results = run(cfg)
    return (results["metrics"]["val"] or {}).get("score")


if __name__ == "__main__":
    try:  # a launcher or sweeper whose plugin is missing: say which package to install, before Hydra starts
        require_plugins(sys.argv[1:])
    except MissingPluginError as err:
        sys.exit(f"train.py: {err}")
    main()
