"""SMoP (Choi et al., EMNLP 2023): K short prompts, one (or k) chosen per instance by a router.

The router reads the masked mean of the frozen input embeddings (padding excluded, EOS included).
Instance i receives sum_{j in its top-k} p_ij * P_j, composed for the whole batch with one gather.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn
from transformers import PreTrainedTokenizerBase

from smop.prompts.base import PromptModule, PromptOutput, init_prompt
from smop.routers import Router


def masked_mean(embeds: Tensor, attention_mask: Tensor) -> Tensor:
    """Mean over the real tokens of each row: [B, n, d], [B, n] -> [B, d]."""
    mask = attention_mask.unsqueeze(-1).to(embeds.dtype)
    return (embeds * mask).sum(1) / mask.sum(1).clamp(min=1.0)


class SparseMixtureOfPrompts(PromptModule):
    routes = True

    def __init__(
        self,
        embedding: nn.Embedding,
        router: Callable[..., Router],
        num_prompts: int = 4,
        prompt_length: int = 5,
        init: str = "random",
        init_text: str | None = None,
        tokenizer: PreTrainedTokenizerBase | None = None,
    ) -> None:
        super().__init__()
        tables = [init_prompt(prompt_length, embedding, init, tokenizer, init_text) for _ in range(num_prompts)]
        self.prompts = nn.Parameter(torch.stack(tables))  # [K, L, d]
        self.router = router(d_model=embedding.embedding_dim, num_prompts=num_prompts)
        self.consistency_weight = self.router.consistency_weight

    @property
    def num_prompts(self) -> int:
        return self.prompts.shape[0]

    @property
    def prompt_length(self) -> int:
        return self.prompts.shape[1]

    def forward(self, input_embeds: Tensor, attention_mask: Tensor) -> PromptOutput:
        routing = self.router(masked_mean(input_embeds, attention_mask))
        chosen = self.prompts.to(input_embeds.dtype)[routing.indices]  # [B, k, L, d]: one batched gather
        if self.router.emulate_reference_batch_sum:
            # The released code's broadcasting: every instance gets the sum of all routed prompts in the
            # batch, scaled by its own weight. Predictions then depend on the batch. For comparison only.
            chosen = chosen.sum(0, keepdim=True).expand_as(chosen)
        prompt = torch.einsum("bk,bkld->bld", routing.weights.to(chosen.dtype), chosen)
        return PromptOutput(prompt, self.router.balance_loss(routing), routing.indices)
