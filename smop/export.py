"""python -m smop.export ckpt_path=PATH [out_dir=PATH] [model_path=PATH]: a checkpoint as a portable folder.

The folder holds
  prompt.safetensors   the prompt module's weights (its state_dict)
  config.yaml          the resolved training config the checkpoint holds
  export.json          method, model, task and label words, max_new_tokens, prompt length, backbone fingerprint
  peft_prompt/         prompt tuning, P-tuning, FPT (+ LoRA): the prompt as a peft PromptTuningConfig adapter
  peft_lora/           the LoRA + X methods: the LoRA adapters as a peft LoraConfig adapter
                       (both with task_type SEQ_2_SEQ_LM on a T5, CAUSAL_LM on a decoder-only LM)
  model/               full fine-tuning: the whole fine-tuned model and tokenizer (transformers format)
Load it with smop.loading.load(folder), label files with python -m smop.predict, serve several tasks on one
backbone with smop.serving.PromptServer. docs/serving.md has the details.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import hydra
from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig, OmegaConf
from safetensors.torch import save_file
from torch import Tensor

from smop.backbones import TINY
from smop.loading import (
    CLI_DEFAULTS,
    CONFIG,
    FORMAT,
    FORMAT_VERSION,
    FULL_MODEL,
    MANIFEST,
    PEFT_LORA,
    PEFT_PREFIX,
    PEFT_PROMPT,
    PEFT_WEIGHTS,
    PROMPT_WEIGHTS,
    USER_ERRORS,
    LoadedModel,
    backbone_fingerprint,
    from_checkpoint,
    hydra_cli,
    read_checkpoint,
)
from smop.results import versions

log = logging.getLogger(__name__)
WRITTEN = (PROMPT_WEIGHTS, CONFIG, MANIFEST, PEFT_PROMPT, PEFT_LORA, FULL_MODEL)


def peft_base_name(config: dict[str, Any]) -> str | None:
    """The backbone's hub name or folder for peft's adapter_config.json (none for the seeded tiny models)."""
    name = config["model"]["name_or_path"]
    return None if name == TINY else name


def peft_task_type(loaded: LoadedModel) -> str:
    """peft's task type for this backbone: it picks the PeftModel class (and so where a prompt goes)."""
    from peft import TaskType

    return TaskType.CAUSAL_LM if loaded.system.kind.name == "causal" else TaskType.SEQ_2_SEQ_LM


def write_peft_prompt(folder: Path, table: Tensor, loaded: LoadedModel) -> None:
    """A folder `peft.PeftModel.from_pretrained(backbone, folder)` loads as prompt tuning with this prompt."""
    from peft import PromptTuningConfig

    backbone = loaded.system.backbone
    config = PromptTuningConfig(
        task_type=peft_task_type(loaded),
        num_virtual_tokens=table.shape[0],
        token_dim=table.shape[1],
        # The prompt goes before the (encoder) input only, as in training; peft's seq2seq default (2) holds a
        # second prompt for the decoder.
        num_transformer_submodules=1,
        num_layers=backbone.config.num_hidden_layers,  # T5Config and GPT2Config map these names to their own
        num_attention_heads=backbone.config.num_attention_heads,
        base_model_name_or_path=peft_base_name(loaded.config),
    )
    config.save_pretrained(str(folder))
    save_file({"prompt_embeddings": table.cpu().contiguous()}, str(folder / PEFT_WEIGHTS))


def write_peft_lora(folder: Path, loaded: LoadedModel) -> None:
    """The LoRA adapters injected in the backbone, as the folder PeftModel.save_pretrained would write."""
    from peft import get_peft_model_state_dict

    backbone = loaded.system.backbone
    config = dataclasses.replace(
        backbone.peft_config["default"],  # the exact config smop.methods.lora.add_lora injected
        task_type=peft_task_type(loaded),
        base_model_name_or_path=peft_base_name(loaded.config),
        inference_mode=True,
    )
    config.save_pretrained(str(folder))
    state = get_peft_model_state_dict(backbone)
    save_file({PEFT_PREFIX + key: value.cpu().contiguous() for key, value in state.items()}, str(folder / PEFT_WEIGHTS))


def prepare(out_dir: Path) -> None:
    """A new or empty folder, or an earlier export whose files are replaced; anything else is left alone."""
    if out_dir.exists() and not out_dir.is_dir():
        raise FileExistsError(f"out_dir={out_dir} is a file")
    if out_dir.is_dir() and any(out_dir.iterdir()) and not (out_dir / MANIFEST).is_file():
        raise FileExistsError(f"out_dir={out_dir} is not empty and holds no earlier export; choose another folder")
    for name in WRITTEN:  # no stale peft folder from an export of another method
        path = out_dir / name
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()
    out_dir.mkdir(parents=True, exist_ok=True)


def export_model(loaded: LoadedModel, out_dir: str | Path, source: dict[str, Any] | None = None) -> Path:
    """Write a loaded (or freshly trained, see `export_system`) model's export folder; returns the folder."""
    out_dir = Path(out_dir)
    prepare(out_dir)
    system, config = loaded.system, loaded.config
    method = config["method"]["name"]
    files: dict[str, str | None] = dict.fromkeys(("prompt", "peft_prompt", "peft_lora", "model"))
    files["config"] = CONFIG
    if system.prompt is not None:
        state = {key: value.detach().cpu().contiguous() for key, value in system.prompt.state_dict().items()}
        save_file(state, str(out_dir / PROMPT_WEIGHTS), metadata={"format": FORMAT, "method": method})
        files["prompt"] = PROMPT_WEIGHTS
        table = system.prompt.static_prompt()  # prompt tuning, P-tuning's MLP output; None: depends on the input
        if table is not None:
            (out_dir / PEFT_PROMPT).mkdir()
            write_peft_prompt(out_dir / PEFT_PROMPT, table, loaded)
            files["peft_prompt"] = PEFT_PROMPT
    if getattr(system.backbone, "peft_config", None):
        (out_dir / PEFT_LORA).mkdir()
        write_peft_lora(out_dir / PEFT_LORA, loaded)
        files["peft_lora"] = PEFT_LORA
    if system.train_backbone:  # full fine-tuning: the whole model is the trained artefact
        system.backbone.save_pretrained(str(out_dir / FULL_MODEL))
        loaded.datamodule.tokenizer.save_pretrained(str(out_dir / FULL_MODEL))
        files["model"] = FULL_MODEL
    OmegaConf.save(OmegaConf.create(config), out_dir / CONFIG)
    task = loaded.task
    manifest = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "method": method,
        "model": config["model"]["name_or_path"],
        "seed": config["seed"],
        "backbone_fingerprint": backbone_fingerprint(system.backbone),
        "task": dataclasses.asdict(task),
        "max_length": config["dataset"]["max_length"],
        "prompt_length": system.prompt.prompt_length if system.prompt is not None else 0,
        "max_new_tokens": system.max_new_tokens,
        "files": files,
        "source": source or {},
        "versions": versions(),
    }
    (out_dir / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
    return out_dir


def export_system(system: Any, datamodule: Any, out_dir: str | Path) -> Path:
    """Export an in-memory system (e.g. right after `trainer.fit`) without going through a checkpoint.

    For the tiny models the system must have been built after seeding with its config's seed, as train.py does."""
    loaded = LoadedModel(system, datamodule, dict(system.hparams), Path("."))
    return export_model(loaded, out_dir, {"in_memory": True})


def export(
    ckpt_path: str | Path, out_dir: str | Path | None = None, model_name_or_path: str | Path | None = None
) -> Path:
    """Export a train.py checkpoint; by default into a folder next to it, named after it."""
    ckpt_path = Path(ckpt_path)
    checkpoint = read_checkpoint(ckpt_path)
    loaded = from_checkpoint(checkpoint, ckpt_path, model_name_or_path, device="cpu")
    source = {
        "checkpoint": str(ckpt_path),
        "epoch": checkpoint.get("epoch"),
        "global_step": checkpoint.get("global_step"),
    }
    return export_model(loaded, out_dir if out_dir is not None else ckpt_path.with_suffix(""), source)


@dataclass
class ExportConfig:
    defaults: list[Any] = field(default_factory=lambda: list(CLI_DEFAULTS))
    ckpt_path: str = MISSING  # a checkpoint written by train.py (checkpoints/best-*.ckpt, last.ckpt)
    out_dir: str | None = None  # default: a folder next to the checkpoint, named after it
    model_path: str | None = None  # the backbone from another place (a local copy of the same weights)
    hydra: Any = field(default_factory=lambda: hydra_cli(__doc__))


ConfigStore.instance().store(name="smop_export", node=ExportConfig)


@hydra.main(version_base="1.3", config_path=None, config_name="smop_export")
def main(cfg: DictConfig) -> None:
    if OmegaConf.is_missing(cfg, "ckpt_path"):
        raise SystemExit("ckpt_path is required: python -m smop.export ckpt_path=outputs/runs/.../best-epoch003.ckpt")
    try:
        folder = export(cfg.ckpt_path, cfg.out_dir, cfg.model_path)
    except USER_ERRORS as err:  # a bad path or file: its message, without a traceback
        raise SystemExit(f"smop.export: {err}") from err
    manifest = json.loads((folder / MANIFEST).read_text(encoding="utf-8"))
    written = ", ".join(name for name in manifest["files"].values() if name)
    log.info(f"exported {manifest['method']} ({manifest['task']['name']}) to {folder}: {written}, {MANIFEST}")


if __name__ == "__main__":
    main()
