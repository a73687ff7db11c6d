"""Building the frozen seq2seq backbone and its tokenizer: the tiny offline T5, a hub name, or a local folder."""

from __future__ import annotations

from typing import Any

from torch import nn
from transformers import (
    AutoTokenizer,
    ByT5Tokenizer,
    PreTrainedTokenizerBase,
    T5Config,
    T5ForConditionalGeneration,
)

TINY = "tiny"


class HubUnreachableError(RuntimeError):
    """A model or tokenizer could not be loaded from the hub or the given folder."""


def _offline_hint(name: str, err: Exception) -> HubUnreachableError:
    return HubUnreachableError(
        f"Could not load '{name}' ({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}).\n"
        "The Hugging Face hub is unreachable or the name/folder is wrong. To run offline:\n"
        "  - point the model at a local folder holding config.json, the weights and the tokenizer files:\n"
        "      model.name_or_path=/path/to/t5-base\n"
        "  - read SuperGLUE from the official JSONL files instead of the hub:\n"
        "      dataset=rte dataset.source=dir dataset.data_dir=/path/to/RTE   (train.jsonl, val.jsonl)\n"
        "  - or use the embedded default, which needs no download: model=t5-tiny dataset.source=sample"
    )


def build_tokenizer(name_or_path: str) -> PreTrainedTokenizerBase:
    """The byte-level tokenizer needs no files; anything else comes from the hub or a folder."""
    if name_or_path == TINY:
        return ByT5Tokenizer()
    try:
        return AutoTokenizer.from_pretrained(name_or_path)
    except (OSError, ValueError) as err:
        raise _offline_hint(name_or_path, err) from err


def build_backbone(name_or_path: str, tiny_config: dict[str, Any] | None = None) -> T5ForConditionalGeneration:
    """A T5 with random weights from `tiny_config` when `name_or_path == "tiny"`, else pretrained weights."""
    if name_or_path == TINY:
        return T5ForConditionalGeneration(T5Config(**(tiny_config or {})))
    try:
        return T5ForConditionalGeneration.from_pretrained(name_or_path)
    except (OSError, ValueError) as err:
        raise _offline_hint(name_or_path, err) from err


def freeze(model: nn.Module) -> nn.Module:
    """No gradients and eval mode (no dropout) for every weight of the backbone."""
    model.requires_grad_(False)
    return model.eval()
