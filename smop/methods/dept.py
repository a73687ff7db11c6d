"""DePT (Shi & Lipani, ICLR 2024): a shorter prompt plus a low-rank update of the input embeddings.

The prompt P (m x d) is prepended as in prompt tuning; the input embeddings become
E[x] + (alpha / sqrt(r)) * A B, row i of A B added to position i, A (s x r), B (r x d), s the longest input
the data can produce (max_length - m, the reference's max_seq_length). Unlike the reference, which pads every
input to exactly s, an input of n tokens receives the first n rows, so dynamic padding keeps working. P and A/B
train with two learning rates (two optimizer groups), with the reference AdamW's eps of 1e-6.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping

import torch
from torch import Tensor, nn
from transformers import PreTrainedTokenizerBase

from smop.methods.base import NO_INPUTS, PromptModule, PromptOutput, init_prompt

log = logging.getLogger(__name__)


def input_positions(max_positions: int | None, max_length: int | None, prompt_length: int) -> int:
    """s, the rows of A: the longest input the data can produce (max_length - m) when not given.

    A given s may be smaller (an input longer than s then fails in `update`) but never larger: the rows past the
    longest input would never receive a gradient, yet count in the budget that derives r."""
    longest = None if max_length is None else max_length - prompt_length
    if max_positions is None:
        if longest is None:
            raise ValueError("DePT needs method.max_positions (s) or dataset.max_length to derive it from")
        max_positions = longest
    elif longest is not None and max_positions > longest:
        raise ValueError(
            f"method.max_positions={max_positions} is more than the longest input the data can produce "
            f"(dataset.max_length {max_length} - method.prompt_length {prompt_length} = {longest}): its last "
            f"{max_positions - longest} rows would never train; use null (derived) or at most {longest}"
        )
    if max_positions < 1:
        raise ValueError(f"method.max_positions={max_positions} must be >= 1 (s: the rows of A)")
    return max_positions


def takes_scalar_eps(optimizer: str | None) -> bool:
    """Whether an optimizer (its `_target_`) has Adam's scalar eps; Adafactor's eps is a pair of its own."""
    return optimizer is None or optimizer.rsplit(".", 1)[-1].lower().startswith("adam")


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
        max_positions: int | None = None,
        max_length: int | None = None,
        alpha: float = 8.0,
        lr_lowrank: float | None = 1e-4,
        weight_decay: float | None = 0.0,
        adam_eps: float | None = None,
        optimizer: str | None = None,
        init: str = "text",
        init_text: str | None = None,
        tokenizer: PreTrainedTokenizerBase | None = None,
    ) -> None:
        """`max_positions` (s) null: max_length - prompt_length. `adam_eps` goes into both optimizer groups when
        `optimizer` (its `_target_`; None: any) is an Adam-family one, overriding the optimizer config's eps."""
        super().__init__()
        d = embedding.embedding_dim
        max_positions = input_positions(max_positions, max_length, prompt_length)
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
        self.adam_eps = adam_eps if takes_scalar_eps(optimizer) else None
        if adam_eps is not None and self.adam_eps is None:
            log.info("DePT: method.adam_eps=%g left out: %s has no scalar eps", adam_eps, optimizer)

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

    def analytic_flops(self, rows: int, input_length: int) -> float:
        """A[:n] B, once a batch (n = the padded input length): shared by its `rows` examples."""
        return input_length * self.rank * self.lora_b.shape[1] / rows

    def param_groups(self) -> list[dict]:
        """Two learning rates: the prompt uses method.lr, A and B method.lr_lowrank; both the same decay and eps."""
        shared = {} if self.weight_decay is None else {"weight_decay": self.weight_decay}
        if self.adam_eps is not None:
            shared["eps"] = self.adam_eps
        lowrank = {} if self.lr_lowrank is None else {"lr": self.lr_lowrank}
        return [{"params": [self.prompt], **shared}, {"params": [self.lora_a, self.lora_b], **lowrank, **shared}]

    def forward(
        self, input_embeds: Tensor, attention_mask: Tensor, inputs: Mapping[str, Tensor] = NO_INPUTS
    ) -> PromptOutput:
        embeds = input_embeds + self.update(input_embeds.shape[1]).to(input_embeds.dtype)
        prompt = self.prompt.to(input_embeds.dtype).unsqueeze(0).expand(input_embeds.shape[0], -1, -1)
        return PromptOutput(prompt, input_embeds=embeds)
