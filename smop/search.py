"""What the Optuna sweeper needs to keep a search in sqlite and resume it (smop/configs/hparams_search/)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from optuna import Study
from optuna.distributions import BaseDistribution
from optuna.samplers import BaseSampler, TPESampler
from optuna.trial import FrozenTrial, TrialState


def sqlite_storage(path: str) -> str:
    """An sqlite URL for `path`, its folder created: the Optuna sweeper opens the study before Hydra creates
    the sweep folder, and sqlite cannot create a file in a folder that does not exist."""
    file = Path(path).expanduser().resolve()
    file.parent.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{file}"


class ResumableTPESampler(BaseSampler):
    """Optuna's TPE sampler, seeded with `seed` plus the number of the first trial it samples.

    A seeded sampler restarts its random generator in every process, so a resumed search with a plain seed
    draws the first launch's random startup trials again. Offsetting the seed by the trials the study
    already holds keeps a new search reproducible and makes a resumed one draw new points.
    """

    def __init__(self, seed: int | None = None, **options: Any) -> None:
        self._seed, self._options = seed, options
        self._tpe: TPESampler | None = None

    def _sampler(self, trial: FrozenTrial) -> TPESampler:
        if self._tpe is None:
            seed = None if self._seed is None else self._seed + trial.number
            self._tpe = TPESampler(seed=seed, **self._options)
        return self._tpe

    def infer_relative_search_space(self, study: Study, trial: FrozenTrial) -> dict[str, BaseDistribution]:
        return self._sampler(trial).infer_relative_search_space(study, trial)

    def sample_relative(
        self, study: Study, trial: FrozenTrial, search_space: dict[str, BaseDistribution]
    ) -> dict[str, Any]:
        return self._sampler(trial).sample_relative(study, trial, search_space)

    def sample_independent(
        self, study: Study, trial: FrozenTrial, param_name: str, param_distribution: BaseDistribution
    ) -> Any:
        return self._sampler(trial).sample_independent(study, trial, param_name, param_distribution)

    def after_trial(self, study: Study, trial: FrozenTrial, state: TrialState, values: Sequence[float] | None) -> None:
        self._sampler(trial).after_trial(study, trial, state, values)

    def reseed_rng(self) -> None:
        if self._tpe is not None:
            self._tpe.reseed_rng()
