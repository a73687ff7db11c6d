"""Storing a frozen backbone in a lower precision the way transformers' from_pretrained(dtype=...) does, also for a
model built from a config (whose `.to(dtype)` would cast everything).

transformers keeps a model's `_keep_in_fp32_modules` (T5: `wo`, whose activations overflow float16) in float32 when
the dtype is float16 only, and its `_keep_in_fp32_modules_strict` for float16 and bfloat16 alike; bfloat16 has
float32's range, so T5's `wo` is stored in bfloat16 there. We follow the same rule, so a model built from a config
and the same model loaded from a folder hold the same dtypes."""

from __future__ import annotations

import re

import torch
from torch import nn


def kept_in_float32(model: nn.Module, dtype: torch.dtype) -> list[str]:
    """The module names that transformers keeps in float32 for this dtype."""
    names: list[str] = []
    if dtype == torch.float16:
        names += list(getattr(model, "_keep_in_fp32_modules", None) or [])
    if dtype in (torch.float16, torch.bfloat16):
        names += list(getattr(model, "_keep_in_fp32_modules_strict", None) or [])
    return sorted(set(names))


def _matches(parameter: str, modules: list[str]) -> bool:
    """A dotted parameter name that passes through one of `modules` (`wo` matches `...DenseReluDense.wo.weight`)."""
    return any(re.search(rf"(^|\.){re.escape(name)}(\.|$)", parameter) for name in modules)


def cast_weights(model: nn.Module, dtype: torch.dtype) -> nn.Module:
    """The floating-point parameters in `dtype`, in place, except those transformers keeps in float32 for it.

    Buffers keep their dtype, as from_pretrained leaves them: `.to(dtype)` would round Llama's rotary `inv_freq`."""
    keep = kept_in_float32(model, dtype)
    for name, tensor in model.named_parameters():
        if tensor.is_floating_point():
            tensor.data = tensor.data.to(torch.float32 if _matches(name, keep) else dtype)
    return model
