"""One frozen backbone serving several tasks' prompts in one mixed batch: the reason prompt tuning exists.

Each row of a batch names its task. The input embeddings of the whole batch are computed once; each task's
prompt module runs once, on its own rows (a loop over tasks, never over rows); prompts of different lengths
are left-padded with attention-mask zeros into one [B, W, d] block before the inputs; then one greedy
generation serves every row, so a row's outputs equal those of its task alone (tests/test_serving.py checks it):
  seq2seq (T5): one encoder pass and one `generate`. T5 attends by relative position only, so shifting a row's
    real tokens right by the padding changes nothing it computes.
  causal (decoder-only LMs): the backbone kind's own `generate` (smop.backbones.causal), which moves each row's
    padding, its prompt's and its input's, to the front: the row's prompt sits immediately before its first real
    token and the position ids count real positions only, as in training.

    server = PromptServer({"rte": "exports/rte", "cb": "exports/cb"})
    server.predict([("rte", {"premise": ..., "hypothesis": ...}), ("cb", {...})])
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from omegaconf import OmegaConf
from torch import Tensor, nn
from transformers.modeling_outputs import BaseModelOutput

from smop.backbones import build_backbone, build_tokenizer, freeze, kind_of
from smop.builders import build_datamodule, build_prompt
from smop.data import Task
from smop.data.datamodule import encode
from smop.loading import (
    PROMPT_WEIGHTS,
    ExportError,
    check_backbone,
    load_prompt_weights,
    pad_inputs,
    read_export,
    resolve_device,
    seeded,
    with_model,
)
from smop.methods.base import NO_INPUTS
from smop.metrics import read_outputs


@dataclass
class TaskSpec:
    """What serving one task needs besides its prompt module: its format, truncation and label words."""

    task: Task
    budget: int  # max input tokens (dataset.max_length - prompt length, - target length on causal), as in training
    max_new_tokens: int
    source: Path
    causal: bool  # a decoder-only backbone: the source is encoded without EOS, as in training
    # what a batch of records carries besides the backbone's ids (a separate encoder's padded ids), by field name
    extra_features: Callable[[list[dict[str, Any]]], dict[str, Tensor]]


@dataclass
class MixedBatch:
    input_ids: Tensor  # [B, n], right-padded
    attention_mask: Tensor  # [B, n]
    tasks: list[str]  # the task of each row
    inputs: dict[str, dict[str, Tensor]] = field(default_factory=dict)  # per task, its rows' extra fields (if any)


@dataclass
class Generation:
    # per row, cut at its task's max_new_tokens: generated ids, the decoder start included (seq2seq), or the new
    # tokens only (causal)
    sequences: list[Tensor]
    encoder_states: Tensor | None  # [B, W + n, d] the encoder's last hidden states (seq2seq); None on causal
    attention_mask: Tensor  # [B, W + n] zeros on each row's prompt padding and input padding
    prompt_width: int  # W, the longest prompt in the batch


class PromptServer(nn.Module):
    """ONE frozen backbone and the prompt modules of several tasks, loaded from exported folders."""

    def __init__(
        self,
        exports: Mapping[str, str | Path] | Sequence[str | Path],
        model_name_or_path: str | Path | None = None,
        device: str | torch.device | None = "auto",
    ) -> None:
        super().__init__()
        named = self._names(exports)
        loaded = {name: read_export(folder) for name, folder in named.items()}
        first = with_model(next(iter(loaded.values()))[1], model_name_or_path)
        self.tokenizer = build_tokenizer(first["model"]["name_or_path"])
        with seeded(first["seed"]):  # the tiny models' random weights come from the seed
            self.backbone = freeze(build_backbone(first["model"]["name_or_path"], first["model"].get("tiny")))
        self.kind = kind_of(self.backbone)  # seq2seq or causal: where the prompted input goes, how it generates
        self.prompts = nn.ModuleDict()
        self.specs: dict[str, TaskSpec] = {}
        for name, (manifest, config) in loaded.items():
            folder = Path(named[name])
            self._check_servable(folder, manifest, config)
            check_backbone(self.backbone, manifest, folder)  # every prompt was trained on this very backbone
            cfg = OmegaConf.create(with_model(config, model_name_or_path))
            prompt = build_prompt(cfg, self.backbone, self.tokenizer)
            load_prompt_weights(prompt, folder / manifest["files"].get("prompt", PROMPT_WEIGHTS))
            self.prompts[name] = prompt
            datamodule = build_datamodule(cfg, self.tokenizer, setup=False)
            self.specs[name] = TaskSpec(
                datamodule.task,
                datamodule.budget,
                datamodule.max_target_length,
                folder,
                datamodule.causal,
                datamodule.extra_features,
            )
        self.requires_grad_(False)
        self.to(resolve_device(device)).eval()

    @staticmethod
    def _names(exports: Mapping[str, str | Path] | Sequence[str | Path]) -> dict[str, Path]:
        """Task names as given, or each export's task name (then two exports of one task need explicit names)."""
        if isinstance(exports, Mapping):
            named = {str(name): Path(folder) for name, folder in exports.items()}
        else:
            named = {}
            for folder in exports:
                name = read_export(folder)[0]["task"]["name"]
                if name in named:
                    raise ValueError(f"Two exports of task '{name}' ({named[name]}, {folder}): name them with a dict")
                named[name] = Path(folder)
        if not named:
            raise ValueError("PromptServer needs at least one exported folder")
        for name in named:
            if not name.isidentifier():
                raise ValueError(f"Task name {name!r} must be a Python identifier (e.g. rte, cb_v2)")
        return named

    @staticmethod
    def _check_servable(folder: Path, manifest: dict[str, Any], config: dict[str, Any]) -> None:
        files = manifest.get("files", {})
        if files.get("model") or files.get("peft_lora"):
            raise ExportError(
                f"{folder}: method '{manifest['method']}' changes the backbone itself (full fine-tuning or LoRA), so "
                "it cannot share one frozen backbone with other tasks; serve it alone with smop.loading.load"
            )
        if (config.get("router") or {}).get("emulate_reference_batch_sum"):
            raise ExportError(
                f"{folder}: router.emulate_reference_batch_sum makes each row's prompt depend on the other rows of "
                "the batch; such a prompt cannot be served in a mixed batch"
            )

    @property
    def device(self) -> torch.device:
        return next(self.backbone.parameters()).device

    @property
    def tasks(self) -> list[str]:
        return list(self.specs)

    def _rows_of(self, tasks: Sequence[str]) -> dict[str, Tensor]:
        """Row indices of each task present in the batch, in first-seen order."""
        unknown = sorted(set(tasks) - set(self.specs))
        if unknown:
            raise ValueError(f"Unknown task(s) {unknown}; this server holds {self.tasks}")
        rows: dict[str, list[int]] = {}
        for row, name in enumerate(tasks):
            rows.setdefault(name, []).append(row)
        return {name: torch.tensor(index, device=self.device) for name, index in rows.items()}

    def batch(self, rows: Sequence[tuple[str, dict[str, Any]]]) -> MixedBatch:
        """Tokenize (task, record) rows, each with its own task's template and truncation, into one padded batch."""
        tasks = [name for name, _ in rows]
        ids: list[list[int]] = [[] for _ in rows]
        inputs: dict[str, dict[str, Tensor]] = {}
        for name, index in self._rows_of(tasks).items():
            spec = self.specs[name]
            examples = [rows[i][1] for i in index.tolist()]
            encoded = encode(spec.task, self.tokenizer, examples, spec.budget, spec.causal)
            for i, row_ids in zip(index.tolist(), encoded, strict=True):
                ids[i] = row_ids
            extra = spec.extra_features(examples)  # e.g. its own encoder's ids: one padded block per task
            inputs[name] = {key: value.to(self.device) for key, value in extra.items()}
        input_ids, attention_mask = pad_inputs(ids, self.tokenizer.pad_token_id)
        return MixedBatch(input_ids.to(self.device), attention_mask.to(self.device), tasks, inputs)

    def encoder_inputs(self, batch: MixedBatch) -> tuple[Tensor, Tensor, int]:
        """[left-padded prompt ; input embeddings] and its mask: each prompt module called once on its rows."""
        embeds = self.backbone.get_input_embeddings()(batch.input_ids)
        inputs = embeds.clone()
        prompts: dict[str, tuple[Tensor, Tensor]] = {}
        for name, index in self._rows_of(batch.tasks).items():
            out = self.prompts[name](embeds[index], batch.attention_mask[index], batch.inputs.get(name, NO_INPUTS))
            if out.input_embeds is not None:  # e.g. DePT's position-wise update of the input embeddings
                inputs[index] = out.input_embeds
            prompts[name] = (index, out.prompt)
        width = max(prompt.shape[1] for _, prompt in prompts.values())
        size = (len(batch.tasks), width)
        block, mask = embeds.new_zeros(*size, embeds.shape[-1]), batch.attention_mask.new_zeros(size)
        for index, prompt in prompts.values():  # right-aligned: the padding goes before each row's prompt
            block[index, width - prompt.shape[1] :] = prompt
            mask[index, width - prompt.shape[1] :] = 1
        return torch.cat([block, inputs], dim=1), torch.cat([mask, batch.attention_mask], dim=1), width

    @torch.no_grad()
    def generate(self, batch: MixedBatch) -> Generation:
        """One greedy generation for the whole batch: seq2seq, one encoder pass and one generate call; causal, the
        backbone kind's generate, which places each row's prompt right before its first real token."""
        embeds, mask, width = self.encoder_inputs(batch)
        limits = [self.specs[name].max_new_tokens for name in batch.tasks]
        if self.kind.name == "causal":
            new = self.kind.generate(self.backbone, embeds, mask, max(limits), self.tokenizer)
            # A row's task may allow fewer new tokens than the batch's longest: cut it where its task alone would stop.
            return Generation([seq[:limit] for seq, limit in zip(new, limits, strict=True)], None, mask, width)
        states = self.backbone.get_encoder()(inputs_embeds=embeds, attention_mask=mask).last_hidden_state
        sequences = self.backbone.generate(
            encoder_outputs=BaseModelOutput(last_hidden_state=states),
            attention_mask=mask,
            do_sample=False,
            num_beams=1,
            max_new_tokens=max(limits),
        )
        # A row's task may allow fewer new tokens than the batch's longest: cut it where its task alone would stop.
        return Generation([seq[: 1 + limit] for seq, limit in zip(sequences, limits, strict=True)], states, mask, width)

    def predict(self, rows: Sequence[tuple[str, dict[str, Any]]]) -> list[dict[str, Any]]:
        """Per row: its task and what its output says: the label word (None when the output was none) and its index
        (-1 then), the number (STS-B) or the answer (QA, summaries); and the output text."""
        batch = self.batch(rows)
        generation = self.generate(batch)
        results: list[dict[str, Any]] = [{} for _ in rows]
        for name, index in self._rows_of(batch.tasks).items():
            sequences = [generation.sequences[i].tolist() for i in index.tolist()]
            texts = self.tokenizer.batch_decode(sequences, skip_special_tokens=True)
            fields, _ = read_outputs(self.specs[name].task, texts)
            for j, i in enumerate(index.tolist()):
                results[i] = {"task": name, **{key: values[j] for key, values in fields.items()}, "output": texts[j]}
        return results
