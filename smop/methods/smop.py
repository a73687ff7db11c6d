"""SMoP (Choi et al., EMNLP 2023): K short prompts, one (or k) chosen per instance by a router.

The router reads the masked mean of the frozen input embeddings (padding excluded, EOS included).
Instance i receives sum_{j in its top-k} p_ij * P_j, composed for the whole batch with one gather.

The K prompts are one [K*L, d] parameter, as in the released code, viewed as [K, L, d]: Adafactor factorises
the second moment of a 2-D parameter per row and column, so the layout decides its trajectory.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import Tensor, nn
from transformers import PreTrainedTokenizerBase

from smop.methods.base import NO_INPUTS, PromptModule, PromptOutput, init_prompt
from smop.methods.routers import Router


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
        self.prompts = nn.Parameter(torch.cat(tables))  # [K*L, d]: prompt k is rows k*L .. (k+1)*L - 1
        self.length = prompt_length
        self.router = router(d_model=embedding.embedding_dim, num_prompts=num_prompts)
        self.consistency_weight = self.router.consistency_weight

    @property
    def num_prompts(self) -> int:
        return self.prompts.shape[0] // self.length

    @property
    def prompt_length(self) -> int:
        return self.length

    @property
    def per_prompt(self) -> Tensor:
        """The table as [K, L, d] (a view: gradients reach the [K*L, d] parameter)."""
        return self.prompts.view(self.num_prompts, self.length, -1)

    def upgrade_state_dict(self, state: dict[str, Any], prefix: str = "") -> bool:
        """Reshape a table saved in the earlier [K, L, d] layout to [K*L, d], in place; True when it did.

        The weights are the same numbers; only an optimizer state saved with them (Adafactor's per-prompt
        factors) cannot carry over, which the system checks."""
        key = prefix + "prompts"
        if key in state and state[key].dim() == 3:
            state[key] = state[key].reshape(-1, state[key].shape[-1])
            return True
        return False

    def analytic_flops(self, rows: int, input_length: int) -> float:
        """The router's linear layer (d x K; a router without one: 0) and the weighted sum of the k chosen prompts."""
        num, length, d = self.per_prompt.shape
        router = self.router.linear.in_features * num if hasattr(self.router, "linear") else 0
        return float(router + getattr(self.router, "topk", 1) * length * d)

    def forward(
        self, input_embeds: Tensor, attention_mask: Tensor, inputs: Mapping[str, Tensor] = NO_INPUTS
    ) -> PromptOutput:
        # routed in the prompts' precision: the frozen embeddings may be bfloat16 (model.dtype), the router is not
        routing = self.router(masked_mean(input_embeds.to(self.prompts.dtype), attention_mask))
        chosen = self.per_prompt.to(input_embeds.dtype)[routing.indices]  # [B, k, L, d]: one batched gather
        if self.router.batch_sum:
            # The released code's broadcasting: every instance gets the sum of all routed prompts in the
            # batch, scaled by its own weight. Predictions then depend on the batch. For comparison only.
            chosen = chosen.sum(0, keepdim=True).expand_as(chosen)
        prompt = torch.einsum("bk,bkld->bld", routing.weights.to(chosen.dtype), chosen)
        return PromptOutput(prompt, self.router.balance_loss(routing), routing.indices)
