"""Routing strategies for the sparse mixture of prompts (SMoP, Table 3 of the paper).

A router maps each instance's pooled input embedding to the prompts it uses and their weights.
Every router returns the same `Routing`, so the mixture composes prompts with one batched gather.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn


@dataclass
class Routing:
    indices: Tensor  # [B, k] long: which prompts each instance uses
    weights: Tensor  # [B, k]: their weights (gradients reach the router only through these)
    probs: Tensor | None = None  # [B, K] router probabilities, when the router has any


class Router(nn.Module):
    """Base: holds the options every router shares."""

    selects_one: bool = False  # one prompt per instance with a learned weight (where the released batch sum bites)

    def __init__(
        self,
        d_model: int,
        num_prompts: int,
        load_balance_weight: float = 0.0,
        emulate_reference_batch_sum: bool = False,
        consistency_weight: float = 0.0,
    ) -> None:
        super().__init__()
        self.d_model = d_model
        self.num_prompts = num_prompts
        self.load_balance_weight = load_balance_weight
        self.emulate_reference_batch_sum = emulate_reference_batch_sum
        self.consistency_weight = consistency_weight

    @property
    def batch_sum(self) -> bool:
        """Whether the mixture reproduces the released code's batch sum: only when asked, and only where that code
        has the defect, i.e. when one prompt is chosen per instance. Its top-k (k >= 2) and stochastic paths route
        per instance, so there the flag reproduces the reference by changing nothing."""
        return self.emulate_reference_batch_sum and self.selects_one

    def balance_loss(self, routing: Routing) -> Tensor | None:
        """Switch-style auxiliary loss alpha * K * sum_k mean(p_k) * frac_k (off when alpha is 0)."""
        if self.load_balance_weight <= 0 or routing.probs is None or not self.training:
            return None
        top1 = routing.indices[:, 0]
        frac = torch.bincount(top1, minlength=self.num_prompts).to(routing.probs.dtype) / top1.numel()
        return self.load_balance_weight * self.num_prompts * (routing.probs.mean(0) * frac).sum()


class LinearRouter(Router):
    """Linear router on the pooled input, top-k selection, optional multiplicative perturbation.

    With `perturb`, training logits become h * (1 + eps), eps ~ N(0, 1), the noise scale detached
    (h + eps * h.detach()). `logit_dropout` reproduces the reference's unperturbed top-1 router.
    No noise and no dropout at evaluation. Top-k weights are the softmax probabilities, not renormalised.
    """

    def __init__(
        self, d_model: int, num_prompts: int, topk: int = 1, perturb: bool = True, logit_dropout: float = 0.0, **kwargs
    ) -> None:
        super().__init__(d_model, num_prompts, **kwargs)
        if not 1 <= topk <= num_prompts:
            raise ValueError(f"router.topk={topk} must be between 1 and method.num_prompts={num_prompts}")
        self.topk = topk
        self.selects_one = topk == 1
        self.perturb = perturb
        self.linear = nn.Linear(d_model, num_prompts, bias=False)
        nn.init.orthogonal_(self.linear.weight)
        self.dropout = nn.Dropout(logit_dropout)

    def forward(self, features: Tensor) -> Routing:
        logits = self.linear(features)
        if self.training and self.perturb:
            logits = logits + torch.randn_like(logits) * logits.detach()
        probs = F.softmax(self.dropout(logits), dim=-1)
        weights, indices = probs.topk(self.topk, dim=-1)
        return Routing(indices, weights, probs)


class GumbelRouter(Router):
    """Straight-through hard Gumbel-softmax over the router logits in training; argmax at evaluation.

    The forward weight is 1 in both modes; in training the gradient flows through the soft sample.
    (The reference sampled at evaluation too, which made its scores random: we do not.)
    """

    selects_one = True

    def __init__(self, d_model: int, num_prompts: int, tau: float = 1.0, **kwargs) -> None:
        super().__init__(d_model, num_prompts, **kwargs)
        self.tau = tau
        self.linear = nn.Linear(d_model, num_prompts, bias=False)
        nn.init.orthogonal_(self.linear.weight)

    def forward(self, features: Tensor) -> Routing:
        logits = self.linear(features)
        probs = F.softmax(logits, dim=-1)
        if self.training:
            sample = F.gumbel_softmax(logits, tau=self.tau, hard=True)
            indices = sample.argmax(-1, keepdim=True)
            return Routing(indices, sample.gather(-1, indices), probs)
        indices = logits.argmax(-1, keepdim=True)
        return Routing(indices, torch.ones_like(indices, dtype=features.dtype), probs)


class StochasticRouter(Router):
    """AdaMix-like: no learned router. A uniformly random prompt per instance in training, the mean of
    all K prompts at evaluation. `consistency_weight` > 0 adds the two-pass consistency loss."""

    def forward(self, features: Tensor) -> Routing:
        batch = features.shape[0]
        if self.training:
            indices = torch.randint(0, self.num_prompts, (batch, 1), device=features.device)
            return Routing(indices, torch.ones(batch, 1, device=features.device, dtype=features.dtype))
        indices = torch.arange(self.num_prompts, device=features.device).expand(batch, -1)
        weights = torch.full(
            (batch, self.num_prompts), 1.0 / self.num_prompts, device=features.device, dtype=features.dtype
        )
        return Routing(indices, weights)


class SingleRouter(Router):
    """No routing: a single prompt used by every instance (prompt tuning with L tokens)."""

    def __init__(self, d_model: int, num_prompts: int, **kwargs) -> None:
        if num_prompts != 1:
            raise ValueError(f"router=single uses one prompt, got method.num_prompts={num_prompts}")
        super().__init__(d_model, num_prompts, **kwargs)

    def forward(self, features: Tensor) -> Routing:
        batch = features.shape[0]
        indices = torch.zeros(batch, 1, dtype=torch.long, device=features.device)
        return Routing(indices, torch.ones(batch, 1, device=features.device, dtype=features.dtype))
