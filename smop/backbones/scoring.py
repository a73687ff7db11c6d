"""Scoring a closed set of label words instead of generating: one teacher-forced pass per (example, label word).

Why: a label-word task's generation is `max_new_tokens` sequential decoder steps, each a tiny matmul; scoring is one
decoder pass over every label word at once (seq2seq: the encoder runs once per example), so it is both faster and
independent of what else is in the batch. The score of a label word is the sum of its tokens' log-probabilities,
EOS included (a word that is a prefix of another is not favoured for being short), and the argmax is the class.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

IGNORE = -100


def candidate_ids(label_ids: Sequence[Sequence[int]]) -> Tensor:
    """[C, t] token ids of the C label words, right-padded with -100 to the longest."""
    longest = max(len(ids) for ids in label_ids)
    return torch.tensor([list(ids) + [IGNORE] * (longest - len(ids)) for ids in label_ids], dtype=torch.long)


def expand(rows: int, candidates: Tensor) -> Tensor:
    """[rows * C, t]: row b * C + c holds candidate c (the layout `repeat_interleave(C)` gives the inputs)."""
    return candidates.repeat(rows, 1)


def sequence_log_likelihood(logits: Tensor, labels: Tensor) -> Tensor:
    """[N] sum over the real (not -100) positions of log softmax(logits)[label], in float32."""
    real = labels.ne(IGNORE)
    log_probs = logits.float().log_softmax(-1)
    picked = log_probs.gather(-1, labels.masked_fill(~real, 0).unsqueeze(-1)).squeeze(-1)
    return (picked * real).sum(-1)
