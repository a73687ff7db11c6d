"""Prompt methods: one file each. A method's config names its class with `_target_`."""

from smop.prompts.base import PromptModule, PromptOutput
from smop.prompts.mixture import SparseMixtureOfPrompts
from smop.prompts.p_tuning import PTuning
from smop.prompts.prompt_tuning import PromptTuning

__all__ = ["PTuning", "PromptModule", "PromptOutput", "PromptTuning", "SparseMixtureOfPrompts"]
