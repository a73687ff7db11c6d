"""LoRA adapters on the frozen backbone, from the peft library, for the LoRA + X methods."""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn


def add_lora(
    backbone: nn.Module, r: int = 8, alpha: int = 8, dropout: float = 0.1, target_modules: Sequence[str] = ("q", "v")
) -> nn.Module:
    """Inject trainable LoRA pairs into the (already frozen) backbone in place; base weights stay frozen."""
    from peft import LoraConfig, inject_adapter_in_model

    config = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=list(target_modules))
    return inject_adapter_in_model(config, backbone)
