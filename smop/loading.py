"""Rebuilding a ready-to-use model from a training checkpoint or from an exported folder (smop.export).

Both hold only the trained weights and the resolved config. The frozen backbone is rebuilt from the config
(a hub name or a folder; the tiny models' random weights from the run's seed, exactly as `train=false ckpt_path=`
does), then the trained weights are loaded and checked against what the config builds.
"""

from __future__ import annotations

import copy
import hashlib
import json
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from omegaconf import OmegaConf
from safetensors.torch import load_file
from torch import Tensor, nn
from torch.nn.utils.rnn import pad_sequence

from smop.backbones import HubUnreachableError, build_tokenizer
from smop.backbones.decoding import Decoding
from smop.builders import build_datamodule, build_system
from smop.data import Task, TaskDataModule
from smop.data.datamodule import encode
from smop.methods import current_targets
from smop.metrics import to_label_index
from smop.module import PromptTuningSystem

FORMAT, FORMAT_VERSION = "smop-export", 1
MANIFEST, CONFIG, PROMPT_WEIGHTS = "export.json", "config.yaml", "prompt.safetensors"
PEFT_PROMPT, PEFT_LORA, FULL_MODEL = "peft_prompt", "peft_lora", "model"
PEFT_WEIGHTS = "adapter_model.safetensors"  # peft's file name for adapter weights
PEFT_PREFIX = "base_model.model."  # what a PeftModel puts before the backbone's own parameter names
CONFIG_KEYS = ("model", "method", "dataset", "seed")


class ExportError(ValueError):
    """A checkpoint or exported folder that cannot be used; the message names the file and what is wrong."""


@dataclass
class LoadedModel:
    """A trained system in eval mode, with the task and the tokenization it was trained with."""

    system: PromptTuningSystem
    datamodule: TaskDataModule  # not set up: only its task, tokenizer and truncation budget are used
    config: dict[str, Any]  # the resolved training config
    source: Path

    @property
    def task(self) -> Task:
        return self.datamodule.task

    @property
    def device(self) -> torch.device:
        return self.system.device

    def encode(self, examples: Sequence[dict[str, Any]]) -> list[list[int]]:
        """Token ids of raw examples, formatted and truncated exactly as in training."""
        return encode(
            self.task, self.datamodule.tokenizer, list(examples), self.datamodule.budget, self.datamodule.causal
        )

    def prompt_inputs(self, examples: Sequence[dict[str, Any]]) -> dict[str, Tensor]:
        """What the prompt module reads of these examples besides the backbone's ids (a separate encoder's own ids)."""
        features = self.datamodule.extra_features(list(examples))
        return dict(self.system.prompt_inputs({key: value.to(self.device) for key, value in features.items()}))

    @torch.no_grad()
    def generate(
        self,
        examples: Sequence[dict[str, Any]],
        decoding: Decoding | None = None,
        generator: torch.Generator | None = None,
    ) -> list[list[str]]:
        """Per example, its decoding.num_return_sequences generated texts (one, greedy, by default), each cut before
        the first stop string."""
        decoding = decoding or Decoding()
        input_ids, attention_mask = pad_inputs(self.encode(examples), self.datamodule.tokenizer.pad_token_id)
        inputs = (input_ids.to(self.device), attention_mask.to(self.device), self.prompt_inputs(examples))
        texts, _ = self.system.generate_texts(*inputs, decoding=decoding, generator=generator)
        n = decoding.num_return_sequences
        return [texts[i * n : (i + 1) * n] for i in range(len(examples))]

    def label(self, examples: Sequence[dict[str, Any]]) -> list[int]:
        """Label index per example (-1: the output was no label word), by the system's own greedy decoding."""
        texts = [outputs[0] for outputs in self.generate(examples)]
        return to_label_index(texts, self.task.label_words).tolist()


def pad_inputs(ids: Sequence[Sequence[int]], pad_token_id: int) -> tuple[Tensor, Tensor]:
    """Right padding to the longest row and its attention mask, as the DataModule's collate does."""
    rows = [torch.tensor(row, dtype=torch.long) for row in ids]
    lengths = torch.tensor([len(row) for row in rows])
    input_ids = pad_sequence(rows, batch_first=True, padding_value=pad_token_id)
    return input_ids, (torch.arange(input_ids.shape[1]) < lengths[:, None]).long()


def resolve_device(device: str | torch.device | None = "auto") -> torch.device:
    """`auto` (or None): the GPU when there is one, else the CPU."""
    if device is None or str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


@contextmanager
def seeded(seed: int) -> Iterator[None]:
    """Torch's CPU generator seeded as `train.py` seeds it before building the backbone; the caller's state is kept.

    The tiny models (T5, Llama, GPT-2) have random weights: the same seed rebuilds the backbone its prompt was trained
    on."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def backbone_fingerprint(backbone: nn.Module) -> str:
    """A short hash of the input embedding table: the same backbone, or a clear refusal instead of garbage outputs."""
    weight = backbone.get_input_embeddings().weight.detach().to("cpu", torch.float32).contiguous()
    return hashlib.sha256(weight.numpy().tobytes()).hexdigest()[:16]


def with_model(config: dict[str, Any], model_name_or_path: str | Path | None) -> dict[str, Any]:
    """The config with the backbone read from another place (a local copy of the same weights)."""
    config = copy.deepcopy(config)
    if model_name_or_path is not None:
        config["model"]["name_or_path"] = str(model_name_or_path)
    return config


def build_from_config(config: dict[str, Any]) -> tuple[PromptTuningSystem, TaskDataModule]:
    """The system `train.py` builds for this config (weights at init) and its data options; reads no data."""
    cfg = OmegaConf.create(config)
    tokenizer = build_tokenizer(cfg.model.name_or_path)
    datamodule = build_datamodule(cfg, tokenizer, setup=False)
    with seeded(cfg.seed):
        system = build_system(cfg, datamodule, tokenizer, init_from=False)  # its own weights follow
    return system, datamodule


def ready(
    system: PromptTuningSystem,
    datamodule: TaskDataModule,
    config: dict[str, Any],
    source: Path,
    device: str | torch.device | None,
) -> LoadedModel:
    system.to(resolve_device(device)).eval()
    system.requires_grad_(False)
    return LoadedModel(system, datamodule, config, source)


# --- checkpoints -----------------------------------------------------------------------------------------
def read_checkpoint(path: str | Path) -> dict[str, Any]:
    """A train.py checkpoint, loaded with weights_only=True; anything else is refused with the reason."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"No checkpoint at {path}")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # truncated zip, foreign pickle, ...: torch raises many types
        reason = str(err).strip().splitlines()[0] if str(err).strip() else ""
        raise ExportError(
            f"{path} is not a readable checkpoint ({type(err).__name__}: {reason}); it is corrupt, truncated, "
            "or was not written by train.py"
        ) from err
    if not isinstance(checkpoint, dict) or not isinstance(checkpoint.get("state_dict"), dict):
        raise ExportError(f"{path} is not a Lightning checkpoint: it holds no state_dict")
    config = checkpoint.get("hyper_parameters")
    missing = [key for key in CONFIG_KEYS if not isinstance(config, dict) or key not in config]
    if missing:
        raise ExportError(
            f"{path} holds no resolved train.py config in hyper_parameters (missing {missing}); "
            "only checkpoints written by train.py can be rebuilt"
        )
    checkpoint["hyper_parameters"] = current_targets(config)
    return checkpoint


def load_checkpoint(
    path: str | Path, model_name_or_path: str | Path | None = None, device: str | torch.device | None = "auto"
) -> LoadedModel:
    """Rebuild the system from a checkpoint's config and load its trained weights, refusing any mismatch."""
    return from_checkpoint(read_checkpoint(path), path, model_name_or_path, device)


def from_checkpoint(
    checkpoint: dict[str, Any],
    path: str | Path,
    model_name_or_path: str | Path | None = None,
    device: str | torch.device | None = "auto",
) -> LoadedModel:
    """`load_checkpoint` for a checkpoint already read with `read_checkpoint`."""
    config = with_model(checkpoint["hyper_parameters"], model_name_or_path)
    system, datamodule = build_from_config(config)
    try:  # the system's own check: other model, other method, missing, unknown or reshaped weights
        system.on_load_checkpoint({**checkpoint, "hyper_parameters": config})
    except ValueError as err:
        raise ExportError(f"{path}: {err}") from err
    system.load_state_dict(checkpoint["state_dict"], strict=False)
    return ready(system, datamodule, config, Path(path), device)


# --- exported folders ------------------------------------------------------------------------------------
def read_manifest(folder: str | Path) -> dict[str, Any]:
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"No exported prompt folder at {folder}")
    path = folder / MANIFEST
    if not path.is_file():
        raise ExportError(
            f"{folder} is not an exported prompt (no {MANIFEST}); write one with python -m smop.export ckpt_path=..."
        )
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise ExportError(f"{path} is not valid JSON ({err})") from err
    found = (manifest.get("format"), manifest.get("format_version")) if isinstance(manifest, dict) else None
    if found != (FORMAT, FORMAT_VERSION):
        raise ExportError(f"{path}: format {found} is not {(FORMAT, FORMAT_VERSION)}, the one this version reads")
    return manifest


def read_export(folder: str | Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """The manifest and the resolved training config of an exported folder."""
    manifest = read_manifest(folder)
    path = Path(folder) / CONFIG
    if not path.is_file():
        raise ExportError(f"{folder} lacks {CONFIG}, the training config the model is rebuilt from")
    config = current_targets(OmegaConf.to_container(OmegaConf.load(path), resolve=True))
    missing = [key for key in CONFIG_KEYS if not isinstance(config, dict) or key not in config]
    if missing:
        raise ExportError(f"{path} is not a train.py config (missing {missing})")
    return manifest, config


def read_weights(path: Path) -> dict[str, Tensor]:
    if not path.is_file():
        raise ExportError(f"Missing {path}")
    try:
        return load_file(path)
    except Exception as err:  # safetensors raises its own error type for a bad header or a short file
        raise ExportError(f"{path} is not a readable safetensors file ({type(err).__name__}: {err})") from err


def check_weights(expected: dict[str, Tensor], found: dict[str, Tensor], source: Path, what: str) -> None:
    """Same names and shapes as the module the config builds, or an error listing the differences."""
    problems = []
    if set(expected) - set(found):
        problems.append(f"missing {sorted(set(expected) - set(found))[:5]}")
    if set(found) - set(expected):
        problems.append(f"unknown {sorted(set(found) - set(expected))[:5]}")
    problems += [
        f"{key}: file shape {tuple(found[key].shape)} != {what} {tuple(expected[key].shape)}"
        for key in sorted(set(expected) & set(found))
        if found[key].shape != expected[key].shape
    ]
    if problems:
        raise ExportError(f"{source} does not match the {what} its config builds: " + "; ".join(problems))


def load_prompt_weights(prompt: nn.Module, path: Path) -> None:
    """The prompt module's whole state from prompt.safetensors, names and shapes checked first."""
    state = read_weights(path)
    prompt.upgrade_state_dict(state)  # an export of an earlier layout of the same weights
    check_weights(prompt.state_dict(), state, path, "prompt module")
    # not strict: the names were checked just above, and a frozen encoder of the module's own (IDPG/LoPA with
    # method.encoder=<model>) is rebuilt from its name, so it is in neither the state dict nor the file
    prompt.load_state_dict(state, strict=False)


def load_lora_weights(backbone: nn.Module, folder: Path) -> None:
    """LoRA adapters from a peft folder into a backbone with injected adapters, through peft's own loader."""
    from peft import get_peft_model_state_dict, set_peft_model_state_dict

    path = folder / PEFT_WEIGHTS
    state = {key.removeprefix(PEFT_PREFIX): value for key, value in read_weights(path).items()}
    check_weights(get_peft_model_state_dict(backbone), state, path, "LoRA adapters")
    set_peft_model_state_dict(backbone, state)


def check_backbone(backbone: nn.Module, manifest: dict[str, Any], folder: Path) -> None:
    expected, found = manifest.get("backbone_fingerprint"), backbone_fingerprint(backbone)
    if expected != found:
        raise ExportError(
            f"{folder}: the backbone rebuilt from model={manifest.get('model')!r} is not the one this prompt was "
            f"trained with (embedding fingerprint {found} != {expected}). Point model_path at the same weights; "
            f"a tiny model's random weights come from the seed ({manifest.get('seed')})."
        )


def load_export(
    folder: str | Path,
    model_name_or_path: str | Path | None = None,
    device: str | torch.device | None = "auto",
    verify_backbone: bool = True,
) -> LoadedModel:
    """Rebuild the system from an exported folder: its config, prompt weights, LoRA adapters or whole model."""
    folder = Path(folder)
    manifest, config = read_export(folder)
    files = manifest.get("files", {})
    if files.get("model"):  # full fine-tuning: the folder holds the whole model
        model_name_or_path = folder / files["model"]
    config = with_model(config, model_name_or_path)
    system, datamodule = build_from_config(config)
    if verify_backbone:
        check_backbone(system.backbone, manifest, folder)
    if system.prompt is not None:
        load_prompt_weights(system.prompt, folder / files.get("prompt", PROMPT_WEIGHTS))
    if files.get("peft_lora"):
        load_lora_weights(system.backbone, folder / files["peft_lora"])
    return ready(system, datamodule, config, folder, device)


def load(
    path: str | Path, model_name_or_path: str | Path | None = None, device: str | torch.device | None = "auto"
) -> LoadedModel:
    """An exported folder or a train.py checkpoint, ready to predict."""
    path = Path(path)
    if path.is_dir():
        return load_export(path, model_name_or_path, device)
    if path.is_file():
        return load_checkpoint(path, model_name_or_path, device)
    raise FileNotFoundError(f"No exported folder or checkpoint at {path}")


def hydra_cli(doc: str) -> dict[str, Any]:
    """Hydra settings for the small CLIs (export, predict): no output folder, logs to the terminal, `--help` = doc."""
    return {
        "run": {"dir": "."},
        "output_subdir": None,
        "job": {"chdir": False},
        "help": {"template": doc.strip() + "\n\n== Config ==\n$CONFIG\n"},
    }


CLI_DEFAULTS: list[Any] = ["_self_", {"override hydra/job_logging": "stdout"}]
# What the CLIs report as one line instead of a traceback: bad paths, files, inputs, an unreachable hub.
USER_ERRORS = (ValueError, FileNotFoundError, FileExistsError, HubUnreachableError)
