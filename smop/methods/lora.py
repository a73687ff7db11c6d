"""LoRA adapters on the frozen backbone, from the peft library, for the LoRA + X methods."""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn

T5_TARGETS = ("q", "v")  # T5's attention query and value projections, as the reference


def add_lora(
    backbone: nn.Module,
    r: int = 8,
    alpha: int = 8,
    dropout: float = 0.1,
    target_modules: Sequence[str] | None = None,
) -> nn.Module:
    """Inject trainable LoRA pairs into the (already frozen) backbone in place; base weights stay frozen.

    `target_modules` None: T5's q and v (a causal model config names its own: model.lora_target_modules).
    The adapters are float32 whatever the backbone's dtype: inject_adapter_in_model creates them in the base
    layer's dtype (bfloat16 under model.dtype=bfloat16), and trained weights and their optimizer state stay float32
    (get_peft_model's autocast_adapter_dtype does the same)."""
    from peft import LoraConfig, inject_adapter_in_model

    targets = list(target_modules or T5_TARGETS)
    config = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=targets)
    backbone = inject_adapter_in_model(config, backbone)
    for name, weight in backbone.named_parameters():
        if "lora_" in name and weight.is_floating_point():
            weight.data = weight.data.float()
    return backbone


def has_lora(backbone: nn.Module) -> bool:
    return any(_is_adapter_layer(module) for module in backbone.modules())


def remove_lora(backbone: nn.Module) -> nn.Module:
    """Undo `add_lora` in place: every adapted layer is replaced by its untouched base layer (the benchmark
    trains several methods on one shared backbone)."""
    for parent in list(backbone.modules()):
        for name, child in list(parent.named_children()):
            if _is_adapter_layer(child):
                setattr(parent, name, child.get_base_layer())
    if hasattr(backbone, "peft_config"):
        del backbone.peft_config
    return backbone


def _is_adapter_layer(module: nn.Module) -> bool:
    from peft.tuners.tuners_utils import BaseTunerLayer

    return isinstance(module, BaseTunerLayer)
