"""FPT (Huang et al., 2022): train the prompt on a partial backbone that grows, in stages, back to the full model.

A partial model reuses the backbone's own modules. Layer dropping swaps a stack's block ModuleList for a
ModuleList of the kept blocks (the same objects, no copy), numbered as a smaller model's; FFN reduction swaps an
FFN's projections for smaller frozen copies of its top-scored neurons. The originals are kept and put back, so the
full model is bit-for-bit what it was. The prompt module is never touched: its Parameters, and with them the
optimizer state, carry across stages. `ARCHITECTURES` says where each supported model family keeps its blocks and
FFN projections: T5 (encoder and decoder stacks) and decoder-only LMs (one decoder stack).

Works with any prompt method (`callbacks=fpt`); `method=fpt` is prompt tuning with the reference's recipe.
"""

from __future__ import annotations

import logging
import math
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.trainer.states import TrainerFn
from torch import Tensor, nn
from torch.utils.data import DataLoader, Subset
from transformers.pytorch_utils import Conv1D

from smop.backbones import kind_of
from smop.backbones.causal import position_ids
from smop.costs import eager_attention, inference_flops, train_step_flops

log = logging.getLogger(__name__)

STACKS = ("encoder", "decoder")
REDUCTIONS = ("layers", "ffn", "both")
VALIDATE_ON = ("full", "partial")
SCORE_SPLITS = ("val", "train")


# --- where a model family keeps its blocks and FFNs ----------------------------------------------------


def _t5_ffn(block: nn.Module) -> nn.Module:
    """T5's feed-forward sublayer, the last of a block."""
    return block.layer[-1].DenseReluDense


def _mlp(block: nn.Module) -> nn.Module:
    return block.mlp


@dataclass(frozen=True)
class Architecture:
    """Where a model family keeps what FPT reduces.

    stacks: stack name -> the backbone's submodule that holds the block list (the first stack is the default).
    blocks: that submodule's attribute holding the block ModuleList.
    ffn: a block's FFN module.
    inputs: the FFN projections whose output features are the neurons (the ones a module has: T5's wi, or wi_0/wi_1).
    output: the projection that reads the neurons (its input features); the score is |its input|.
    fused: output chunks stacked in each input projection, e.g. Phi-3's gate_up_proj = [gate ; up]: 2.
    narrow_config: the stack's config counts the layers the forward runs and the KV cache holds (decoder-only
        LMs): a partial model sets it (num_hidden_layers, layer_types) to the kept layers, the way a smaller model's
        config would read.
    """

    stacks: dict[str, str]
    blocks: str
    ffn: Callable[[nn.Module], nn.Module]
    inputs: tuple[str, ...]
    output: str
    fused: int = 1
    narrow_config: bool = True


T5 = Architecture(
    {"encoder": "encoder", "decoder": "decoder"}, "block", _t5_ffn, ("wi", "wi_0", "wi_1"), "wo", narrow_config=False
)
GATED = Architecture({"decoder": "model"}, "layers", _mlp, ("gate_proj", "up_proj"), "down_proj")  # act(gate) * up
ARCHITECTURES = {  # by config.model_type
    "t5": T5,
    "mt5": T5,
    "llama": GATED,
    "mistral": GATED,
    "qwen2": GATED,
    "qwen3": GATED,
    "phi3": Architecture({"decoder": "model"}, "layers", _mlp, ("gate_up_proj",), "down_proj", fused=2),
    "phi": Architecture({"decoder": "model"}, "layers", _mlp, ("fc1",), "fc2"),
    "gpt2": Architecture({"decoder": "transformer"}, "h", _mlp, ("c_fc",), "c_proj"),  # Conv1D: weight [in, out]
    "codegen": Architecture({"decoder": "transformer"}, "h", _mlp, ("fc_in",), "fc_out"),
}


def architecture(model_type: str) -> Architecture:
    """The description of `model_type`, or an error naming the supported ones."""
    if model_type not in ARCHITECTURES:
        supported = ", ".join(ARCHITECTURES)
        raise ValueError(f"FPT does not support model_type={model_type}: it reduces the layers and FFNs of {supported}")
    return ARCHITECTURES[model_type]


# --- what a partial model keeps ----------------------------------------------------------------------


def kept_layers(num_layers: int, fraction: float) -> list[int]:
    """The n = round(fraction * num_layers) blocks the reference keeps (its `evenly_select_layers`): block 0 (in T5
    it holds the relative position bias the other blocks reuse), then n - 1 gaps of q = (N - n) // (n - 1) + 1 and
    q + 1 blocks, the short gaps first, which ends on block N - 1 (it feeds the final layer norm). The same rule for
    a decoder-only stack. 6 of 24: [0, 4, 8, 13, 18, 23]; 4 of 8: [0, 2, 4, 7]."""
    n = min(num_layers, max(min(2, num_layers), round(fraction * num_layers)))
    if n == 1:
        return [0]
    gaps, dropped = n - 1, num_layers - n
    short, long_gaps = dropped // gaps + 1, dropped % gaps
    kept = [0]
    for i in range(gaps):
        kept.append(kept[-1] + (short if i < gaps - long_gaps else short + 1))
    return kept


def kept_neurons(scores: Tensor, fraction: float) -> Tensor:
    """The round(fraction * d_ff) FFN neurons with the highest scores, in their original order."""
    k = min(len(scores), max(1, round(fraction * len(scores))))
    return scores.topk(k).indices.sort().values


@dataclass(frozen=True)
class Shape:
    """A stage's model: the share of blocks kept in each reduced stack and of neurons kept in each FFN."""

    layers: float = 1.0
    ffn: float = 1.0

    @property
    def full(self) -> bool:
        return self.layers >= 1.0 and self.ffn >= 1.0


FULL = Shape()


def sample_means(activations: Tensor, mask: Tensor) -> Tensor:
    """[B, d_ff] float64: each sample's mean |activation| over its own tokens (`mask` [B, n] is 1 on them).

    The reference scores one sample at a time, so a short sample weighs as much as a long one; one mean over
    all the tokens of a batch would weigh samples by their length instead."""
    totals = (activations.abs() * mask.to(activations.dtype).unsqueeze(-1)).sum(1).double()
    return totals / mask.sum(1, keepdim=True).clamp(min=1).double()


def _in_features(projection: nn.Module) -> int:
    """nn.Linear's weight is [out, in]; transformers' Conv1D (GPT-2) stores it transposed, [in, out]."""
    return projection.weight.shape[0 if isinstance(projection, Conv1D) else 1]


def _sliced(projection: nn.Module, index: Tensor, features: str) -> nn.Module:
    """A frozen copy of an FFN projection (nn.Linear or Conv1D) that keeps its output (features="out") or input
    (features="in") features `index`."""
    if type(projection) not in (nn.Linear, Conv1D):
        raise TypeError(
            f"FFN reduction slices plain nn.Linear or Conv1D FFN weights, got {type(projection).__name__} (LoRA on "
            "an FFN projection?); use callbacks.fpt.reduce=layers"
        )
    if projection.weight.requires_grad:
        raise ValueError("FFN reduction slices frozen FFN weights only (method=full trains them): use reduce=layers")
    conv = isinstance(projection, Conv1D)
    dim = (1 if conv else 0) if features == "out" else (0 if conv else 1)
    weight = projection.weight.detach().index_select(dim, index.to(projection.weight.device))
    with torch.device("meta"):
        out = Conv1D(weight.shape[1], weight.shape[0]) if conv else nn.Linear(weight.shape[1], weight.shape[0])
    out.weight = nn.Parameter(weight, requires_grad=False)
    bias = projection.bias
    if bias is None:
        out.bias = None
    else:
        kept = bias.detach().index_select(0, index.to(bias.device)) if features == "out" else bias.detach().clone()
        out.bias = nn.Parameter(kept, requires_grad=False)
    return out


def _layer_indices(block: nn.Module) -> list[tuple[nn.Module, int]]:
    """The modules of a block that carry a `layer_idx` (the KV cache slot they write), with its value."""
    return [(m, m.layer_idx) for m in block.modules() if isinstance(getattr(m, "layer_idx", None), int)]


class PartialModel:
    """Switches a backbone between its full size and partial shapes; keeps the original modules to put back exactly.

    The kept blocks are renumbered 0..n-1 (every `layer_idx` in them), and a decoder-only stack's config counts n
    layers with their own `layer_types`, as a smaller model of the same class would: the KV cache is then built for
    the kept layers and per-layer attention masks (sliding windows) follow the kept layers' own types.
    """

    def __init__(self, backbone: nn.Module, stacks: Sequence[str] | None = None) -> None:
        self.arch = architecture(backbone.config.model_type)
        stacks = list(stacks or list(self.arch.stacks)[:1])
        if set(stacks) - set(self.arch.stacks):
            raise ValueError(
                f"callbacks.fpt.stacks={stacks}: a {backbone.config.model_type} backbone has the stacks "
                f"{', '.join(self.arch.stacks)}"
            )
        self.stacks = {name: backbone.get_submodule(self.arch.stacks[name]) for name in stacks}
        self.blocks = {name: getattr(stack, self.arch.blocks) for name, stack in self.stacks.items()}  # the originals
        self.projections = {  # the original FFN projections, per stack and block
            name: [self._projections(self.arch.ffn(b)) for b in blocks] for name, blocks in self.blocks.items()
        }
        self.layer_idx = {name: [_layer_indices(b) for b in blocks] for name, blocks in self.blocks.items()}
        self.configs = {name: self._config_counts(stack) for name, stack in self.stacks.items()}
        self.scores: dict[str, Tensor] = {}  # per stack: [num_blocks, d_ff] neuron scores (ffn_scores)
        self.shape = FULL
        self._slices: dict[tuple[str, int], dict[str, nn.Module]] = {}  # FFN copies for _slices_fraction
        self._slices_fraction: float | None = None

    def _projections(self, ffn: nn.Module) -> dict[str, nn.Module]:
        names = [a for a in self.arch.inputs if hasattr(ffn, a)] + [self.arch.output]
        return {a: getattr(ffn, a) for a in names}

    def _config_counts(self, stack: nn.Module) -> dict[str, Any]:
        """The config entries a partial model narrows: the layer count and, when the config has them, layer_types."""
        if not self.arch.narrow_config:
            return {}
        config = stack.config
        counts: dict[str, Any] = {"num_hidden_layers": config.num_hidden_layers}
        if isinstance(getattr(config, "layer_types", None), list):
            counts["layer_types"] = config.layer_types
        return counts

    def apply(self, shape: Shape) -> None:
        """Put `shape` in force (a no-op when it already is); FULL restores the original model."""
        if shape == self.shape:
            return
        self.restore()
        if shape.full:
            return
        if shape.ffn < 1.0 and self._slices_fraction != shape.ffn:
            self._slices, self._slices_fraction = {}, shape.ffn  # one stage's copies at a time
        for name, stack in self.stacks.items():
            blocks = self.blocks[name]
            keep = kept_layers(len(blocks), shape.layers)
            if shape.ffn < 1.0:
                for i in keep:
                    for attr, projection in self._ffn_slices(name, i, shape.ffn).items():
                        setattr(self.arch.ffn(blocks[i]), attr, projection)
            if len(keep) < len(blocks):
                self._drop_layers(name, stack, keep)
        self.shape = shape

    def _drop_layers(self, name: str, stack: nn.Module, keep: list[int]) -> None:
        setattr(stack, self.arch.blocks, nn.ModuleList([self.blocks[name][i] for i in keep]))
        for new, i in enumerate(keep):
            for module, _ in self.layer_idx[name][i]:
                module.layer_idx = new
        counts = self.configs[name]
        if counts:
            stack.config.num_hidden_layers = len(keep)
        if "layer_types" in counts:
            stack.config.layer_types = [counts["layer_types"][i] for i in keep]

    def restore(self) -> None:
        """The full model: the original block lists, layer indices, config counts and FFN projections."""
        for name, stack in self.stacks.items():
            setattr(stack, self.arch.blocks, self.blocks[name])
            for modules in self.layer_idx[name]:
                for module, index in modules:
                    module.layer_idx = index
            for key, value in self.configs[name].items():
                setattr(stack.config, key, value)
            for block, projections in zip(self.blocks[name], self.projections[name], strict=True):
                for attr, projection in projections.items():
                    setattr(self.arch.ffn(block), attr, projection)
        self.shape = FULL

    def release(self) -> None:
        """Restore and free the FFN copies (at the end of training)."""
        self.restore()
        self._slices, self._slices_fraction = {}, None

    def _ffn_slices(self, stack: str, index: int, fraction: float) -> dict[str, nn.Module]:
        if (stack, index) not in self._slices:
            if stack not in self.scores:
                raise RuntimeError(f"FFN reduction of the {stack} needs neuron scores first (ffn_scores)")
            keep = kept_neurons(self.scores[stack][index], fraction)
            projections, output = self.projections[stack][index], self.arch.output
            d_ff = _in_features(projections[output])
            rows = torch.cat([keep + chunk * d_ff for chunk in range(self.arch.fused)])  # [gate ; up] fused: both
            sliced = {a: _sliced(p, rows, "out") for a, p in projections.items() if a != output}
            sliced[output] = _sliced(projections[output], keep, "in")
            self._slices[(stack, index)] = sliced
        return self._slices[(stack, index)]

    def describe(self, shape: Shape) -> str:
        """e.g. "encoder 6/24 layers x 704/2816 ffn": what `shape` keeps of each reduced stack."""
        parts = []
        for name, blocks in self.blocks.items():
            d_ff = _in_features(self.projections[name][0][self.arch.output])
            k = min(d_ff, max(1, round(shape.ffn * d_ff))) if shape.ffn < 1.0 else d_ff
            parts.append(f"{name} {len(kept_layers(len(blocks), shape.layers))}/{len(blocks)} layers x {k}/{d_ff} ffn")
        return ", ".join(parts)

    @torch.no_grad()
    def ffn_scores(self, system: nn.Module, batches: Sequence[dict[str, Tensor]]) -> dict[str, Tensor]:
        """Score every FFN neuron of the full model: the mean over samples of each sample's mean |input of the output
        projection| over its non-pad tokens (`sample_means`, as the reference), i.e. of |act(wi x)|, or
        |act(wi_0 x) * (wi_1 x)| for gated FFNs (Llama's act(gate x) * (up x)). Each stack sees what training feeds
        it (`_scoring_inputs`)."""
        self.restore()
        sums: dict[str, Tensor] = {}  # per stack: [num_blocks, d_ff] sums over samples of their mean |activation|
        for name, per_block in self.projections.items():
            output = per_block[0][self.arch.output]
            sums[name] = torch.zeros(
                len(per_block), _in_features(output), dtype=torch.float64, device=output.weight.device
            )
        samples = dict.fromkeys(self.blocks, 0)
        masks: dict[str, Tensor] = {}

        def hook(stack: str, index: int) -> Callable[[nn.Module, tuple[Tensor, ...]], None]:
            def accumulate(module: nn.Module, args: tuple[Tensor, ...]) -> None:
                sums[stack][index] += sample_means(args[0], masks[stack]).sum(0)

            return accumulate

        handles = [
            projections[self.arch.output].register_forward_pre_hook(hook(name, i))
            for name, per_block in self.projections.items()
            for i, projections in enumerate(per_block)
        ]
        was_training = system.training
        system.eval()
        try:
            for batch in batches:
                inputs, batch_masks = _scoring_inputs(system, batch)
                masks.update(batch_masks)
                system.backbone(**inputs, use_cache=False)
                for name in samples:
                    samples[name] += int((masks[name].sum(1) > 0).sum())  # a sample without tokens adds 0
        finally:
            for handle in handles:
                handle.remove()
            system.train(was_training)
        self.scores = {name: (sums[name] / max(1, samples[name])).float().cpu() for name in sums}
        self._slices, self._slices_fraction = {}, None
        return self.scores


def _scoring_inputs(system: nn.Module, batch: dict[str, Tensor]) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """The backbone's training inputs for `batch`, and per stack the mask of the tokens it sees there.

    A T5's encoder sees [prompt ; input] when `system` has `encoder_inputs` (the prompt's positions counted), its
    decoder the teacher-forced label tokens; a decoder-only stack sees the whole teacher-forced sequence, [padding ;
    prompt ; source ; target], as training builds it (smop.backbones.causal)."""
    backbone, labels = system.backbone, batch["labels"]
    if hasattr(system, "encoder_inputs"):
        embeds, mask, _ = system.encoder_inputs(
            batch["input_ids"], batch["attention_mask"], system.prompt_inputs(batch)
        )
    else:
        embeds, mask = backbone.get_input_embeddings()(batch["input_ids"]), batch["attention_mask"]
    if backbone.config.is_encoder_decoder:
        inputs = {"inputs_embeds": embeds, "attention_mask": mask, "labels": labels}
        return inputs, {"encoder": mask, "decoder": labels != -100}
    sequence, sequence_mask = kind_of(backbone).teacher_forced(backbone, embeds, mask, labels)
    inputs = {"inputs_embeds": sequence, "attention_mask": sequence_mask, "position_ids": position_ids(sequence_mask)}
    return inputs, {"decoder": sequence_mask}


# --- the schedule, as a callback ---------------------------------------------------------------------


class ProgressiveTraining(Callback):
    """FPT's schedule: partial stages of fixed step counts, then the full model for the rest of the run.

    Args:
        reduce: "layers" (evenly spaced blocks), "ffn" (top-scored FFN neurons) or "both".
        fractions: share of layers / FFN neurons kept in each partial stage (the paper: 0.25, 0.5, 0.75).
        stage_steps: optimizer steps per partial stage, one number for all or one per stage; None: stage_share.
        stage_share: when stage_steps is None, each partial stage gets this share of the run's steps
            (the paper: 6k of 30k).
        stacks: which stacks are reduced; None: the backbone's first (a T5's encoder, as the reference, which could
            reduce the decoder too; a decoder-only LM's decoder, its only stack).
        score_split: the split whose examples score the FFN neurons (once, full model, before training): "val"
            (the reference) or "train".
        score_samples: how many of its examples, drawn without replacement (the reference: 1,000 shuffled ones);
            all of them when the split is smaller.
        score_seed: seeds that draw, with a generator of its own (the run's random stream is left alone).
        validate_on: "full" validates (so picks the best checkpoint and early-stops) on the full model even during
            partial stages; "partial" validates on the model being trained, as the reference logged it (then
            val/score of partial epochs reaches model_checkpoint and early_stopping too).
        count_flops: count inference and training-step FLOPs per example of every stage, before training.
        flop_batches: training batches the FLOPs are averaged over.
        gradient_clip_val: clip the gradient norm at this value every step (the reference's --max-norm 1.0), applied
            to the Trainer when `trainer.gradient_clip_val` is null, which wins when set; None: no clipping.
    """

    def __init__(
        self,
        reduce: str = "both",
        fractions: Sequence[float] = (0.25, 0.5, 0.75),
        stage_steps: int | Sequence[int] | None = None,
        stage_share: float = 0.2,
        stacks: Sequence[str] | None = None,
        score_split: str = "val",
        score_samples: int = 1000,
        score_seed: int = 0,
        validate_on: str = "full",
        count_flops: bool = True,
        flop_batches: int = 2,
        gradient_clip_val: float | None = 1.0,
    ) -> None:
        fractions = [float(f) for f in fractions]
        problems = []
        if reduce not in REDUCTIONS:
            problems.append(f"reduce={reduce} is not one of: {', '.join(REDUCTIONS)}")
        if not fractions or not all(0.0 < f <= 1.0 for f in fractions):
            problems.append(f"fractions={fractions} must be shares in (0, 1]")
        if stacks is not None and (not stacks or set(stacks) - set(STACKS)):
            problems.append(f"stacks={list(stacks)} must be a non-empty subset of: {', '.join(STACKS)}")
        if validate_on not in VALIDATE_ON:
            problems.append(f"validate_on={validate_on} is not one of: {', '.join(VALIDATE_ON)}")
        if score_split not in SCORE_SPLITS:
            problems.append(f"score_split={score_split} is not one of: {', '.join(SCORE_SPLITS)}")
        if score_samples < 1:
            problems.append(f"score_samples={score_samples} must be >= 1")
        if gradient_clip_val is not None and gradient_clip_val < 0:
            problems.append(f"gradient_clip_val={gradient_clip_val} must be >= 0 (or null: no clipping)")
        if isinstance(stage_steps, Sequence) and len(stage_steps) != len(fractions):
            problems.append(f"stage_steps={list(stage_steps)} needs one entry per fraction ({len(fractions)})")
        if stage_steps is None and not 0.0 <= stage_share * len(fractions) <= 1.0:
            problems.append(f"stage_share={stage_share} x {len(fractions)} stages must lie in [0, 1]")
        if problems:
            raise ValueError("callbacks.fpt: " + "; ".join(problems))
        layers, ffn = reduce in ("layers", "both"), reduce in ("ffn", "both")
        self.shapes = [Shape(f if layers else 1.0, f if ffn else 1.0) for f in fractions] + [FULL]
        self.stage_steps, self.stage_share = stage_steps, stage_share
        self.stacks, self.validate_on = tuple(stacks) if stacks is not None else None, validate_on
        self.score_split, self.score_samples, self.score_seed = score_split, score_samples, score_seed
        self.gradient_clip_val = gradient_clip_val
        self.count_flops, self.flop_batches = count_flops, flop_batches
        self.partial: PartialModel | None = None
        self.ends: list[int] = []  # the global step at which each partial stage ends
        self.stage = len(self.shapes) - 1  # the stage training is in (the last one: full model)
        self.steps = [0] * len(self.shapes)  # optimizer steps, examples and seconds trained in each stage
        self.examples = [0] * len(self.shapes)
        self.seconds = [0.0] * len(self.shapes)
        self.scored = 0  # examples the FFN scores were computed on (a full-model forward each)
        self.inference_flops: list[float] = []  # per example, per stage
        self.train_flops: list[float] = []
        self._step_before, self._time_before = 0, 0.0
        self._scores: dict[str, Tensor] = {}  # from a checkpoint being resumed
        self._resumed: dict[str, Any] | None = None

    # --- plan ------------------------------------------------------------------------------------
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if self.partial is None:
            self.partial = PartialModel(pl_module.backbone, self.stacks)
            self.partial.scores = self._scores
        # here, not in the configs: a method config cannot set trainer keys (trainer/default merges after it)
        if stage == TrainerFn.FITTING and self.gradient_clip_val is not None and trainer.gradient_clip_val is None:
            trainer.gradient_clip_val = self.gradient_clip_val  # read at every step; Lightning's default: by norm
            log.info("FPT: gradients clipped at norm %g (callbacks.fpt.gradient_clip_val)", self.gradient_clip_val)

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Stage boundaries in optimizer steps; early stopping held off until the full model is back."""
        partial_stages = len(self.shapes) - 1
        if self.stage_steps is None:
            total = trainer.estimated_stepping_batches
            if not math.isfinite(total):
                raise ValueError("callbacks.fpt.stage_steps is needed when the run's length is unknown")
            steps = [round(self.stage_share * total)] * partial_stages
        elif isinstance(self.stage_steps, int):
            steps = [self.stage_steps] * partial_stages
        else:
            steps = [int(s) for s in self.stage_steps]
        self.ends = [sum(steps[: i + 1]) for i in range(partial_stages)]
        if self.ends and self.ends[-1] > 0:  # early stopping may not end the run before the full model is back
            trainer.fit_loop.epoch_loop.min_steps = max(trainer.fit_loop.epoch_loop.min_steps or 0, self.ends[-1])

    def stage_at(self, step: int) -> int:
        """The stage that trains optimizer step `step` (0-based): the first partial stage not yet over."""
        return next((i for i, end in enumerate(self.ends) if step < end), len(self.shapes) - 1)

    # --- before training: neuron scores and FLOPs on the full model ---------------------------------
    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._resumed is not None:
            self.steps, self.examples = list(self._resumed["steps"]), list(self._resumed["examples"])
            self.seconds, self.scored = list(self._resumed["seconds"]), self._resumed["scored"]
        devices = [pl_module.device] if pl_module.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):  # the run's random stream must not change (shuffle, noise)
            if any(shape.ffn < 1.0 for shape in self.shapes) and not self.partial.scores:
                batches = self._score_batches(trainer, pl_module)
                self.partial.ffn_scores(pl_module, batches)
                self.scored = sum(b["input_ids"].shape[0] for b in batches)
                log.info("FPT: FFN neurons scored on %d %s examples", self.scored, self.score_split)
            if self.count_flops:
                self._count(trainer, pl_module)

    def _loader(self, trainer: L.Trainer, split: str) -> DataLoader:
        if trainer.datamodule is None:
            raise RuntimeError("FPT reads batches from the datamodule; fit with datamodule=...")
        return trainer.datamodule.val_dataloader() if split == "val" else trainer.datamodule.train_dataloader()

    def _score_batches(self, trainer: L.Trainer, pl_module: L.LightningModule) -> list[dict[str, Tensor]]:
        """`score_samples` examples of `score_split` drawn by `score_seed` alone, so every rank scores the same ones
        (the same partial model everywhere). Batched: per-sample means do not depend on the batching."""
        loader = self._loader(trainer, self.score_split)
        size = len(loader.dataset)
        if size == 0:
            raise ValueError(f"callbacks.fpt.score_split={self.score_split} is empty: use score_split=train")
        if size < self.score_samples:
            log.warning(
                "FPT: the %s split has %d examples, fewer than callbacks.fpt.score_samples=%d: scoring on all",
                self.score_split,
                size,
                self.score_samples,
            )
        generator = torch.Generator().manual_seed(self.score_seed)  # an iterator draws its base seed from it too
        subset = Subset(loader.dataset, torch.randperm(size, generator=generator)[: self.score_samples].tolist())
        sampled = DataLoader(subset, batch_size=loader.batch_size, collate_fn=loader.collate_fn, generator=generator)
        return [pl_module.transfer_batch_to_device(batch, pl_module.device, 0) for batch in sampled]

    def _train_batches(self, trainer: L.Trainer, pl_module: L.LightningModule, batches: int) -> list[dict[str, Tensor]]:
        """The first `batches` training batches in file order (for FLOPs: every method and seed counted on the same
        inputs, as FlopCounter)."""
        loader = self._loader(trainer, "train")
        loader = DataLoader(
            loader.dataset, batch_size=loader.batch_size, collate_fn=loader.collate_fn, generator=torch.Generator()
        )
        out = []
        for batch in loader:
            out.append(pl_module.transfer_batch_to_device(batch, pl_module.device, 0))
            if len(out) >= batches:
                break
        return out

    def _count(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        batches = self._train_batches(trainer, pl_module, self.flop_batches)
        self.inference_flops, self.train_flops = [], []
        try:
            for shape in self.shapes:
                self.partial.apply(shape)
                with eager_attention(pl_module):
                    self.inference_flops.append(statistics.mean(inference_flops(pl_module, b) for b in batches))
                    self.train_flops.append(statistics.mean(train_step_flops(pl_module, b) for b in batches))
        finally:
            self.partial.restore()
        for shape, inference, train in zip(self.shapes, self.inference_flops, self.train_flops, strict=True):
            log.info(
                "FPT %s: %.4g inference / %.4g train FLOPs per example", self.partial.describe(shape), inference, train
            )

    # --- during training: the stage for the current step -------------------------------------------
    def _sync(self, trainer: L.Trainer) -> None:
        stage = self.stage_at(trainer.global_step)
        if self.stage < stage == len(self.shapes) - 1:
            # the full model is back: patience restarts, and a stop asked for during the partial stages is dropped
            for callback in trainer.early_stopping_callbacks:
                callback.wait_count = 0
            trainer.should_stop = False
        if stage != self.stage:
            log.info(
                "FPT stage %d/%d from step %d: %s",
                stage + 1,
                len(self.shapes),
                trainer.global_step,
                self.partial.describe(self.shapes[stage]),
            )
            for logger in trainer.loggers:
                logger.log_metrics({"fpt/stage": stage}, step=trainer.global_step)
        self.stage = stage
        self.partial.apply(self.shapes[stage])

    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        self._sync(trainer)
        self._step_before, self._time_before = trainer.global_step, _clock(pl_module.device)

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        self.seconds[self.stage] += _clock(pl_module.device) - self._time_before
        self.examples[self.stage] += batch["input_ids"].shape[0]
        self.steps[self.stage] += trainer.global_step - self._step_before
        self._sync(trainer)  # so that a validation right after a stage's last step sees the next stage

    # --- outside training steps: the full model ------------------------------------------------------
    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.validate_on == "full" or trainer.state.fn != TrainerFn.FITTING:
            self.partial.restore()  # the next training batch puts the stage back

    def on_test_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.partial.restore()

    def on_predict_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.partial.restore()

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]) -> None:
        """Checkpoints hold the full model's keys (a partial one renumbers blocks): retake the state dict."""
        if not self.partial.shape.full:
            self.partial.restore()
            checkpoint["state_dict"] = trainer.strategy.lightning_module_state_dict()

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.partial.release()
        self.stage = len(self.shapes) - 1
        for logger in trainer.loggers:
            logger.log_metrics({f"cost/{k}": v for k, v in self.cost().items() if isinstance(v, float)})

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        if self.partial is not None:
            self.partial.release()

    # --- resuming: scores and counts travel in the checkpoint ------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        scores = self.partial.scores if self.partial is not None else {}
        counts = {"steps": self.steps, "examples": self.examples, "seconds": self.seconds, "scored": self.scored}
        return {"scores": {k: v.cpu() for k, v in scores.items()}, **counts}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Scores always; the step counts only when training resumes (on_train_start), not when validate/test
        load the best checkpoint after fit."""
        self._scores, self._resumed = dict(state_dict["scores"]), state_dict
        if self.partial is not None:
            self.partial.scores = self._scores

    # --- results.json -------------------------------------------------------------------------------
    def cost(self) -> dict[str, Any]:
        """FLOPs per example of each stage, and the run's training FLOPs (neuron scoring included) against the same
        examples all trained on the full model (plain prompt tuning)."""
        if not self.train_flops:
            return {}
        figures: dict[str, Any] = {
            "fpt_stages": [self.partial.describe(shape) for shape in self.shapes],
            "fpt_stage_steps": list(self.steps),
            "fpt_stage_time_s": list(self.seconds),
            "fpt_stage_inference_flops": list(self.inference_flops),
            "fpt_stage_train_flops": list(self.train_flops),
        }
        if sum(self.examples):
            scoring = self.scored * self.inference_flops[-1]
            total = scoring + sum(n * flops for n, flops in zip(self.examples, self.train_flops, strict=True))
            full = sum(self.examples) * self.train_flops[-1]
            figures.update(
                fpt_score_flops=float(scoring),
                fpt_train_flops_total=float(total),
                fpt_train_flops_full=float(full),
                fpt_train_flops_vs_full=total / full,
            )
        return figures


def _clock(device: torch.device) -> float:
    """Wall time after the device's queued work (CUDA runs asynchronously)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()
