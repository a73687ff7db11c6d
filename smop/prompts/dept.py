"""DePT (Shi & Lipani, ICLR 2024): a shorter prompt plus a low-rank update of the input embeddings.

The prompt P (m x d) is prepended as in prompt tuning; the input embeddings become
E[x] + (alpha / sqrt(r)) * A B, row i of A B added to position i, A (s x r), B (r x d), s the longest input.
Unlike the reference, which pads every input to exactly s, an input of n tokens receives the first n rows,
so dynamic padding keeps working. P and A/B train with two learning rates (two optimizer groups).
"""

from __future__ import annotations

import logging
import math

import torch
from torch import Tensor, nn
from transformers import PreTrainedTokenizerBase

from smop.prompts.base import PromptModule, PromptOutput, init_prompt

log = logging.getLogger(__name__)


def budget_split(
    budget_tokens: int, d_model: int, max_positions: int, prompt_length: int | None = None, rank: int | None = None
) -> tuple[int, int]:
    """(m, r) with m*d + r*(s+d) <= budget*d, the largest that fits: give one of m and r, get the other.

    Matches DePT to prompt tuning with `budget_tokens` tokens (PT-100 on T5-base, s=256: m=60 -> r=30).
    """
    if (prompt_length is None) == (rank is None):
        raise ValueError("budget_split needs exactly one of prompt_length (m) and rank (r)")
    budget = budget_tokens * d_model
    if rank is None:
        rank = (budget - prompt_length * d_model) // (max_positions + d_model)
    else:
        prompt_length = (budget - rank * (max_positions + d_model)) // d_model
    if rank < 1 or prompt_length < 1:
        raise ValueError(
            f"a budget of {budget_tokens} tokens (d={d_model}, s={max_positions}) leaves m={prompt_length}, "
            f"r={rank}: both must be >= 1; raise method.budget_tokens or lower method.prompt_length"
        )
    return prompt_length, rank


class DecomposedPromptTuning(PromptModule):
    def __init__(
        self,
        embedding: nn.Embedding,
        prompt_length: int = 60,
        rank: int | None = None,
        budget_tokens: int | None = 100,
        max_positions: int = 256,
        alpha: float = 8.0,
        lr_lowrank: float | None = 1e-4,
        weight_decay: float | None = 0.0,
        init: str = "text",
        init_text: str | None = None,
        tokenizer: PreTrainedTokenizerBase | None = None,
    ) -> None:
        super().__init__()
        d = embedding.embedding_dim
        if rank is None:
            if budget_tokens is None:
                raise ValueError("method=dept needs method.rank or method.budget_tokens to derive it from")
            _, rank = budget_split(budget_tokens, d, max_positions, prompt_length=prompt_length)
            log.info("DePT: m=%d, r=%d from a budget of %d tokens", prompt_length, rank, budget_tokens)
        self.prompt = nn.Parameter(init_prompt(prompt_length, embedding, init, tokenizer, init_text))
        self.lora_a = nn.Parameter(torch.empty(max_positions, rank))
        nn.init.kaiming_uniform_(self.lora_a, a=math.sqrt(5))  # U(+-1/sqrt(r)): fan_in is r
        self.lora_b = nn.Parameter(torch.zeros(rank, d))  # the update starts at exactly zero
        self.scaling = alpha / math.sqrt(rank)
        self.lr_lowrank, self.weight_decay = lr_lowrank, weight_decay

    @property
    def prompt_length(self) -> int:
        return self.prompt.shape[0]

    @property
    def rank(self) -> int:
        return self.lora_b.shape[0]

    @property
    def max_positions(self) -> int:
        return self.lora_a.shape[0]

    def update(self, length: int) -> Tensor:
        """The first `length` rows of (alpha / sqrt(r)) A B: what positions 0..length-1 receive."""
        if length > self.max_positions:
            raise ValueError(
                f"an input of {length} tokens is longer than DePT's {self.max_positions} positions "
                "(method.max_positions): raise it or lower dataset.max_length"
            )
        return self.scaling * (self.lora_a[:length] @ self.lora_b)

    def param_groups(self) -> list[dict]:
        """Two learning rates: the prompt uses method.lr, A and B method.lr_lowrank."""
        decay = {} if self.weight_decay is None else {"weight_decay": self.weight_decay}
        lowrank = {} if self.lr_lowrank is None else {"lr": self.lr_lowrank}
        return [{"params": [self.prompt], **decay}, {"params": [self.lora_a, self.lora_b], **lowrank, **decay}]

    def forward(self, input_embeds: Tensor, attention_mask: Tensor) -> PromptOutput:
        embeds = input_embeds + self.update(input_embeds.shape[1]).to(input_embeds.dtype)
        prompt = self.prompt.to(input_embeds.dtype).unsqueeze(0).expand(input_embeds.shape[0], -1, -1)
        return PromptOutput(prompt, input_embeds=embeds)
