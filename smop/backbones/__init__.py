"""Building the frozen backbone and its tokenizer (a tiny model from a config, a hub name, or a local folder), and
its kind: seq2seq (T5 family, `seq2seq.py`) or causal (decoder-only LMs, `causal.py`)."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoModelForSeq2SeqLM,
    AutoTokenizer,
    ByT5Tokenizer,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    T5Config,
    T5ForConditionalGeneration,
)
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES, MODEL_FOR_MASKED_LM_MAPPING_NAMES

from smop.backbones.causal import CausalKind
from smop.backbones.precision import cast_weights
from smop.backbones.seq2seq import Seq2SeqKind
from smop.checks import DTYPE_NAMES

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
        tokenizer = AutoTokenizer.from_pretrained(name_or_path)
    except (OSError, ValueError) as err:
        raise _offline_hint(name_or_path, err) from err
    if tokenizer.pad_token is None:  # decoder-only tokenizers (GPT-2, Llama) have none; the mask hides padding
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


class BackboneKindError(ValueError):
    """A checkpoint that is neither a seq2seq nor a causal LM, or whose weights do not load into its class."""


SEQ2SEQ, CAUSAL = "seq2seq", "causal"
KINDS = (SEQ2SEQ, CAUSAL)
# `tiny` with a `model_type` (llama, gpt2, ...) builds that model from a config; without one, the tiny T5
LOADERS = {SEQ2SEQ: AutoModelForSeq2SeqLM, CAUSAL: AutoModelForCausalLM}


def _architectures(config: PretrainedConfig) -> str:
    return ", ".join(getattr(config, "architectures", None) or []) or "no architectures listed"


def tiny_config(tiny: dict[str, Any] | None) -> PretrainedConfig:
    """The config of a model with random weights: a T5Config, or the `model_type` it names (llama, gpt2, ...)."""
    options = dict(tiny or {})
    model_type = options.pop("model_type", None)
    return T5Config(**options) if model_type in (None, "t5") else AutoConfig.for_model(model_type, **options)


def load_config(name_or_path: str, tiny: dict[str, Any] | None = None) -> PretrainedConfig:
    """The checkpoint's own config (config.json alone), or the tiny model's."""
    if name_or_path == TINY:
        return tiny_config(tiny)
    try:
        return AutoConfig.from_pretrained(name_or_path)
    except (OSError, ValueError) as err:
        raise _offline_hint(name_or_path, err) from err


def kind_of_config(config: PretrainedConfig, name_or_path: str) -> str:
    """seq2seq for an encoder-decoder, causal for a decoder-only LM; anything else is refused by name.

    Encoder-only models (BERT, RoBERTa) have a causal-LM class in transformers, but are masked LMs: refused."""
    if config.is_encoder_decoder:
        return SEQ2SEQ
    model_type = config.model_type
    if model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES and model_type not in MODEL_FOR_MASKED_LM_MAPPING_NAMES:
        return CAUSAL
    raise BackboneKindError(
        f"model.name_or_path={name_or_path} holds a {config.model_type} checkpoint ({_architectures(config)}): neither "
        "an encoder-decoder (T5 family) nor a decoder-only causal LM (Llama, Qwen2, Phi, GPT-2, CodeGen, ...). "
        "Point model.name_or_path at one of those"
    )


def backbone_kind(name_or_path: str, tiny: dict[str, Any] | None = None) -> str:
    """seq2seq or causal, read from the checkpoint's own config before any data or model is built."""
    return kind_of_config(load_config(name_or_path, tiny), name_or_path)


def model_kind(model: Any) -> str:
    """The kind of a `model` config group or dict (name_or_path, and tiny for a model built from a config)."""
    tiny = model.get("tiny")
    tiny = dict(tiny) if tiny is not None else None
    return backbone_kind(str(model["name_or_path"]), tiny)


# model.dtype: the precision the frozen weights are kept in (null: the checkpoint's own, transformers' "auto";
# float32 for a model built from a config); `auto` is resolved before (smop.fast_path)
DTYPES = {name: getattr(torch, name) for name in DTYPE_NAMES}


def weight_dtype(name: str | None) -> torch.dtype | None:
    """The torch dtype of a resolved `model.dtype` name; None keeps the checkpoint's own."""
    if name is None:
        return None
    if name not in DTYPES:
        raise ValueError(f"model.dtype={name} is not one of: null, {', '.join(DTYPES)} (auto is resolved first)")
    return DTYPES[name]


def build_backbone(
    name_or_path: str,
    tiny_config_options: dict[str, Any] | None = None,
    dtype: str | None = None,
    attention: str | None = None,
) -> PreTrainedModel:
    """Random weights from `tiny_config_options` when `name_or_path == "tiny"` (a T5, or the `model_type` it
    names), else the pretrained weights of a seq2seq (AutoModelForSeq2SeqLM) or causal (AutoModelForCausalLM) LM,
    kept in `dtype` (model.dtype: bfloat16 halves a 7B model's memory; the prompt modules keep float32 weights;
    the modules transformers keeps in float32 stay so, see smop.backbones.precision), with `attention`
    (model.attention: sdpa or eager; None: transformers' default).

    The kind is read from the checkpoint's own config first, and a weight the checkpoint lacks stops the run:
    a real checkpoint never becomes a randomly initialised model."""
    torch_dtype = weight_dtype(dtype)
    config = load_config(name_or_path, tiny_config_options)
    kind = kind_of_config(config, name_or_path)
    implementation = {"attn_implementation": attention} if attention is not None else {}
    if name_or_path == TINY:
        if attention is not None:  # the constructor reads it from the config; the seeded weights stay the same
            config._attn_implementation = attention
        model = T5ForConditionalGeneration(config) if kind == SEQ2SEQ else AutoModelForCausalLM.from_config(config)
        return cast_weights(model, torch_dtype) if torch_dtype is not None else model
    architectures = _architectures(config)
    try:
        model, info = LOADERS[kind].from_pretrained(
            name_or_path, output_loading_info=True, dtype=torch_dtype, **implementation
        )
    except (OSError, ValueError) as err:
        raise BackboneKindError(
            f"model.name_or_path={name_or_path}: its {config.model_type} config ({architectures}) does not load as a "
            f"{kind} model ({type(err).__name__}: {str(err).strip().splitlines()[0] if str(err) else ''})"
        ) from err
    missing = sorted(info.get("missing_keys") or [])
    if missing:
        raise BackboneKindError(
            f"model.name_or_path={name_or_path}: the weights there do not fit its {config.model_type} config: "
            f"{len(missing)} weight(s) missing (e.g. {', '.join(missing[:3])}), which would start random. "
            "The folder's weights belong to another architecture, or the download is incomplete"
        )
    return model


def kind_of(backbone: nn.Module) -> Seq2SeqKind | CausalKind:
    """How the system prepends a prompt, computes the loss and generates for this backbone."""
    config = getattr(backbone, "config", None)
    return Seq2SeqKind() if config is None or config.is_encoder_decoder else CausalKind()


def freeze(model: nn.Module) -> nn.Module:
    """No gradients and eval mode (no dropout) for every weight of the backbone."""
    model.requires_grad_(False)
    return model.eval()
