"""`method.init_from=PATH`: a new run's prompt starts from trained weights instead of its initialisation.

Four sources, told apart by their files: a train.py checkpoint (`.ckpt`), an export folder (`export.json`), a peft
prompt-tuning folder (`adapter_config.json` of peft_type PROMPT_TUNING: the prompt table) and a DePT folder (peft_type
PROMPT_TUNING_LORA, as the DePT authors released theirs: the prompt and the low-rank pair A, B). The source decides
the shape: the config must build exactly the same tensors (DePT: the same m, r and s), or the run is refused with the
values to set; the backbone's width must be the prompt's. Only the prompt module's weights are read (not a LoRA + X
run's adapters, not the optimizer state): the run then trains them, or evaluates them with train=false.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig
from torch import Tensor

from smop.checks import Refused
from smop.methods.base import PromptModule

log = logging.getLogger(__name__)

PEFT_CONFIG, PEFT_SAFETENSORS, PEFT_BIN = "adapter_config.json", "adapter_model.safetensors", "adapter_model.bin"
PEFT_PROMPT_TUNING, DEPT_PEFT_TYPE = "PROMPT_TUNING", "PROMPT_TUNING_LORA"
# DePT's fork of peft saves the prompt and the pair under these names; ours are DecomposedPromptTuning's
DEPT_KEYS = {
    "prompt_embeddings": "prompt",
    "prompt_encoder.lora_embedding_A": "lora_a",
    "prompt_encoder.lora_embedding_B": "lora_b",
}
PEFT_KEYS = {"prompt_embeddings": "prompt"}
SHAPE_KEYS = ("num_prompts", "prompt_length", "hidden_size", "rank", "max_positions")  # what sizes a method's tensors
SOURCES = "a train.py checkpoint (.ckpt), an export folder (export.json), a peft prompt-tuning folder or a DePT folder"


class InitFromError(Refused):
    """A method.init_from source that cannot initialise this run's prompt; the message says why and what to set."""


@dataclass
class PromptSource:
    """A trained prompt: the module's tensors by our names, and what its files say it was."""

    path: Path
    kind: str  # checkpoint | export | peft | dept
    state: dict[str, Tensor]
    method: str | None = None  # the method it was trained as (our own files only)
    model: str | None = None  # the backbone it was trained on, where the files name it
    options: dict[str, Any] = field(default_factory=dict)  # the shape options it was trained with

    @property
    def width(self) -> int | None:
        """d, the prompt vectors' width (None for a module without a prompt table of its own)."""
        table = next((self.state[key] for key in ("prompt", "prompts", "table") if key in self.state), None)
        return None if table is None else int(table.shape[-1])


# --- reading ------------------------------------------------------------------------------------------------------
def read_source(path: str | Path) -> PromptSource:
    """The prompt in a checkpoint or a folder, its kind told by its files; anything else refused naming them."""
    path = Path(path).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"method.init_from={path} does not exist: give {SOURCES}")
    if path.is_file():
        if path.name in (PEFT_CONFIG, PEFT_SAFETENSORS, PEFT_BIN, "prompt.safetensors", "export.json"):
            raise InitFromError(f"method.init_from={path} is one file of a folder: give the folder, {path.parent}")
        return from_checkpoint(path)
    if (path / "export.json").is_file():
        return from_export(path)
    if (path / PEFT_CONFIG).is_file():
        return from_peft(path)
    found = sorted(p.name for p in path.iterdir())
    shown = ", ".join(found[:8]) + (f" and {len(found) - 8} more" if len(found) > 8 else "") or "nothing"
    raise InitFromError(
        f"method.init_from={path} is a folder with neither export.json nor {PEFT_CONFIG} (it holds {shown}): "
        f"give {SOURCES}"
    )


def from_checkpoint(path: Path) -> PromptSource:
    from smop.loading import ExportError, read_checkpoint  # loading builds systems through smop.builders

    try:
        checkpoint = read_checkpoint(path)
    except ExportError as err:
        raise InitFromError(f"method.init_from: {err}") from err
    state = {k.removeprefix("prompt."): v for k, v in checkpoint["state_dict"].items() if k.startswith("prompt.")}
    return ours(path, "checkpoint", state, checkpoint["hyper_parameters"])


def from_export(folder: Path) -> PromptSource:
    from smop.loading import PROMPT_WEIGHTS, ExportError, read_export, read_weights

    try:
        manifest, config = read_export(folder)
        prompt_file = manifest.get("files", {}).get("prompt", PROMPT_WEIGHTS)
        state = read_weights(folder / prompt_file) if prompt_file else {}
    except ExportError as err:
        raise InitFromError(f"method.init_from: {err}") from err
    return ours(folder, "export", state, config)


def ours(path: Path, kind: str, state: dict[str, Tensor], config: dict[str, Any]) -> PromptSource:
    method = config["method"]
    if not state:
        raise InitFromError(f"method.init_from={path} holds no prompt weights (method={method.get('name')})")
    options = {key: method[key] for key in SHAPE_KEYS if method.get(key) is not None}
    return PromptSource(path, kind, state, method.get("name"), config["model"].get("name_or_path"), options)


def from_peft(folder: Path) -> PromptSource:
    """A peft prompt-tuning folder, or DePT's PROMPT_TUNING_LORA one; its config and tensors must agree."""
    try:
        config = json.loads((folder / PEFT_CONFIG).read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise InitFromError(f"method.init_from: {folder / PEFT_CONFIG} is not valid JSON ({err})") from err
    peft_type = config.get("peft_type")
    if peft_type not in (PEFT_PROMPT_TUNING, DEPT_PEFT_TYPE):
        raise InitFromError(
            f"method.init_from={folder}: peft_type {peft_type!r} is not a prompt this framework reads; "
            f"allowed: {PEFT_PROMPT_TUNING} (prompt tuning), {DEPT_PEFT_TYPE} (DePT)"
        )
    if config.get("num_transformer_submodules", 1) != 1:
        raise InitFromError(
            f"method.init_from={folder}: num_transformer_submodules={config['num_transformer_submodules']} holds a "
            "second prompt for the decoder; these methods prepend one prompt to the (encoder) input: use a folder "
            "saved with num_transformer_submodules=1"
        )
    names = DEPT_KEYS if peft_type == DEPT_PEFT_TYPE else PEFT_KEYS
    weights = peft_weights(folder)
    if set(weights) != set(names):
        raise InitFromError(
            f"method.init_from={folder}: a {peft_type} folder holds {sorted(names)}, this one {sorted(weights)}"
        )
    state = {names[key]: value.float() for key, value in weights.items()}
    options = {"prompt_length": int(state["prompt"].shape[0])}
    if peft_type == DEPT_PEFT_TYPE:
        options.update(rank=int(state["lora_a"].shape[1]), max_positions=int(state["lora_a"].shape[0]))
    check_peft_config(folder, config, options, int(state["prompt"].shape[1]))
    kind = "dept" if peft_type == DEPT_PEFT_TYPE else "peft"
    return PromptSource(folder, kind, state, None, config.get("base_model_name_or_path"), options)


def peft_weights(folder: Path) -> dict[str, Tensor]:
    """adapter_model.safetensors, else adapter_model.bin (a torch pickle: read with weights_only=True only)."""
    from safetensors.torch import load_file

    try:
        if (folder / PEFT_SAFETENSORS).is_file():
            return load_file(folder / PEFT_SAFETENSORS)
        if (folder / PEFT_BIN).is_file():
            weights = torch.load(folder / PEFT_BIN, map_location="cpu", weights_only=True)
            if isinstance(weights, dict) and all(isinstance(v, Tensor) for v in weights.values()):
                return weights
            raise InitFromError(f"method.init_from: {folder / PEFT_BIN} is not a dict of tensors")
    except InitFromError:
        raise
    except Exception as err:  # a short file, a foreign pickle: torch and safetensors raise many types
        raise InitFromError(f"method.init_from={folder}: unreadable weights ({type(err).__name__}: {err})") from err
    raise InitFromError(f"method.init_from={folder} has {PEFT_CONFIG} but neither {PEFT_SAFETENSORS} nor {PEFT_BIN}")


def check_peft_config(folder: Path, config: dict[str, Any], options: dict[str, int], width: int) -> None:
    """The sizes adapter_config.json states against the tensors: a folder that contradicts itself is refused."""
    stated = {
        "num_virtual_tokens": (config.get("num_virtual_tokens"), options["prompt_length"]),
        "token_dim": (config.get("token_dim"), width),
        "r": (config.get("r"), options.get("rank")),
        "max_length": (config.get("max_length"), options.get("max_positions")),
    }
    wrong = [
        f"{key} {said} != {found} in the weights"
        for key, (said, found) in stated.items()
        if None not in (said, found) and said != found
    ]
    if wrong:
        raise InitFromError(f"method.init_from={folder}: {PEFT_CONFIG} contradicts its weights: {'; '.join(wrong)}")


# --- checking and loading -----------------------------------------------------------------------------------------
def check_init_from(cfg: DictConfig) -> None:
    """Before anything is built: a method with a prompt, one starting point, a readable source."""
    path = cfg.method.init_from
    if cfg.method.get("module") is None:
        raise InitFromError(f"method.init_from={path}: method={cfg.method.name} has no prompt to initialise")
    if not cfg.train and cfg.get("ckpt_path"):
        raise InitFromError(
            f"train=false with both ckpt_path={cfg.ckpt_path} and method.init_from={path}: give one (the checkpoint "
            "to evaluate as it was trained, or the prompt to evaluate in this config)"
        )
    if not cfg.get("ckpt_path"):  # a resumed run's checkpoint holds the weights: its source may be gone
        read_source(path)


def describe(state: dict[str, Tensor]) -> str:
    """The shape of a prompt module's tensors in the terms of its method (DePT: m, r, s)."""
    if set(state) == {"prompt", "lora_a", "lora_b"}:
        (s, r), (m, d) = state["lora_a"].shape, state["prompt"].shape
        return f"a DePT prompt of m={m}, r={r}, s={s} (d={d})"
    if set(state) == {"prompt"}:
        return f"a {state['prompt'].shape[0]}-token prompt (d={state['prompt'].shape[1]})"
    return ", ".join(f"{key} {tuple(value.shape)}" for key, value in sorted(state.items()))


def fix(cfg: DictConfig, source: PromptSource) -> str:
    """The overrides that build the source's shape."""
    state = source.state
    if set(state) == {"prompt", "lora_a", "lora_b"}:
        (s, r), m = state["lora_a"].shape, state["prompt"].shape[0]
        return (
            f"method.prompt_length={m} method.rank={r} dataset.max_length={m + s} (s = dataset.max_length - m with "
            f"method.max_positions=null, or method.max_positions={s} with dataset.max_length >= {m + s})"
        )
    wrong = [f"method.{key}={value}" for key, value in source.options.items() if cfg.method.get(key) != value]
    return " ".join(wrong) or "the source's method settings"


def check_width(source: PromptSource, width: int, cfg: DictConfig) -> None:
    """d of the prompt against the backbone's embeddings: refused naming both (and both models where known)."""
    if source.width is not None and source.width != width:
        trained = f" (trained on {source.model})" if source.model else ""
        raise InitFromError(
            f"method.init_from={source.path} holds prompt vectors of width {source.width}{trained}, but "
            f"model.name_or_path={cfg.model.name_or_path} embeds tokens in width {width}: use a backbone of width "
            f"{source.width}"
        )
    if source.model and source.model != cfg.model.name_or_path:
        log.warning(
            "method.init_from=%s was trained on %s; this run's backbone is %s (same width %d)",
            source.path,
            source.model,
            cfg.model.name_or_path,
            width,
        )


def shape_problems(expected: dict[str, Tensor], found: dict[str, Tensor]) -> list[str]:
    return [
        f"{key}: source {tuple(found[key].shape)}, this config {tuple(expected[key].shape)}"
        for key in sorted(expected)
        if key in found and found[key].shape != expected[key].shape
    ]


def initialise(module: PromptModule, cfg: DictConfig, width: int) -> PromptSource:
    """Load the source's weights into the freshly built module, strictly: every tensor, each of the same shape."""
    source = read_source(cfg.method.init_from)
    check_width(source, width, cfg)
    state = dict(source.state)
    module.upgrade_state_dict(state)  # a checkpoint or export of an earlier layout of the same weights
    expected = module.state_dict()
    trained = f"method={source.method}" if source.method else f"a {source.kind} folder"
    if set(state) != set(expected):
        raise InitFromError(
            f"method.init_from={source.path} ({trained}) holds {describe(state)}, tensors {sorted(state)}; "
            f"method={cfg.method.name} ({type(module).__name__}) needs {sorted(expected)}: initialise it from a "
            "prompt of its own kind"
        )
    problems = shape_problems(expected, state)
    if problems:
        raise InitFromError(
            f"method.init_from={source.path} ({trained}) holds {describe(state)}; this config builds "
            f"{describe(expected)} ({'; '.join(problems)}). The source decides the shape: drop the overrides that "
            f"contradict it, or set {fix(cfg, source)}"
        )
    module.load_state_dict(state, strict=True)
    log.info("method.init_from=%s: %s from %s", source.path, describe(state), trained)
    return source
