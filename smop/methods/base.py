"""What every prompt method returns, and the shared ways to initialise a prompt table."""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType

import torch
from torch import Tensor, nn
from transformers import PreTrainedTokenizerBase

INITS = ("random", "uniform", "vocab", "text")


@dataclass
class PromptOutput:
    """Soft prompt per instance, plus what the system needs besides it."""

    prompt: Tensor  # [B, L, d], prepended to the encoder input embeddings
    aux_loss: Tensor | None = None  # added to the task loss (e.g. load balancing)
    routes: Tensor | None = None  # [B, k] indices of the prompts each instance used (routed methods only)
    input_embeds: Tensor | None = None  # [B, n, d] replaces the input embeddings when set (e.g. DePT's update)


NO_INPUTS: Mapping[str, Tensor] = MappingProxyType({})


class PromptModule(nn.Module, ABC):
    """A trainable module that maps the frozen input embeddings of a batch to soft prompts."""

    routes: bool = False  # whether the method routes instances (only then is a `router` config allowed)
    needs_backbone: bool = False  # the constructor takes `backbone=` (e.g. to encode the input with it)
    consistency_weight: float = 0.0  # > 0: the system adds a two-pass consistency loss in training
    # the batch fields, besides the input ids and mask, that the module reads (a separate encoder's own ids): the
    # DataModule collates them, the system hands them to `forward` as `inputs`
    batch_inputs: tuple[str, ...] = ()

    def param_groups(self) -> list[dict]:
        """Optimizer parameter groups; a group without "lr" uses the optimizer's (method.lr)."""
        return [{"params": [p for p in self.parameters() if p.requires_grad]}]

    def upgrade_state_dict(self, state: dict[str, Tensor], prefix: str = "") -> bool:
        """Bring weights saved in an earlier layout of this module to the current one, in place; True if it did."""
        return False

    def analytic_flops(self, rows: int, input_length: int) -> float | None:
        """Multiply-adds per example of this module's own forward, as fvcore counts them (matmuls only), on a batch
        of `rows` rows padded to `input_length` tokens: the benchmark adds it to the backbone's formula to check
        fvcore. None: no formula (the benchmark then shows "-" rather than a wrong figure)."""
        return None

    @property
    @abstractmethod
    def prompt_length(self) -> int:
        """Number of prompt vectors prepended to every input."""

    def static_prompt(self) -> Tensor | None:
        """The [L, d] prompt every input gets (float32, detached) when it does not depend on the input, else None.
        Export writes it as a peft prompt-tuning folder."""
        return None

    @abstractmethod
    def forward(
        self, input_embeds: Tensor, attention_mask: Tensor, inputs: Mapping[str, Tensor] = NO_INPUTS
    ) -> PromptOutput:
        """Prompts for a batch, from its (frozen) input embeddings [B, n, d] and mask [B, n]; `inputs` holds the
        batch fields named in `batch_inputs` (none for most methods)."""


def init_prompt(
    num_tokens: int,
    embedding: nn.Embedding,
    init: str = "random",
    tokenizer: PreTrainedTokenizerBase | None = None,
    init_text: str | None = None,
    vocab_range: int = 5000,
) -> Tensor:
    """A fresh [num_tokens, d] prompt table.

    random: N(0, 1) as SMoP did; uniform: U(+-sqrt(1/d)) as FPT did; vocab: embeddings of random
    vocabulary ids among the first `vocab_range` (Lester et al.); text: embeddings of `init_text` tokenized
    WITH the tokenizer's special tokens (T5: the EOS), repeated or truncated to `num_tokens`. That is what
    peft's PromptTuningInit.TEXT does (`tokenizer(text)["input_ids"]`), and DePT's fork of peft with it, so it
    is the behaviour to match for every method that initialises from text, not for DePT alone.
    """
    d = embedding.embedding_dim
    weight = embedding.weight.detach()
    if init == "random":
        return torch.randn(num_tokens, d)
    if init == "uniform":
        bound = math.sqrt(1.0 / d)
        return torch.empty(num_tokens, d).uniform_(-bound, bound)
    if init == "vocab":
        ids = torch.randint(0, min(vocab_range, weight.shape[0]), (num_tokens,))
        return weight[ids].float().clone()
    if init == "text":
        if tokenizer is None or not init_text:
            raise ValueError("init='text' needs a tokenizer and a non-empty `init_text`")
        ids = tokenizer(init_text).input_ids
        reps = -(-num_tokens // len(ids))
        return weight[torch.tensor((ids * reps)[:num_tokens])].float().clone()
    raise ValueError(f"Unknown prompt init '{init}'; allowed: {', '.join(INITS)}")
