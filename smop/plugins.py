"""The Hydra plugins that launchers and sweepers need: a clear message when one is not installed.

`smop/configs/hydra/launcher/{joblib,submitit_local,submitit_slurm}.yaml` exist in the project, so without the
plugin Hydra composes them and fails later on an import deep in its launch; `hydra/sweeper=optuna` and
`hparams_search=...` fail with "Could not find 'hydra/sweeper/optuna'". Both are checked here first, from
the command line, and the message names the override, the package and the extra to install.
"""

from __future__ import annotations

import importlib.util
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import OmegaConf

CONFIG_DIR = Path(__file__).resolve().parent / "configs"
EXTRA = 'pip install -e ".[cluster]"'
# smop/configs/hydra/launcher/{joblib,submitit_local,submitit_slurm}.yaml take the plugins' names on purpose, so
# that `hydra/launcher=joblib` gets the project's values. Hydra 1.3 then merges each with the plugin's
# dataclass of the same name, which type-checks the values (hydra.launcher.n_jobs=abc is an error), and warns
# that this matching is deprecated: the files give every field, so they do not depend on it. (Processes that
# compose a job's config again, joblib's workers and submitit's jobs, do not import this module: they print
# the warning once.)
warnings.filterwarnings(
    "ignore",
    message=r"\s*'hydra/launcher/(joblib|submitit_local|submitit_slurm)' is validated against ConfigStore schema",
    category=UserWarning,
)
# Config groups whose files may choose a launcher or a sweeper in their defaults list.
CHOOSING_GROUPS = ("hparams_search", "experiment")


@dataclass(frozen=True)
class Plugin:
    module: str  # what Hydra imports from the hydra_plugins namespace package
    package: str  # what pip installs
    group: str  # the Hydra config group its configs are in
    choices: tuple[str, ...]  # the configs it provides: `<group>=<choice>`
    in_extra: bool = True  # in the project's `cluster` extra

    @property
    def install(self) -> str:
        return f"{EXTRA} (or pip install {self.package})" if self.in_extra else f"pip install {self.package}"


PLUGINS = (
    Plugin("hydra_plugins.hydra_joblib_launcher", "hydra-joblib-launcher", "hydra/launcher", ("joblib",)),
    Plugin(
        "hydra_plugins.hydra_submitit_launcher",
        "hydra-submitit-launcher",
        "hydra/launcher",
        ("submitit_local", "submitit_slurm"),
    ),
    Plugin("hydra_plugins.hydra_optuna_sweeper", "hydra-optuna-sweeper", "hydra/sweeper", ("optuna",)),
    # Not in the extra, named so that choosing them gives the same kind of message.
    Plugin("hydra_plugins.hydra_ray_launcher", "hydra-ray-launcher", "hydra/launcher", ("ray", "ray_aws"), False),
    Plugin("hydra_plugins.hydra_rq_launcher", "hydra-rq-launcher", "hydra/launcher", ("rq",), False),
    Plugin("hydra_plugins.hydra_ax_sweeper", "hydra-ax-sweeper", "hydra/sweeper", ("ax",), False),
    Plugin("hydra_plugins.hydra_nevergrad_sweeper", "hydra-nevergrad-sweeper", "hydra/sweeper", ("nevergrad",), False),
)


class MissingPluginError(ImportError):
    """A launcher or sweeper was chosen whose Hydra plugin is not installed."""


def installed(plugin: Plugin) -> bool:
    return importlib.util.find_spec(plugin.module) is not None


def plugin_for(group: str, choice: str) -> Plugin | None:
    return next((p for p in PLUGINS if p.group == group and choice in p.choices), None)


def _choices(parser: OverridesParser, override: str) -> tuple[str, list[str]] | None:
    """`hydra/launcher=joblib` -> ("hydra/launcher", ["joblib"]), `hparams_search=a,b` -> both; None for the
    overrides that cannot choose a launcher or sweeper, and for Hydra's flags (-m, --cfg job)."""
    if override.startswith("-") or "=" not in override:
        return None
    try:
        (parsed,) = parser.parse_overrides([override])
        group = parsed.key_or_group
        if parsed.is_delete() or group not in ("hydra/launcher", "hydra/sweeper", *CHOOSING_GROUPS):
            return None
        if parsed.is_sweep_override():
            return group, list(parsed.sweep_string_iterator())
        return group, [parsed.get_value_element_as_str()]
    except Exception:  # a malformed override: Hydra reports it itself, with its own message
        return None


def _chosen_in_file(group: str, choice: str) -> list[tuple[str, str]]:
    """The launcher/sweeper a config file chooses: `- override /hydra/sweeper: optuna` -> (hydra/sweeper, optuna)."""
    path = CONFIG_DIR / group / f"{choice}.yaml"
    if not path.is_file():
        return []  # Hydra names the missing config and lists the available ones
    chosen = []
    for entry in OmegaConf.load(path).get("defaults") or []:
        if not isinstance(entry, dict) and not OmegaConf.is_dict(entry):
            continue
        for key, value in entry.items():
            name = str(key).removeprefix("override").strip().lstrip("/")
            if name in ("hydra/launcher", "hydra/sweeper") and value is not None:
                chosen.append((name, str(value)))
    return chosen


def missing_plugins(overrides: Iterable[str]) -> list[tuple[str, Plugin]]:
    """(override, plugin) for every chosen launcher or sweeper whose plugin is not installed."""
    missing, parser = [], OverridesParser.create()
    for override in overrides:
        parsed = _choices(parser, override)
        if parsed is None:
            continue
        group, values = parsed
        for value in values:
            wanted = _chosen_in_file(group, value) if group in CHOOSING_GROUPS else [(group, value)]
            for plugin in filter(None, (plugin_for(*w) for w in wanted)):
                if not installed(plugin) and (override, plugin) not in missing:
                    missing.append((override, plugin))
    return missing


def require_plugins(overrides: Sequence[str]) -> None:
    """Raise MissingPluginError naming each override whose Hydra plugin is missing and how to install it."""
    missing = missing_plugins(overrides)
    if missing:
        lines = [
            f"{override} needs the Hydra plugin {plugin.package} ({plugin.module}), which is not installed. "
            f"Install it: {plugin.install}"
            for override, plugin in missing
        ]
        raise MissingPluginError("\n".join(lines))


def guess_packages(choice: str) -> list[str]:
    """Packages whose plugin a config name hints at (`submitit_foo` -> hydra-submitit-launcher), for a
    launcher or sweeper config that is not found: a plugin may provide names this table does not list."""
    return sorted({p.package for p in PLUGINS if any(choice.startswith(c.split("_")[0]) for c in p.choices)})
