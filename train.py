"""Train and evaluate one configuration: `python train.py method=smop dataset=rte model=t5-base`.

With no overrides it runs the embedded default offline (SMoP 4x5 on the bundled RTE sample, tiny T5).
"""

import hydra
from omegaconf import DictConfig

from smop.run import run


@hydra.main(version_base="1.3", config_path="configs", config_name="train.yaml")
def main(cfg: DictConfig) -> float | None:
    """Returns the validation score, the value a Hydra sweeper optimises."""
    results = run(cfg)
    return (results["metrics"]["val"] or {}).get("score")


if __name__ == "__main__":
    main()
