"""Building the frozen seq2seq backbone and its tokenizer: the tiny offline T5, a hub name, or a local folder."""

from __future__ import annotations

from typing import Any

from torch import nn
from transformers import (
    AutoConfig,
    AutoModelForSeq2SeqLM,
    AutoTokenizer,
    ByT5Tokenizer,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    T5Config,
    T5ForConditionalGeneration,
)

TINY = "tiny"


class HubUnreachableError(RuntimeError):
    """A model or tokenizer could not be loaded from the hub or the given folder."""


def _offline_hint(name: str, err: Exception) -> HubUnreachableError:
    """One line, the way on first: a local folder of this model, or the embedded default; then what failed."""
    folder = f"/path/to/{name.rstrip('/').rsplit('/', 1)[-1]}"
    cause = str(err).strip().splitlines()[0] if str(err).strip() else ""
    return HubUnreachableError(
        f"Could not load model '{name}': point model.name_or_path={folder} at a folder holding its config.json, "
        "weights and tokenizer files (and, offline, read SuperGLUE from its JSONL files: dataset.source=dir "
        "dataset.data_dir=/path/to/folder), or run the embedded default, which downloads nothing "
        f"(model=t5-tiny dataset.source=sample). The hub is unreachable or the name is wrong ({type(err).__name__}: "
        f"{cause})"
    )


def build_tokenizer(name_or_path: str) -> PreTrainedTokenizerBase:
    """The byte-level tokenizer needs no files; anything else comes from the hub or a folder."""
    if name_or_path == TINY:
        return ByT5Tokenizer()
    try:
        return AutoTokenizer.from_pretrained(name_or_path)
    except (OSError, ValueError) as err:
        raise _offline_hint(name_or_path, err) from err


class BackboneKindError(ValueError):
    """A checkpoint that is not an encoder-decoder model, or whose weights do not load into one."""


def _architectures(config: PretrainedConfig) -> str:
    return ", ".join(getattr(config, "architectures", None) or []) or "no architectures listed"


def check_backbone_kind(name_or_path: str) -> PretrainedConfig | None:
    """The checkpoint's own config (None for the tiny T5), refused unless it is an encoder-decoder model: read
    before any data or model is built, from config.json alone."""
    if name_or_path == TINY:
        return None
    try:
        config = AutoConfig.from_pretrained(name_or_path)
    except (OSError, ValueError) as err:
        raise _offline_hint(name_or_path, err) from err
    if not config.is_encoder_decoder:
        raise BackboneKindError(
            f"model.name_or_path={name_or_path} holds a {config.model_type} checkpoint ({_architectures(config)}): a "
            "decoder-only model. This version trains encoder-decoder backbones (T5 family): point model.name_or_path "
            "at one, e.g. model=t5-base or a local folder of it"
        )
    return config


def build_backbone(name_or_path: str, tiny_config: dict[str, Any] | None = None) -> PreTrainedModel:
    """A T5 with random weights from `tiny_config` when `name_or_path == "tiny"`, else the pretrained weights of an
    encoder-decoder model (T5 family, or any AutoModelForSeq2SeqLM that behaves like it).

    The kind is read from the checkpoint's own config first, and a weight the checkpoint lacks stops the run:
    a real checkpoint never becomes a randomly initialised model."""
    if name_or_path == TINY:
        return T5ForConditionalGeneration(T5Config(**(tiny_config or {})))
    config = check_backbone_kind(name_or_path)
    architectures = _architectures(config)
    try:
        model, info = AutoModelForSeq2SeqLM.from_pretrained(name_or_path, output_loading_info=True)
    except (OSError, ValueError) as err:
        raise BackboneKindError(
            f"model.name_or_path={name_or_path}: its {config.model_type} config ({architectures}) does not load as a "
            f"sequence-to-sequence model ({type(err).__name__}: {str(err).strip().splitlines()[0] if str(err) else ''})"
        ) from err
    missing = sorted(info.get("missing_keys") or [])
    if missing:
        raise BackboneKindError(
            f"model.name_or_path={name_or_path}: the weights there do not fit its {config.model_type} config: "
            f"{len(missing)} weight(s) missing (e.g. {', '.join(missing[:3])}), which would start random. "
            "The folder's weights belong to another architecture, or the download is incomplete"
        )
    return model


def freeze(model: nn.Module) -> nn.Module:
    """No gradients and eval mode (no dropout) for every weight of the backbone."""
    model.requires_grad_(False)
    return model.eval()
