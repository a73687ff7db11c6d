"""Instance-dependent prompts from a frozen encoder's pooled vector: IDPG and LoPA (Jain et al., NeurIPS 2024).

IDPG: the prompt is MLP(x) reshaped to m x d. LoPA: a shared prompt Z_S gated per instance by a low-rank
matrix, Z = Z_S * sigmoid(u v^T) with u (m x r) and v (d x r) from two MLPs of x.
x is the masked mean of the frozen backbone's encoder over the input (no download). The encoder is the
backbone itself: held in a plain object so it is neither registered twice nor saved with the prompt.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from transformers import PreTrainedTokenizerBase

from smop.prompts.base import PromptModule, PromptOutput, init_prompt
from smop.prompts.mixture import masked_mean

ENCODERS = ("backbone",)  # a hub encoder needs input ids (its own tokenizer), which prompt modules do not get


class FrozenEncoder:
    """Mean-pooled last hidden states of the backbone's encoder, without gradients. Not an nn.Module on purpose."""

    def __init__(self, backbone: nn.Module, name: str = "backbone") -> None:
        if name not in ENCODERS:
            raise ValueError(
                f"method.encoder={name}: only 'backbone' (the frozen backbone's encoder, mean-pooled) is supported; "
                "another model needs its own tokenizer, and prompt modules receive embeddings, not input ids"
            )
        self.encoder = backbone.get_encoder()
        self.width: int = backbone.config.d_model

    @torch.no_grad()
    def __call__(self, input_embeds: Tensor, attention_mask: Tensor) -> Tensor:
        hidden = self.encoder(inputs_embeds=input_embeds, attention_mask=attention_mask).last_hidden_state
        return masked_mean(hidden, attention_mask)


def generator(width: int, hidden: int, out: int, dropout: float, std: float = 0.02) -> nn.Sequential:
    """Dropout -> Linear(h -> H) -> tanh -> Linear(H -> out); weights N(0, std), output bias 0 (the reference)."""
    mlp = nn.Sequential(nn.Dropout(dropout), nn.Linear(width, hidden), nn.Tanh(), nn.Linear(hidden, out))
    for layer in (mlp[1], mlp[3]):
        nn.init.normal_(layer.weight, std=std)
    nn.init.zeros_(mlp[3].bias)
    return mlp


class InstancePrompt(PromptModule):
    """What IDPG and LoPA share: the frozen encoder and its pooled vector per instance."""

    needs_backbone = True

    def __init__(self, backbone: nn.Module, prompt_length: int, encoder: str) -> None:
        super().__init__()
        self.encode = FrozenEncoder(backbone, encoder)
        self.length = prompt_length

    @property
    def prompt_length(self) -> int:
        return self.length

    def pooled(self, input_embeds: Tensor, attention_mask: Tensor) -> Tensor:
        """[B, h] in the generators' dtype (the encoder may run in another precision)."""
        return self.encode(input_embeds, attention_mask).to(next(self.parameters()).dtype)


class IDPG(InstancePrompt):
    def __init__(
        self,
        embedding: nn.Embedding,
        backbone: nn.Module,
        prompt_length: int = 10,
        hidden_size: int = 256,
        dropout: float = 0.1,
        encoder: str = "backbone",
        tokenizer: PreTrainedTokenizerBase | None = None,
    ) -> None:
        super().__init__(backbone, prompt_length, encoder)
        self.d = embedding.embedding_dim
        self.mlp = generator(self.encode.width, hidden_size, prompt_length * self.d, dropout)

    def forward(self, input_embeds: Tensor, attention_mask: Tensor) -> PromptOutput:
        prompt = self.mlp(self.pooled(input_embeds, attention_mask)).view(-1, self.length, self.d)
        return PromptOutput(prompt.to(input_embeds.dtype))


class LoPA(InstancePrompt):
    def __init__(
        self,
        embedding: nn.Embedding,
        backbone: nn.Module,
        prompt_length: int = 10,
        rank: int = 4,
        hidden_size: int = 256,
        dropout: float = 0.1,
        encoder: str = "backbone",
        init: str = "random",
        init_text: str | None = None,
        shared_lr: float | None = None,
        tokenizer: PreTrainedTokenizerBase | None = None,
    ) -> None:
        super().__init__(backbone, prompt_length, encoder)
        d, width = embedding.embedding_dim, self.encode.width
        self.shared = nn.Parameter(init_prompt(prompt_length, embedding, init, tokenizer, init_text))  # Z_S
        self.rows = generator(width, hidden_size, prompt_length * rank, dropout)  # u: m x r
        self.cols = generator(width, hidden_size, d * rank, dropout)  # v: d x r
        self.rank, self.shared_lr = rank, shared_lr

    def param_groups(self) -> list[dict]:
        """One group at method.lr (the reference), or Z_S at its own `shared_lr`: a raw table wants a larger step."""
        if self.shared_lr is None:
            return super().param_groups()
        generators = [p for name, p in self.named_parameters() if name != "shared"]
        return [{"params": [self.shared], "lr": self.shared_lr}, {"params": generators}]

    def gate(self, pooled: Tensor) -> Tensor:
        """sigmoid(u v^T) in (0, 1), [B, m, d]: how much of each shared prompt entry an instance keeps."""
        u = self.rows(pooled).view(pooled.shape[0], self.length, self.rank)
        v = self.cols(pooled).view(pooled.shape[0], -1, self.rank)
        return torch.sigmoid(u @ v.transpose(1, 2))

    def forward(self, input_embeds: Tensor, attention_mask: Tensor) -> PromptOutput:
        prompt = self.shared * self.gate(self.pooled(input_embeds, attention_mask))
        return PromptOutput(prompt.to(input_embeds.dtype))
