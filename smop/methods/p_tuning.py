"""P-tuning (Liu et al., 2021): a table of L vectors reparameterised by an MLP d -> h -> h -> d."""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor, nn
from transformers import PreTrainedTokenizerBase

from smop.methods.base import NO_INPUTS, PromptModule, PromptOutput, init_prompt


class PTuning(PromptModule):
    def __init__(
        self,
        embedding: nn.Embedding,
        prompt_length: int = 100,
        hidden_size: int = 128,
        init: str = "random",
        init_text: str | None = None,
        tokenizer: PreTrainedTokenizerBase | None = None,
    ) -> None:
        super().__init__()
        d = embedding.embedding_dim
        self.table = nn.Parameter(init_prompt(prompt_length, embedding, init, tokenizer, init_text))
        self.mlp = nn.Sequential(
            nn.Linear(d, hidden_size),
            nn.ReLU(),
            nn.Linear(hidden_size, hidden_size),
            nn.ReLU(),
            nn.Linear(hidden_size, d),
        )

    @property
    def prompt_length(self) -> int:
        return self.table.shape[0]

    def analytic_flops(self, rows: int, input_length: int) -> float:
        """The MLP over the L table rows, computed once a batch: shared by its `rows` examples."""
        layers = [m for m in self.mlp if isinstance(m, nn.Linear)]
        return self.prompt_length * sum(m.in_features * m.out_features for m in layers) / rows

    @torch.no_grad()
    def static_prompt(self) -> Tensor:
        """The MLP is a training-time reparameterisation: at inference the prompt is its output, the same for all."""
        return self.mlp(self.table).detach().float().clone()

    def forward(
        self, input_embeds: Tensor, attention_mask: Tensor, inputs: Mapping[str, Tensor] = NO_INPUTS
    ) -> PromptOutput:
        # The MLP output does not depend on the input: computed once per batch, shared by its rows.
        prompt = self.mlp(self.table).to(input_embeds.dtype)
        return PromptOutput(prompt.unsqueeze(0).expand(input_embeds.shape[0], -1, -1))
