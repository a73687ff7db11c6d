"""The methods, mirroring smop/configs/method and smop/configs/router: a method's config names its class (`_target_`).

prompt_tuning, p_tuning, smop (its routers: routers.py), dept, idpg and lopa (instance.py: input-dependent prompts),
lora (LoRA + X: adapters inside the frozen backbone), fpt (progressive training: the `fpt` callback). `full`
fine-tuning has no module of its own: the system trains the backbone."""

from typing import Any

from smop.methods.base import PromptModule, PromptOutput
from smop.methods.dept import DecomposedPromptTuning, budget_split
from smop.methods.instance import IDPG, LoPA
from smop.methods.p_tuning import PTuning
from smop.methods.prompt_tuning import PromptTuning
from smop.methods.smop import SparseMixtureOfPrompts

# Where earlier versions kept these classes: the configs saved in their checkpoints and exports still name them.
MOVED = {
    "smop.prompts.": "smop.methods.",
    "smop.routers.": "smop.methods.routers.",
    "smop.fpt.": "smop.methods.fpt.",
    "smop.data.SuperGLUEDataModule": "smop.data.TaskDataModule",
}


def current_targets(config: Any) -> Any:
    """A saved config (dicts and lists) with each `_target_` of an earlier version renamed to where it is now."""
    if isinstance(config, dict):
        return {key: _moved(value) if key == "_target_" else current_targets(value) for key, value in config.items()}
    if isinstance(config, list):
        return [current_targets(value) for value in config]
    return config


def _moved(target: Any) -> Any:
    for old, new in MOVED.items():
        if isinstance(target, str) and target.startswith(old):
            return new + target[len(old) :]
    return target


__all__ = [
    "MOVED",
    "current_targets",
    "IDPG",
    "DecomposedPromptTuning",
    "LoPA",
    "PTuning",
    "PromptModule",
    "PromptOutput",
    "PromptTuning",
    "SparseMixtureOfPrompts",
    "budget_split",
]
