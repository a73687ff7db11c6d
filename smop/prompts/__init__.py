"""Prompt methods: one file each. A method's config names its class with `_target_`."""

from smop.prompts.base import PromptModule, PromptOutput
from smop.prompts.dept import DecomposedPromptTuning, budget_split
from smop.prompts.instance import IDPG, LoPA
from smop.prompts.mixture import SparseMixtureOfPrompts
from smop.prompts.p_tuning import PTuning
from smop.prompts.prompt_tuning import PromptTuning

__all__ = [
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
