"""Prompt tuning (Lester et al., 2021): one learned table of L vectors shared by every instance."""

from __future__ import annotations

from collections.abc import Mapping

from torch import Tensor, nn
from transformers import PreTrainedTokenizerBase

from smop.methods.base import NO_INPUTS, PromptModule, PromptOutput, init_prompt


class PromptTuning(PromptModule):
    def __init__(
        self,
        embedding: nn.Embedding,
        prompt_length: int = 100,
        init: str = "random",
        init_text: str | None = None,
        tokenizer: PreTrainedTokenizerBase | None = None,
    ) -> None:
        super().__init__()
        self.prompt = nn.Parameter(init_prompt(prompt_length, embedding, init, tokenizer, init_text))

    @property
    def prompt_length(self) -> int:
        return self.prompt.shape[0]

    def analytic_flops(self, rows: int, input_length: int) -> float:
        """A static table: no arithmetic."""
        return 0.0

    def static_prompt(self) -> Tensor:
        return self.prompt.detach().float().clone()

    def forward(
        self, input_embeds: Tensor, attention_mask: Tensor, inputs: Mapping[str, Tensor] = NO_INPUTS
    ) -> PromptOutput:
        batch = input_embeds.shape[0]
        return PromptOutput(self.prompt.to(input_embeds.dtype).unsqueeze(0).expand(batch, -1, -1))
