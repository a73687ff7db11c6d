"""What each prompt method costs per training step, on one frozen backbone and the same batches.

`python -m smop.benchmark benchmark.model=t5-base benchmark.precision=bf16` measures, in one process,
for every variant of `benchmark.variants`: the median time of a training step (forward + backward +
optimizer step, after warm-up, no evaluation), the peak memory of those steps, the inference FLOPs per
example (fvcore, eager attention, next to an analytic count) and the trainable parameters. Our methods run
their real `PromptTuningSystem.forward`; the peers are the `peft` library's prompt tuning and a bare PyTorch
loop. The backbone is a seq2seq T5 or, with `benchmark.kind=causal`, a decoder-only Llama, always with random
weights. Inputs have the bundled samples' real lengths and fixed lengths. Results go to benchmark.md and
benchmark.json in the Hydra output directory. docs/benchmarks.md explains every column.
"""

from __future__ import annotations

import contextlib
import copy
import gc
import itertools
import json
import logging
import math
import os
import platform
import statistics
import time
import warnings
import weakref
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import hydra
import torch
import torch.nn.functional as F
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from rich.console import Console
from rich.table import Table
from torch import Tensor, nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves
from torch.utils.data import DataLoader
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from smop.backbones import CAUSAL, DTYPES, SEQ2SEQ, TINY, build_backbone, build_tokenizer, freeze, kind_of
from smop.backbones.causal import IGNORE, left_aligned, take
from smop.backbones.precision import cast_weights
from smop.backbones.scoring import candidate_ids
from smop.builders import build_datamodule, build_prompt
from smop.checks import CONFIG_DIR, method_routes
from smop.costs import eager_attention, inference_flops, step_model_flops, sync
from smop.data.tasks import Task
from smop.fast_path import check_backend
from smop.hardware import device_peak, hardware, mfu
from smop.methods import PromptModule
from smop.methods.lora import has_lora, remove_lora
from smop.module import PromptTuningSystem
from smop.results import versions

Batch = dict[str, Tensor]
MIB = 2**20


# --- backbone ---------------------------------------------------------------------------------------
def twin_on_same_weights(model: PreTrainedModel) -> PreTrainedModel:
    """A second model object (for peft to wrap) whose parameters and buffers use the storage of `model`'s: no
    second copy in memory, so peft and our methods are measured on identical weights."""
    with torch.device("meta"):
        twin = type(model)(copy.deepcopy(model.config))
    twin.load_state_dict(model.state_dict(), assign=True)
    for name, buffer in model.named_buffers():  # non-persistent ones (Llama's rotary inv_freq) are not in the state
        owner, _, leaf = name.rpartition(".")
        if twin.get_buffer(name).is_meta:
            twin.get_submodule(owner)._buffers[leaf] = buffer
    return twin.eval()


# --- data: the same batches for every variant --------------------------------------------------------
@dataclass
class Setting:
    """One input-length regime: the batches every variant trains on, already on the device."""

    name: str
    kind: str  # "real" (a task's rows with dynamic padding) or "fixed" (every input exactly this long)
    batches: list[Batch]

    def describe(self) -> dict[str, float]:
        masks = [b["attention_mask"] for b in self.batches]
        return {
            "input_tokens_mean": statistics.mean(float(m.sum(1).float().mean()) for m in masks),
            "padded_length_mean": statistics.mean(float(m.shape[1]) for m in masks),
            "label_length_mean": statistics.mean(float(b["labels"].shape[1]) for b in self.batches),
        }


@dataclass
class TaskRows:
    """A task's training rows as token ids, with the datamodule's own collate (dynamic padding)."""

    task: Task
    rows: list[dict[str, Any]]
    collate: Callable[[list[dict[str, Any]]], Batch]
    pad_id: int
    source: str  # where the rows came from (sample, dir, hub, synthetic)
    lengths: str  # how the lengths were obtained, for the report


def estimated_length(num_bytes: int, bytes_per_token: float) -> int:
    """Subword tokens of a text of `num_bytes` bytes, plus EOS (SentencePiece averages ~4 bytes a token)."""
    return max(1, math.ceil(num_bytes / bytes_per_token)) + 1


def task_rows(
    bench: DictConfig,
    task: str,
    tokenizer: PreTrainedTokenizerBase,
    estimate: bool,
    budget: int,
    vocab_high: int,
    architecture: dict[str, Any],
) -> TaskRows:
    """Rows of the task read through TaskDataModule (`benchmark.source`, sample by default), as training
    encodes them for this architecture's kind (a causal LM's source has no EOS; its target counts in `budget`).

    With a real tokenizer the ids are real, truncated to `budget` as in training. Without one
    (`estimate`: t5-base/large, llama-base offline) the text is read as bytes and each input gets random ids of its
    estimated subword length, so lengths stay realistic though the ids are not.
    """
    dataset = OmegaConf.load(CONFIG_DIR / "dataset" / f"{task}.yaml")
    model = {"name_or_path": TINY, "tiny": architecture}  # build_datamodule reads the kind from it
    root = OmegaConf.create({"seed": bench.seed, "dataset": dataset, "method": {"prompt_length": 0}, "model": model})
    if root.dataset.source != "synthetic":  # the synthetic task is generated, not read
        root.dataset.source = bench.source
    if bench.data_dir:
        root.dataset.data_dir = str(bench.data_dir).format(task=task)
    root.dataset.max_length = 10**7 if estimate else budget  # bytes are estimated and cut below
    OmegaConf.resolve(root)
    datamodule = build_datamodule(root, tokenizer)
    rows = datamodule.splits["train"]
    pad_id = tokenizer.pad_token_id
    if not estimate:
        return TaskRows(
            datamodule.task,
            rows,
            datamodule.collate,
            pad_id,
            root.dataset.source,
            f"real ids ({type(tokenizer).__name__})",
        )
    generator = torch.Generator().manual_seed(bench.seed)
    eos, causal = tokenizer.eos_token_id, datamodule.causal
    label_ids = [
        torch.randint(
            3, vocab_high, (estimated_length(len(w.encode()), bench.bytes_per_token) - 1,), generator=generator
        ).tolist()
        + [eos]
        for w in datamodule.task.label_words
    ]
    estimated = []
    cap = budget - (max(len(ids) for ids in label_ids) if causal else 0)  # a causal target shares the budget
    for row in rows:
        byte_count = len(row["input_ids"]) - (0 if causal else 1)  # ByT5's bytes, its EOS not (causal: none)
        words = estimated_length(byte_count, bench.bytes_per_token) - 1  # subword tokens before the EOS
        keep = min(words, cap) if causal else min(words + 1, cap) - 1
        ids = torch.randint(3, vocab_high, (keep,), generator=generator).tolist() + ([] if causal else [eos])
        estimated.append({**row, "input_ids": ids, "labels": label_ids[row["label_index"]]})
    note = f"estimated: random ids, length = ceil(bytes / {bench.bytes_per_token})" + ("" if causal else " + EOS")
    return TaskRows(datamodule.task, estimated, datamodule.collate, pad_id, root.dataset.source, note)


def real_batches(rows: TaskRows, batch_size: int, count: int, seed: int) -> list[Batch]:
    """`count` full batches in a seeded shuffled order, epoch after epoch, dynamically padded."""
    generator = torch.Generator().manual_seed(seed)
    batches: list[Batch] = []
    while len(batches) < count:
        loader = DataLoader(
            rows.rows, batch_size=batch_size, shuffle=True, drop_last=True, collate_fn=rows.collate, generator=generator
        )
        before = len(batches)
        batches += list(itertools.islice(loader, count - len(batches)))
        if len(batches) == before:
            raise ValueError(
                f"benchmark.batch_size={batch_size} is larger than the {len(rows.rows)} training rows "
                f"of {rows.task.name}; lower it or give more data (benchmark.source=dir)"
            )
    return batches


def fixed_batches(like: list[Batch], length: int, vocab_high: int, eos: int | None, seed: int) -> list[Batch]:
    """Inputs of exactly `length` tokens (random ids ending in EOS, none for a causal source; no padding), the
    labels of `like`."""
    generator = torch.Generator().manual_seed(seed)
    batches = []
    for batch in like:
        rows = batch["input_ids"].shape[0]
        ids = torch.randint(3, vocab_high, (rows, length), generator=generator)
        if eos is not None:
            ids[:, -1] = eos
        batches.append({**batch, "input_ids": ids, "attention_mask": torch.ones_like(ids)})
    return batches


def to_device(batch: Batch, device: torch.device) -> Batch:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


# --- memory on CPU ----------------------------------------------------------------------------------
class LiveTensorBytes(TorchDispatchMode):
    """Peak bytes of tensor storages created under this mode and alive at the same time.

    The CPU stand-in for `torch.cuda.max_memory_allocated` (which has no CPU counterpart; a process's peak
    RSS mixes every variant and the allocator's caching). Every op output whose storage is not one of the
    op's inputs (so not a view or an in-place result) is a new allocation; it is counted until its storage
    is freed. Kernel-internal scratch buffers are not seen. Storages that existed before (weights,
    optimizer state) are the caller's to add.
    """

    def __init__(self) -> None:
        super().__init__()
        self.live = 0
        self.peak = 0
        self._sizes: dict[int, int] = {}

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        inputs = {t.untyped_storage().data_ptr() for t in tree_leaves((args, kwargs)) if isinstance(t, Tensor)}
        for tensor in tree_leaves(out):
            if isinstance(tensor, Tensor):
                self._track(tensor.untyped_storage(), inputs)
        return out

    def _track(self, storage: torch.UntypedStorage, inputs: set[int]) -> None:
        key, size = storage.data_ptr(), storage.nbytes()
        if size == 0 or key in inputs or key in self._sizes:
            return
        self._sizes[key] = size
        self.live += size
        self.peak = max(self.peak, self.live)
        weakref.finalize(storage, self._free, key)  # storages keep their Python object until freed

    def _free(self, key: int) -> None:
        self.live -= self._sizes.pop(key, 0)


def resident_bytes(modules: list[nn.Module], optimizer: torch.optim.Optimizer | None) -> int:
    """Bytes of the distinct storages of every parameter, gradient and optimizer state tensor."""
    tensors = [p for m in modules for p in m.parameters()] + [
        p.grad for m in modules for p in m.parameters() if p.grad is not None
    ]
    if optimizer is not None:
        tensors += [v for state in optimizer.state.values() for v in state.values() if isinstance(v, Tensor)]
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors}
    return sum(storages.values())


# --- variants ---------------------------------------------------------------------------------------
def timed_steps(
    step: Callable[[Batch], None], batches: list[Batch], warmup: int, device: torch.device
) -> tuple[list[float], list[float]]:
    """Wall time and process CPU time of each step after the first `warmup`, synchronised with the device.

    CPU time does not count the moments other jobs hold the cores, so on a shared CPU with one torch thread it
    measures the work itself; on CUDA it is host time only and is not reported.
    """
    wall, cpu = [], []
    for i, batch in enumerate(batches):
        sync(device)
        start, start_cpu = time.perf_counter(), time.process_time()
        step(batch)
        sync(device)
        if i >= warmup:
            wall.append(time.perf_counter() - start)
            cpu.append(time.process_time() - start_cpu)
    return wall, cpu


@dataclass
class Runner:
    """One variant ready to train. `step` = forward + backward + optimizer step + zero_grad on one batch."""

    step: Callable[[Batch], None]
    trainable: int
    modules: list[nn.Module]  # everything whose weights it holds (for the CPU memory figure)
    optimizer: torch.optim.Optimizer | None
    system: PromptTuningSystem | None = None  # set for our methods: FLOPs are counted through it
    prompt_length: int = 0
    run: Callable[[list[Batch], int], list[float]] | None = None  # its own timed loop (Lightning)
    close: Callable[[], None] = field(default=lambda: None)


def load_method(name: str) -> DictConfig:
    """smop/configs/method/<name>.yaml merged over the methods it extends (lora_smop: smop); other defaults
    (the router, the optimizer, callbacks) are the variant's and the benchmark's to choose."""
    method = OmegaConf.load(CONFIG_DIR / "method" / f"{name}.yaml")
    bases = [
        entry
        for entry in method.pop("defaults", [])
        if isinstance(entry, str) and entry != "_self_" and "/" not in entry
    ]
    return OmegaConf.merge(*(load_method(base) for base in bases), method)


def method_config(spec: DictConfig, optimizer: str) -> DictConfig:
    """The project's own method / router / optimizer configs, with the variant's `set` overrides applied."""
    method = load_method(spec.method)
    router = OmegaConf.load(CONFIG_DIR / "router" / f"{spec.router}.yaml") if spec.get("router") else None
    root = OmegaConf.create(
        {
            "method": method,
            "router": router,
            "optimizer": OmegaConf.load(CONFIG_DIR / "optimizer" / f"{optimizer}.yaml"),
        }
    )
    overrides = spec.get("set")  # resolved here: it may refer to benchmark.* options
    root.method = OmegaConf.merge(root.method, OmegaConf.to_container(overrides, resolve=True) if overrides else {})
    OmegaConf.resolve(root)
    routes = method_routes(root)
    if routes != (router is not None):
        raise ValueError(
            f"variant with method={spec.method}: "
            + ("it routes and needs a `router`" if routes else "it does not route; remove its `router`")
        )
    return root


def build_ours(
    root: DictConfig,
    backbone: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    task: Task,
    device: torch.device,
    autocast: Callable[[], Any],
    train_dropout: bool,
    compile_options: dict[str, Any] | None = None,
) -> Runner:
    """Our PromptTuningSystem, exactly as train.py builds it, driven by a plain loop (see docs). `compile_options`:
    the training step's backbone call compiled as model.compile does (the warm-up steps absorb the compilation)."""
    full = bool(root.method.train_backbone)
    snapshot = {k: v.detach().to("cpu", copy=True) for k, v in backbone.state_dict().items()} if full else None
    if full:
        backbone.requires_grad_(True)  # full fine-tuning trains the shared backbone; restored on close
    lora = OmegaConf.to_container(root.method.lora) if root.method.get("lora") else None
    system = PromptTuningSystem(
        backbone,
        tokenizer,
        task,
        build_prompt(root, backbone, tokenizer),
        optimizer=instantiate(root.optimizer),
        train_backbone=full,
        train_dropout=train_dropout,
        lora=lora,
        compile_options=compile_options,
    ).to(device)
    system.train()
    optimizer = system.optimizer_factory(system.param_groups())  # the method's groups (DePT, LoRA: two lrs)

    def step(batch: Batch) -> None:
        with autocast():
            loss, _, _ = system(batch["input_ids"], batch["attention_mask"], batch["labels"], loss_fn=system.step_loss)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    def close() -> None:
        if snapshot is not None:
            backbone.load_state_dict(snapshot)
            freeze(backbone)
        if lora:
            remove_lora(backbone)  # the next variant gets the bare shared backbone back

    trainable = sum(p.numel() for p in system.parameters() if p.requires_grad)
    return Runner(step, trainable, [system], optimizer, system, root.method.get("prompt_length", 0), close=close)


def build_lightning(
    root: DictConfig,
    backbone: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    task: Task,
    device: torch.device,
    precision: str,
    train_dropout: bool,
) -> Runner:
    """The same system trained by Lightning's Trainer, timed by the project's TrainingCost callback:
    what a real run's `cost.step_time_s_median` measures, hooks and logging included."""
    import lightning as L

    from smop.costs import TrainingCost

    system = PromptTuningSystem(
        backbone,
        tokenizer,
        task,
        build_prompt(root, backbone, tokenizer),
        optimizer=instantiate(root.optimizer),
        train_dropout=train_dropout,
    )

    def run(batches: list[Batch], warmup: int) -> list[float]:
        cost = TrainingCost()
        trainer = L.Trainer(
            accelerator="gpu" if device.type == "cuda" else "cpu",
            devices=1,
            precision="bf16-mixed" if precision == "bf16" else "32-true",
            max_epochs=1,
            limit_train_batches=len(batches),
            limit_val_batches=0,
            num_sanity_val_steps=0,
            logger=False,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            callbacks=[cost],
        )
        trainer.fit(system, train_dataloaders=DataLoader(batches, batch_size=None))
        return cost.step_times[warmup:]

    trainable = sum(p.numel() for p in system.parameters() if p.requires_grad)
    return Runner(lambda batch: None, trainable, [system], None, None, root.method.prompt_length, run=run)


def causal_sequence(batch: Batch, pad_id: int) -> Batch:
    """A batch (right-padded source ids, -100-padded target) as one causal LM row per example, for peft:
    [padding ; source ; target] ids (left-padded), labels -100 but on the real target tokens. peft prepends its
    virtual tokens to the whole row, so with left padding its sequence [P ; padding ; source ; target] has the
    length and the padding of ours ([padding ; P ; source ; target]); right padding would put the padding
    between its prompt and the target."""
    target = batch["labels"].ne(IGNORE)
    mask = torch.cat([batch["attention_mask"], target.to(batch["attention_mask"].dtype)], dim=1)
    ids = torch.cat([batch["input_ids"], batch["labels"].masked_fill(~target, pad_id)], dim=1)
    labels = torch.cat([torch.full_like(batch["input_ids"], IGNORE), batch["labels"]], dim=1)
    order = left_aligned(mask)
    return {"input_ids": take(ids, order), "attention_mask": take(mask, order), "labels": take(labels, order)}


def build_peft(
    root: DictConfig,
    backbone: PreTrainedModel,
    device: torch.device,
    autocast: Callable[[], Any],
    train_mode: bool,
    pad_id: int,
) -> Runner:
    """The peer: peft's prompt tuning on a twin backbone holding the same weights, allocating exactly L rows
    (seq2seq: before the encoder input; causal: before the whole row, see `causal_sequence`)."""
    from peft import PromptTuningConfig, TaskType, get_peft_model

    length = int(root.method.prompt_length)
    causal = kind_of(backbone).name == CAUSAL
    task_type = TaskType.CAUSAL_LM if causal else TaskType.SEQ_2_SEQ_LM
    config = PromptTuningConfig(task_type=task_type, num_virtual_tokens=length, num_transformer_submodules=1)
    model = get_peft_model(twin_on_same_weights(backbone), config).to(device)
    model.train(train_mode)  # the frozen backbone's dropout as in the other variants (benchmark.train_dropout)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = instantiate(root.optimizer)(params)

    def step(batch: Batch) -> None:
        inputs = causal_sequence(batch, pad_id) if causal else batch  # a few integer gathers: the collate's work
        with autocast():
            loss = model(
                input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"], labels=inputs["labels"]
            ).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return Runner(step, sum(p.numel() for p in params), [model], optimizer, prompt_length=length)


def build_bare(
    root: DictConfig,
    backbone: PreTrainedModel,
    device: torch.device,
    autocast: Callable[[], Any],
    train_dropout: bool,
) -> Runner:
    """The floor: a plain nn.Parameter prompt concatenated to the embedding output, then the backbone kind's own
    loss (seq2seq: the backbone with labels; causal: CausalKind's [padding ; P ; E[x] ; E[y]] row), no system or
    prompt module class."""
    length = int(root.method.prompt_length)
    embed = backbone.get_input_embeddings()
    prompt = nn.Parameter(torch.randn(length, embed.embedding_dim, device=device))
    optimizer = instantiate(root.optimizer)([prompt])
    kind = kind_of(backbone)
    backbone.train(train_dropout)  # shared with the other variants, which may have left it in another mode

    def step(batch: Batch) -> None:
        ids, mask = batch["input_ids"], batch["attention_mask"]
        with autocast():
            x = embed(ids)
            x = torch.cat([prompt.to(x.dtype).expand(ids.shape[0], -1, -1), x], dim=1)
            mask = torch.cat([mask.new_ones(ids.shape[0], length), mask], dim=1)
            loss, _ = kind.loss(backbone, x, mask, batch["labels"])
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    holder = nn.ParameterList([prompt])
    return Runner(step, prompt.numel(), [backbone, holder], optimizer, prompt_length=length)


# --- FLOPs ------------------------------------------------------------------------------------------
def prompt_module_flops(prompt: PromptModule | None, rows: int, input_length: int) -> float | None:
    """Multiply-adds per example of the prompt module itself, its own `analytic_flops` (None: no formula, e.g. IDPG
    and LoPA, which run a whole encoder pass); 0 without a module (full fine-tuning)."""
    return 0.0 if prompt is None else prompt.analytic_flops(rows, input_length)


def count_flops(runner: Runner, batches: list[Batch], rows: int) -> dict[str, float]:
    """fvcore and analytic inference FLOPs per example, averaged over `batches` cut to `rows` rows
    (their padded width kept, so the per-example figure is the full batch's)."""
    system = runner.system
    assert system is not None
    measured, analytic = [], []
    with eager_attention(system):
        for batch in batches:
            part = {k: v[:rows] for k, v in batch.items()}
            measured.append(inference_flops(system, part))
            count, length = part["input_ids"].shape
            module = prompt_module_flops(system.prompt, count, length)
            width, target = runner.prompt_length + length, part["labels"].shape[1]
            backbone = system.kind.analytic_flops(system.backbone.config, width, target)
            if None not in (module, backbone) and not has_lora(system.backbone):  # no formula for LoRA's adapters
                analytic.append(backbone + module)
    return {
        "inference_flops_per_example": statistics.mean(measured),
        "analytic_flops_per_example": statistics.mean(analytic) if analytic else None,
    }


# --- one measurement --------------------------------------------------------------------------------
RUNNERS = ("ours", "lightning", "peft", "bare")


def check_variant(name: str, spec: DictConfig, precision: str) -> None:
    """A variant's runner and fast-path options, refused by name before any variant is measured (not halfway through
    the device time)."""
    if spec.runner not in RUNNERS:
        raise ValueError(f"variant {name}: runner={spec.runner}; allowed: {', '.join(RUNNERS)}")
    fast = spec.get("fast") or {}
    if fast and spec.runner != "ours":
        raise ValueError(f"variant {name}: `fast` (stored dtype, compile) is for runner=ours, not {spec.runner}")
    dtype = fast.get("dtype")
    if dtype is not None and dtype not in DTYPES:
        raise ValueError(f"variant {name}: fast.dtype={dtype}; allowed: null, {', '.join(DTYPES)}")
    if dtype is not None and precision != "bf16":
        raise ValueError(
            f"variant {name}: fast.dtype={dtype} stores the frozen weights in {dtype}, which computes under "
            "autocast only: set benchmark.precision=bf16"
        )
    if fast.get("compile"):
        check_backend(fast.compile.get("backend", "inductor"), f"benchmark.variants.{name}.fast.compile.backend")


class Bench:
    """The shared state of a benchmark run: backbone, tokenizer, device, precision, the variants' specs."""

    def __init__(self, cfg: DictConfig) -> None:
        self.cfg = cfg
        self.device = torch.device(
            "cuda"
            if cfg.device == "auto" and torch.cuda.is_available()
            else "cpu"
            if cfg.device == "auto"
            else cfg.device
        )
        if cfg.precision not in ("fp32", "bf16"):
            raise ValueError(f"benchmark.precision={cfg.precision}; allowed: fp32, bf16")
        self.batch_size = cfg.batch_size or (32 if self.device.type == "cuda" else 8)
        if cfg.model not in cfg.architectures:
            raise ValueError(f"benchmark.model={cfg.model}; allowed: {', '.join(cfg.architectures)}")
        self.architecture = OmegaConf.to_container(cfg.architectures[cfg.model], resolve=True)
        torch.manual_seed(cfg.seed)
        self.backbone = freeze(build_backbone(TINY, self.architecture)).to(self.device)  # random weights
        self.stored: dict[str, PreTrainedModel] = {}  # copies of the backbone in another stored dtype (fast variants)
        self.kind = kind_of(self.backbone).name
        if self.kind != cfg.kind:
            raise ValueError(
                f"benchmark.model={cfg.model} is a {self.kind} architecture, but benchmark.kind={cfg.kind}: "
                f"set benchmark.kind={self.kind} (it also picks the LoRA + X variants' modules)"
            )
        tiny = cfg.model in cfg.byte_tokenizer
        self.estimate = not tiny and not cfg.tokenizer
        self.tokenizer = build_tokenizer("tiny" if tiny or self.estimate else cfg.tokenizer)
        self.vocab_high = min(self.backbone.config.vocab_size, 32000)  # no sentinels or padding rows
        on_cpu = self.device.type == "cpu"  # inductor takes minutes there: the fast variants only when named
        names = list(cfg.run_variants or [n for n in cfg.variants if not (on_cpu and cfg.variants[n].get("fast"))])
        unknown = set(names) - set(cfg.variants)
        if unknown:
            raise ValueError(f"benchmark.run_variants: unknown {sorted(unknown)}; known: {', '.join(cfg.variants)}")
        self.specs = {name: cfg.variants[name] for name in names}
        for name, spec in self.specs.items():
            check_variant(name, spec, cfg.precision)
        self.roots = {name: method_config(spec, cfg.optimizer) for name, spec in self.specs.items()}
        targets = cfg.get("lora_target_modules")
        for root in self.roots.values():  # LoRA + X: the architecture's modules, as run.build_system takes them
            if root.method.get("lora") and root.method.lora.get("target_modules") is None and targets is not None:
                root.method.lora.target_modules = list(targets)
        self.longest_prompt = max(int(r.method.get("prompt_length", 0)) for r in self.roots.values())
        self.memory_kind = "cuda_max_allocated" if self.device.type == "cuda" else "cpu_live_tensors"
        self.peak = device_peak(self.device)
        self.hardware = hardware(self.device, measure=bool(cfg.measure_peak))  # before any variant: a cold device

    def fast_backbone(self, name: str, dtype: str | None) -> PreTrainedModel:
        """The shared backbone, or its copy stored in `dtype` (model.dtype's rule: smop.backbones.precision), made
        once: a frozen bf16 backbone is the fast path's first part."""
        if dtype is None:
            return self.backbone
        if dtype not in self.stored:
            self.stored[dtype] = cast_weights(copy.deepcopy(self.backbone), DTYPES[dtype])
        return self.stored[dtype]

    def autocast(self) -> Any:
        if self.cfg.precision == "bf16":
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def build(self, name: str, task: Task) -> Runner:
        """A fresh variant, seeded: the same initial prompt in every setting."""
        torch.manual_seed(self.cfg.seed)
        spec, root = self.specs[name], self.roots[name]
        dropout = bool(self.cfg.train_dropout)
        if spec.runner == "ours":
            fast = spec.get("fast") or {}
            backbone, options = self.fast_backbone(name, fast.get("dtype")), fast.get("compile")
            options = OmegaConf.to_container(options, resolve=True) if options else None
            return build_ours(root, backbone, self.tokenizer, task, self.device, self.autocast, dropout, options)
        if spec.runner == "lightning":
            return build_lightning(root, self.backbone, self.tokenizer, task, self.device, self.cfg.precision, dropout)
        if spec.runner == "peft":
            return build_peft(root, self.backbone, self.device, self.autocast, dropout, self.tokenizer.pad_token_id)
        return build_bare(root, self.backbone, self.device, self.autocast, dropout)

    def summarise(self, times: list[float], cpu_times: list[float] | None) -> dict[str, Any]:
        """Median step time, examples/s, the interquartile range relative to the median (the noise), the
        minimum (on a shared CPU the least disturbed step) and, on CPU, the median process CPU time."""
        median = statistics.median(times)
        quartiles = statistics.quantiles(times, n=4) if len(times) > 1 else [median, median, median]
        cpu = self.device.type == "cpu" and bool(cpu_times)
        return {
            "step_time_s_median": median,
            "step_time_iqr_rel": (quartiles[2] - quartiles[0]) / median,
            "step_time_s_min": min(times),
            "step_times_s": times,
            "examples_per_s": self.batch_size / median,
            "step_cpu_s_median": statistics.median(cpu_times) if cpu else None,
            "step_cpu_s": cpu_times if cpu else None,
        }

    def model_flops(self, runner: Runner, batches: list[Batch]) -> float | None:
        """Mean model FLOPs (2 per multiply-add, analytic) of a training step over the timed `batches`: our systems
        through `step_model_flops` (full fine-tuning 3x forward, LoRA its frozen backbone's 2x); peft's, the bare
        loop's and Lightning's prompt as a plain prompt of `prompt_length` rows before a frozen backbone (2x)."""
        figures = []
        for batch in batches:
            if runner.system is not None:
                flops, _ = step_model_flops(runner.system, batch)
            else:
                rows, width = batch["input_ids"].shape
                config = self.backbone.config
                macs = kind_of(self.backbone).analytic_flops(
                    config, runner.prompt_length + width, batch["labels"].shape[1]
                )
                flops = None if macs is None else 2 * 2 * macs * rows
            if flops is None:
                return None
            figures.append(flops)
        return statistics.mean(figures) if figures else None

    def measure(self, name: str, setting: Setting, task: Task, first: bool = True) -> dict[str, Any]:
        """Time, memory, FLOPs and trainable parameters of one variant on one setting's batches.

        FLOPs and the CPU memory figure do not depend on timing noise: they are taken in the `first` round only.
        """
        cfg = self.cfg
        gc.collect()  # the previous variant's objects, before this one is built and measured
        runner = self.build(name, task)
        try:
            before = 0
            if self.device.type == "cuda":
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats(self.device)
                before = torch.cuda.memory_allocated(self.device)
            if runner.run is not None:
                times, cpu_times = runner.run(setting.batches, cfg.warmup_steps), None
            else:
                times, cpu_times = timed_steps(runner.step, setting.batches, cfg.warmup_steps, self.device)
            memory = step_memory = None
            if self.device.type == "cuda":
                memory = torch.cuda.max_memory_allocated(self.device)
                step_memory = memory - before
            elif runner.run is None and cfg.memory_steps > 0 and first:
                resident = resident_bytes(runner.modules, runner.optimizer)
                with LiveTensorBytes() as tracker:
                    for batch in setting.batches[: cfg.memory_steps]:
                        runner.step(batch)
                memory, step_memory = resident + tracker.peak, tracker.peak
            result = {
                "runner": self.specs[name].runner,
                "trainable_params": runner.trainable,
                **self.summarise(times, cpu_times),
                "peak_memory_bytes": memory,
                "step_memory_bytes": step_memory,
                "model_flops_per_step": self.model_flops(runner, setting.batches[cfg.warmup_steps :]),
            }
            if runner.system is not None and first:
                result.update(count_flops(runner, setting.batches[: cfg.flops_batches], cfg.flops_rows))
            return result
        finally:
            runner.close()


def throughput(flops_per_step: float | None, step_time: float, peak: Any, device: dict[str, Any]) -> dict[str, Any]:
    """Model TFLOP/s of the median step, MFU against the device's table peak (null on a CPU, with the reason), and
    the share of the measured matmul rate (the one limit a CPU has)."""
    per_s = flops_per_step / step_time if flops_per_step is not None else None
    utilisation, why = mfu(per_s, peak)
    tflops = per_s / 1e12 if per_s is not None else None
    measured = device.get("measured_matmul_tflops")
    share = tflops / measured if tflops is not None and measured else None
    return {"train_tflops_per_s": tflops, "train_mfu": utilisation, "mfu_note": why, "of_measured_matmul": share}


# --- the data-pipeline comparison -------------------------------------------------------------------
def padded_collate(
    collate: Callable[[list[dict[str, Any]]], Batch], length: int, pad_id: int
) -> Callable[[list[dict[str, Any]]], Batch]:
    """Pad every batch to `length` input tokens, as the DePT reference pads to max_length."""

    def pad(rows: list[dict[str, Any]]) -> Batch:
        batch = collate(rows)
        extra = length - batch["input_ids"].shape[1]
        return {
            **batch,
            "input_ids": F.pad(batch["input_ids"], (0, extra), value=pad_id),
            "attention_mask": F.pad(batch["attention_mask"], (0, extra), value=0),
        }

    return pad


def pipeline_comparison(bench: Bench, rows: TaskRows) -> dict[str, Any]:
    """Examples per second of a pass through the train DataLoader + training steps: our dynamic padding
    against padding every batch to max_length. One untimed warm-up step first."""
    cfg = bench.cfg.pipeline
    name = cfg.variant
    if bench.specs[name].runner not in ("ours", "peft", "bare"):
        raise ValueError(f"benchmark.pipeline.variant={name}: needs a plain-loop variant (runner ours, peft or bare)")
    budget = bench.cfg.max_length - int(bench.roots[name].method.get("prompt_length", 0))
    if bench.kind == CAUSAL:  # a causal row holds its target too, within max_length
        budget -= max(len(row["labels"]) for row in rows.rows)
    modes = {"dynamic": rows.collate, "max_length": padded_collate(rows.collate, budget, rows.pad_id)}
    result: dict[str, Any] = {"variant": name, "task": rows.task.name, "max_length_input": budget}
    for mode, collate in modes.items():
        runner = bench.build(name, rows.task)
        try:
            loader = DataLoader(
                rows.rows,
                batch_size=bench.batch_size,
                shuffle=True,
                collate_fn=collate,
                generator=torch.Generator().manual_seed(bench.cfg.seed),
            )
            runner.step(to_device(next(iter(loader)), bench.device))
            examples, widths = 0, []
            sync(bench.device)
            start = time.perf_counter()
            for batch in itertools.islice(loader, cfg.max_batches):
                runner.step(to_device(batch, bench.device))
                examples += batch["input_ids"].shape[0]
                widths.append(batch["input_ids"].shape[1])
            sync(bench.device)
            elapsed = time.perf_counter() - start
        finally:
            runner.close()
        result[mode] = {
            "examples": examples,
            "batches": len(widths),
            "seconds": elapsed,
            "examples_per_s": examples / elapsed,
            "padded_length_mean": statistics.mean(widths),
        }
    result["speedup_dynamic_over_max_length"] = (
        result["dynamic"]["examples_per_s"] / result["max_length"]["examples_per_s"]
    )
    return result


# --- evaluation: generation vs scoring -------------------------------------------------------------
def eval_comparison(bench: Bench, rows: TaskRows) -> dict[str, Any]:
    """Examples per second of evaluating the first `benchmark.eval.batches` real-length batches: greedy generation
    (eval.mode=generate, `max_new_tokens` = the longest label word + EOS, as a run sets it) against one scoring pass
    over every label word (eval.mode=score). The label words' ids are the rows' own targets (estimated ids where the
    lengths are estimated), so both modes decode as many tokens as training targets. One untimed batch first."""
    cfg = bench.cfg.eval
    name = cfg.variant
    if bench.specs[name].runner != "ours":
        raise ValueError(f"benchmark.eval.variant={name}: needs one of our systems (runner ours)")
    by_class = {row["label_index"]: row["labels"] for row in rows.rows}
    words = rows.task.label_words
    if set(by_class) != set(range(len(words))):
        raise ValueError(f"benchmark.eval.task={rows.task.name}: its rows hold classes {sorted(by_class)} of {words}")
    batches = [
        to_device(b, bench.device) for b in real_batches(rows, bench.batch_size, cfg.batches + 1, bench.cfg.seed)
    ]
    runner = bench.build(name, rows.task)
    result: dict[str, Any] = {"variant": name, "task": rows.task.name, "batches": cfg.batches}
    try:
        system = runner.system.eval()
        system.candidates = candidate_ids([by_class[c] for c in range(len(words))])
        system.max_new_tokens = max(len(ids) for ids in by_class.values())
        modes = {"generate": system.predict_labels, "score": system.score_labels}
        predictions = {}
        for mode, classify in modes.items():
            with bench.autocast():
                classify(batches[0]["input_ids"], batches[0]["attention_mask"])  # warm-up
                sync(bench.device)
                start, preds = time.perf_counter(), []
                for batch in batches[1:]:
                    preds.append(classify(batch["input_ids"], batch["attention_mask"])[0])
                sync(bench.device)
            seconds = time.perf_counter() - start
            examples = sum(b["input_ids"].shape[0] for b in batches[1:])
            result[mode] = {"examples": examples, "seconds": seconds, "examples_per_s": examples / seconds}
            predictions[mode] = torch.cat(preds)
    finally:
        runner.close()
    wrote = predictions["generate"].ne(-1)
    result["score_over_generate_speed"] = result["score"]["examples_per_s"] / result["generate"]["examples_per_s"]
    result["generated_label_words"] = float(wrote.float().mean())
    agree = predictions["score"][wrote].eq(predictions["generate"][wrote]).float().mean() if wrote.any() else None
    result["agreement_where_generated"] = float(agree) if agree is not None else None
    return result


# --- ratios and the analytic check ------------------------------------------------------------------
# --- one profiled step ------------------------------------------------------------------------------
def profile_steps(bench: Bench, name: str, setting: Setting, task: Task, rows: int) -> dict[str, Any]:
    """The top kernels (CUDA) or operators (CPU) of a variant's training steps under torch.profiler, by self time:
    what the next speed-up should attack. The warm-up steps run first, unprofiled (allocator, autotuning, compile)."""
    from torch.profiler import ProfilerActivity, profile

    cuda = bench.device.type == "cuda"
    activities = [ProfilerActivity.CPU, *([ProfilerActivity.CUDA] if cuda else [])]
    runner = bench.build(name, task)
    try:
        warmup = setting.batches[: bench.cfg.warmup_steps]
        profiled = setting.batches[bench.cfg.warmup_steps :][:2] or setting.batches[-1:]
        for batch in warmup:
            runner.step(batch)
        sync(bench.device)
        with profile(activities=activities) as prof:
            for batch in profiled:
                runner.step(batch)
            sync(bench.device)
    finally:
        runner.close()
    key = "self_device_time_total" if cuda else "self_cpu_time_total"
    events = [e for e in prof.key_averages() if getattr(e, key) > 0]
    total = sum(getattr(e, key) for e in events) or 1.0
    top = sorted(events, key=lambda e: getattr(e, key), reverse=True)[:rows]
    return {
        "variant": name,
        "setting": setting.name,
        "steps": len(profiled),
        "time": "CUDA self time" if cuda else "CPU self time",
        "rows": [
            {
                "name": e.key,
                "calls": e.count,
                "self_ms_per_step": getattr(e, key) / 1e3 / len(profiled),
                "share": getattr(e, key) / total,
            }
            for e in top
        ],
    }


def ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def compare(variants: dict[str, dict[str, Any]], names: DictConfig) -> dict[str, float | None]:
    """The headline ratios (each None when a variant it needs was not run)."""

    def get(key: str, figure: str) -> float | None:
        return variants.get(names.get(key), {}).get(figure)

    out = {
        "smop_over_pt_step_time": ratio(get("smop", "step_time_s_median"), get("pt", "step_time_s_median")),
        "smop_over_pt_memory": ratio(get("smop", "peak_memory_bytes"), get("pt", "peak_memory_bytes")),
        "smop_over_pt_step_memory": ratio(get("smop", "step_memory_bytes"), get("pt", "step_memory_bytes")),
        "smop_over_pt_flops": ratio(
            get("smop", "inference_flops_per_example"), get("pt", "inference_flops_per_example")
        ),
        "ours_over_peft_step_time": ratio(get("pt", "step_time_s_median"), get("peft", "step_time_s_median")),
        "ours_over_bare_step_time": ratio(get("pt", "step_time_s_median"), get("bare", "step_time_s_median")),
        "lightning_over_plain_step_time": ratio(
            get("lightning", "step_time_s_median"), get("pt", "step_time_s_median")
        ),
        "fast_over_peft_step_time": ratio(get("pt_fast", "step_time_s_median"), get("peft", "step_time_s_median")),
        "fast_over_plain_memory": ratio(get("pt_fast", "peak_memory_bytes"), get("pt", "peak_memory_bytes")),
        "smop_over_pt_fast_step_time": ratio(
            get("smop_fast", "step_time_s_median"), get("pt_fast", "step_time_s_median")
        ),
        "smop_over_pt_cpu_time": ratio(get("smop", "step_cpu_s_median"), get("pt", "step_cpu_s_median")),
        "ours_over_peft_cpu_time": ratio(get("pt", "step_cpu_s_median"), get("peft", "step_cpu_s_median")),
        "ours_over_bare_cpu_time": ratio(get("pt", "step_cpu_s_median"), get("bare", "step_cpu_s_median")),
    }
    fv_pt, fv_smop = get("pt", "inference_flops_per_example"), get("smop", "inference_flops_per_example")
    an_pt, an_smop = get("pt", "analytic_flops_per_example"), get("smop", "analytic_flops_per_example")
    if None not in (fv_pt, fv_smop, an_pt, an_smop):
        fvcore_delta, analytic_delta = fv_pt - fv_smop, an_pt - an_smop
        out.update(
            {
                "fvcore_flops_delta": fvcore_delta,
                "analytic_flops_delta": analytic_delta,
                "flops_delta_rel_error": abs(fvcore_delta - analytic_delta) / abs(analytic_delta),
            }
        )
    return out


# --- the report -------------------------------------------------------------------------------------
TARGETS = {
    "smop_over_pt_step_time": 0.85,
    "smop_over_pt_memory": 0.77,
    "smop_over_pt_flops": 0.73,
    "ours_over_peft_step_time": 1.00,
    "fast_over_peft_step_time": 0.40,
    "fast_over_plain_memory": 0.50,
}
RATIO_LABELS = {
    "smop_over_pt_step_time": "SMoP/PT-100 time",
    "smop_over_pt_memory": "SMoP/PT-100 memory",
    "smop_over_pt_step_memory": "SMoP/PT-100 step memory",
    "smop_over_pt_flops": "SMoP/PT-100 FLOPs",
    "ours_over_peft_step_time": "ours/peft time",
    "ours_over_bare_step_time": "ours/bare time",
    "lightning_over_plain_step_time": "Lightning/plain time",
    "fast_over_peft_step_time": "fast/peft time",
    "fast_over_plain_memory": "fast/plain memory",
    "smop_over_pt_fast_step_time": "SMoP/PT-100 fast time",
    "flops_delta_rel_error": "analytic check (rel. err.)",
}
CPU_RATIO_LABELS = {
    "smop_over_pt_cpu_time": "SMoP/PT-100",
    "ours_over_peft_cpu_time": "ours/peft",
    "ours_over_bare_cpu_time": "ours/bare",
}


def _fmt(value: Any, kind: str) -> str:
    if value is None:
        return "-"
    return {
        "ms": f"{value * 1e3:,.1f}",
        "mib": f"{value / MIB:,.1f}",
        "gflops": f"{value / 1e9:,.4g}",
        "int": f"{value:,}",
        "rate": f"{value:,.1f}",
        "ratio": f"{value:.3f}",
        "pct": f"{value * 100:.3f}%",
        "tflops": f"{value:,.4g}",
        "mfu": f"{value * 100:.1f}%",
    }[kind]


def memory_header(kind: str) -> str:
    if kind == "cuda_max_allocated":
        return (
            "Peak MiB: torch.cuda.max_memory_allocated over the training steps; step MiB: that peak minus "
            "what was allocated before the first step (the steps' own memory)"
        )
    return (
        "Peak MiB (CPU): weights + gradients + optimizer state + step MiB, the peak of tensors alive at once "
        "during a step (tracked at the dispatcher; no CUDA counter exists on CPU)"
    )


def tables(report: dict[str, Any]) -> list[tuple[str, list[str], list[list[str]]]]:
    """Title, header, rows of every table: one per setting, the ratios, the data pipeline."""
    out = []
    header = [
        "variant",
        "trainable",
        "step ms",
        "IQR",
        "min ms",
        "CPU ms",
        "examples/s",
        "peak MiB",
        "step MiB",
        "GFLOPs/ex fvcore",
        "GFLOPs/ex analytic",
        "TFLOP/s",
        "MFU",
        "of matmul",
    ]
    for setting in report["settings"]:
        failed = [
            [name, f"failed: {v['error'][:100]}", *["-"] * (len(header) - 2)]
            for name, v in setting["variants"].items()
            if "error" in v
        ]
        rows = [
            [
                name,
                _fmt(v["trainable_params"], "int"),
                _fmt(v["step_time_s_median"], "ms"),
                f"{v['step_time_iqr_rel'] * 100:.0f}%",
                _fmt(v["step_time_s_min"], "ms"),
                _fmt(v.get("step_cpu_s_median"), "ms"),
                _fmt(v["examples_per_s"], "rate"),
                _fmt(v["peak_memory_bytes"], "mib"),
                _fmt(v["step_memory_bytes"], "mib"),
                _fmt(v.get("inference_flops_per_example"), "gflops"),
                _fmt(v.get("analytic_flops_per_example"), "gflops"),
                _fmt(v.get("train_tflops_per_s"), "tflops"),
                _fmt(v.get("train_mfu"), "mfu"),
                _fmt(v.get("of_measured_matmul"), "mfu"),
            ]
            for name, v in setting["variants"].items()
            if "error" not in v
        ] + failed
        shape = setting["shape"]
        title = (
            f"{setting['name']}: mean input {shape['input_tokens_mean']:.1f} tokens, padded "
            f"{shape['padded_length_mean']:.1f}, labels {shape['label_length_mean']:.1f} ({setting['lengths']})"
        )
        out.append((title, header, rows))
    ratio_header = ["setting"] + [
        RATIO_LABELS[k] + (f" (<= {TARGETS[k]:.2f})" if k in TARGETS else "") for k in RATIO_LABELS
    ]
    ratio_rows = [
        [s["name"]]
        + [_fmt(s["ratios"].get(k), "pct" if k == "flops_delta_rel_error" else "ratio") for k in RATIO_LABELS]
        for s in report["settings"]
    ]
    out.append(
        ("Ratios (SMoP 4x5 vs PT-100; our PT-100 vs peft's, the bare loop, and Lightning)", ratio_header, ratio_rows)
    )
    if report["device"] == "cpu":
        cpu_rows = [
            [s["name"]] + [_fmt(s["ratios"].get(k), "ratio") for k in CPU_RATIO_LABELS] for s in report["settings"]
        ]
        out.append(
            (
                "Ratios of median CPU time per step (process time: not the moments other jobs hold the cores)",
                ["setting", *CPU_RATIO_LABELS.values()],
                cpu_rows,
            )
        )
    pipe = report.get("pipeline")
    if pipe:
        rows = [
            [
                mode,
                str(pipe[mode]["examples"]),
                f"{pipe[mode]['padded_length_mean']:.1f}",
                _fmt(pipe[mode]["examples_per_s"], "rate"),
            ]
            for mode in ("dynamic", "max_length")
        ]
        rows.append(["dynamic / max_length", "", "", _fmt(pipe["speedup_dynamic_over_max_length"], "ratio")])
        out.append(
            (
                f"Data pipeline: {pipe['variant']} on {pipe['task']}, DataLoader + training steps "
                f"(max_length pads inputs to {pipe['max_length_input']})",
                ["padding", "examples", "mean padded length", "examples/s"],
                rows,
            )
        )
    evaluation = report.get("eval")
    if evaluation:
        rows = [
            [mode, str(evaluation[mode]["examples"]), _fmt(evaluation[mode]["examples_per_s"], "rate")]
            for mode in ("generate", "score")
        ]
        rows.append(["score / generate", "", _fmt(evaluation["score_over_generate_speed"], "ratio")])
        out.append(
            (
                f"Evaluation: {evaluation['variant']} on {evaluation['task']}, eval.mode=generate vs score (random "
                f"weights: generated label words {evaluation['generated_label_words'] * 100:.0f}%, score agrees on "
                f"{_fmt(evaluation['agreement_where_generated'], 'ratio')} of them)",
                ["eval.mode", "examples", "examples/s"],
                rows,
            )
        )
    profiled = report.get("profile")
    if profiled:
        rows = [
            [row["name"][:80], str(row["calls"]), f"{row['self_ms_per_step']:.3f}", f"{row['share'] * 100:.1f}%"]
            for row in profiled["rows"]
        ]
        out.append(
            (
                f"Profile: {profiled['variant']} on {profiled['setting']}, {profiled['steps']} training steps, top "
                f"{len(rows)} by {profiled['time']}",
                ["kernel / operator", "calls", "self ms / step", "share"],
                rows,
            )
        )
    return out


FLOPS_SCOPE = {
    SEQ2SEQ: "encoder + decoder over the label length",
    CAUSAL: "one pass over prompt + input + label, the LM head at every position",
}


def markdown(report: dict[str, Any]) -> str:
    machine = report["machine"]
    lines = [
        f"# Benchmark: {report['model']} ({report['kind']}, {report['precision']}, batch {report['batch_size']}, "
        f"{report['device']})",
        "",
        f"{machine['date']} - {machine['device_name']} - {machine['cpu_count']} CPU cores, "
        f"{machine['torch_threads']} torch threads - torch {report['versions']['torch']}, "
        f"transformers {report['versions']['transformers']}, peft {machine['peft']}",
        "",
        f"Command: `{report['command']}`",
        "",
        hardware_line(report["hardware"]),
        "",
        f"Step ms: median of {report['steps']} x {report['rounds']} timed steps (forward + backward + "
        f"optimizer step) after {report['warmup_steps']} warm-up steps; IQR: their interquartile range over "
        "the median (the noise); min ms: the fastest step; CPU ms (CPU runs): median process CPU time of a "
        f"step. {memory_header(report['memory_kind'])}. "
        f"GFLOPs/ex: inference forward per example ({FLOPS_SCOPE[report['kind']]}), multiply-adds. "
        "Targets in brackets are reported, not asserted.",
        "",
    ]
    if not report.get("complete", True):
        lines += ["**Incomplete: the run has not finished (or was cut short); the settings below are done.**", ""]
    lines += [f"**Failed**: {f['part']}: {f['error']}" for f in report.get("failures", [])]
    lines += [""] if report.get("failures") else []
    for title, header, rows in tables(report):
        lines += [f"## {title}", "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        lines += ["| " + " | ".join(row) + " |" for row in rows]
        lines.append("")
    return "\n".join(lines)


def hardware_line(figures: dict[str, Any]) -> str:
    """The device, its table peak and the measured matmul: what the TFLOP/s and MFU columns are read against."""
    peak = figures["peak_tflops_bf16"]
    measured = figures["measured_matmul_tflops"]
    return (
        f"Device: {figures['device']}; dense bf16 peak "
        + (
            f"{peak:,.1f} TFLOP/s ({figures['peak_source']})"
            if peak is not None
            else f"unknown ({figures['peak_source']})"
        )
        + "; measured matmul "
        + (f"{measured:,.3g} TFLOP/s" if measured is not None else "not measured (benchmark.measure_peak=false)")
        + ". TFLOP/s: analytic model FLOPs of a step (2 per multiply-add; 2x forward with a frozen backbone, 3x full "
        "fine-tuning) / median step time; MFU: that / the peak; of matmul: that / the measured matmul"
    )


def print_tables(report: dict[str, Any], console: Console) -> None:
    console.print(hardware_line(report["hardware"]))
    console.print(memory_header(report["memory_kind"]))
    for title, header, rows in tables(report):
        table = Table(title=title)
        for i, name in enumerate(header):
            table.add_column(name, justify="left" if i == 0 else "right")
        for row in rows:
            table.add_row(*row)
        console.print(table)


# --- the run ----------------------------------------------------------------------------------------
def machine() -> dict[str, Any]:
    import peft

    return {
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "peft": peft.__version__,
        "device_name": torch.cuda.get_device_name() if torch.cuda.is_available() else "no GPU",
    }


def settings(bench: Bench) -> Iterator[tuple[Setting, Task, TaskRows]]:
    """Each task's real-length batches, then the fixed lengths (random ids, the first task's labels)."""
    cfg = bench.cfg
    count = cfg.warmup_steps + cfg.steps
    budget = cfg.max_length - bench.longest_prompt  # every variant sees the same (truncated) inputs
    first: tuple[list[Batch], Task, TaskRows] | None = None
    for task in cfg.tasks:
        rows = task_rows(cfg, task, bench.tokenizer, bench.estimate, budget, bench.vocab_high, bench.architecture)
        batches = real_batches(rows, bench.batch_size, count, cfg.seed)
        first = first or (batches, rows.task, rows)
        yield (
            Setting(f"{task} ({rows.source} lengths)", "real", [to_device(b, bench.device) for b in batches]),
            rows.task,
            rows,
        )
    if first is None and cfg.fixed_lengths:
        raise ValueError("benchmark.fixed_lengths takes its labels from the first of benchmark.tasks: give one")
    for length in cfg.fixed_lengths:
        eos = None if bench.kind == CAUSAL else bench.tokenizer.eos_token_id  # a causal source has no EOS
        batches = fixed_batches(first[0], length, bench.vocab_high, eos, cfg.seed)
        yield Setting(f"fixed {length}", "fixed", [to_device(b, bench.device) for b in batches]), first[1], first[2]


# Expected here: a frozen backbone in eval mode, no validation loop, in-memory batches, peft on transformers 5.
EXPECTED_WARNINGS = (
    ".*module\\(s\\) in eval mode.*",
    ".*no `val_dataloader`.*",
    ".*does not have many workers.*",
    ".*is_gradient_checkpointing.*",
    ".*LeafSpec.*",
)


def run_benchmark(cfg: DictConfig, output_dir: str | Path, command: str = "python -m smop.benchmark") -> dict[str, Any]:
    """Measure every variant on every setting, write benchmark.md and benchmark.json, return the report."""
    threads = torch.get_num_threads()
    if cfg.benchmark.threads:
        torch.set_num_threads(cfg.benchmark.threads)  # on a shared CPU, 1 thread avoids OpenMP threads waiting
    try:
        with warnings.catch_warnings():
            for expected in EXPECTED_WARNINGS:
                warnings.filterwarnings("ignore", message=expected)
            return _run(cfg, output_dir, command)
    finally:
        torch.set_num_threads(threads)


def _run(cfg: DictConfig, output_dir: str | Path, command: str) -> dict[str, Any]:
    bench = Bench(cfg.benchmark)
    console = Console(width=max(Console().width, 150))  # wide tables stay readable in logs and pipes
    report: dict[str, Any] = {
        "model": cfg.benchmark.model,
        "kind": bench.kind,
        "device": str(bench.device),
        "precision": cfg.benchmark.precision,
        "batch_size": bench.batch_size,
        "warmup_steps": cfg.benchmark.warmup_steps,
        "steps": cfg.benchmark.steps,
        "rounds": cfg.benchmark.rounds,
        "memory_kind": bench.memory_kind,
        "command": command,
        "machine": machine(),
        "hardware": bench.hardware,
        "versions": versions(),
        "settings": [],
        "pipeline": None,
        "eval": None,
        "complete": False,
        "config": OmegaConf.to_container(cfg.benchmark, resolve=True),
    }
    rows_by_task: dict[str, TaskRows] = {}
    profile_cfg = cfg.benchmark.profile
    if profile_cfg.variant is not None and profile_cfg.variant not in bench.specs:
        raise ValueError(f"benchmark.profile.variant={profile_cfg.variant} is not among the variants run")
    report["profile"] = None
    report["failures"] = []
    output = Path(output_dir)

    def attempt(what: str, measure: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """`measure(*args, **kwargs)`, or None with the error on record: one failing part (an out-of-memory, a
        compiler error) costs its own figures, not the others' (the run still exits non-zero at the end)."""
        try:
            return measure(*args, **kwargs)
        except Exception as err:  # noqa: BLE001 - recorded with its type and message, and the run fails at the end
            message = f"{type(err).__name__}: {' '.join(str(err).split())[:300]}"  # one line, its start
            console.log(f"[red]{what} failed[/red]: {message}")
            report["failures"].append({"part": what, "error": message})
            if bench.device.type == "cuda":
                torch.cuda.empty_cache()
            return None

    for setting, task, rows in settings(bench):
        rows_by_task[task.name] = rows
        if profile_cfg.variant is not None and report["profile"] is None and setting.name == profile_cfg.setting:
            console.log(f"profiling: {profile_cfg.variant} on {setting.name}")
            report["profile"] = attempt(
                f"profile of {profile_cfg.variant} on {setting.name}",
                profile_steps,
                bench,
                profile_cfg.variant,
                setting,
                task,
                profile_cfg.rows,
            )
        variants: dict[str, dict[str, Any]] = {name: {} for name in bench.specs}
        for round_index in range(cfg.benchmark.rounds):  # rounds > 1 interleave variants against drift
            for name in bench.specs:
                if "error" in variants[name]:
                    continue
                console.log(f"{setting.name}: {name} (round {round_index + 1}/{cfg.benchmark.rounds})")
                result = attempt(
                    f"{name} on {setting.name}",
                    bench.measure,
                    name,
                    setting,
                    task,
                    first=round_index == 0,
                )
                if result is None:
                    variants[name] = {"error": report["failures"][-1]["error"]}
                    continue
                if variants[name]:
                    earlier = variants[name]
                    cpu = earlier["step_cpu_s"] + result["step_cpu_s"] if earlier["step_cpu_s"] else None
                    pooled = {**earlier, **bench.summarise(earlier["step_times_s"] + result["step_times_s"], cpu)}
                    for key in ("peak_memory_bytes", "step_memory_bytes"):
                        values = [m for m in (earlier[key], result[key]) if m is not None]
                        pooled[key] = max(values) if values else None
                    result = pooled
                variants[name] = result
        for result in (v for v in variants.values() if "error" not in v):
            result.update(
                throughput(result.get("model_flops_per_step"), result["step_time_s_median"], bench.peak, bench.hardware)
            )
        lengths = rows.lengths if setting.kind == "real" else "random ids"
        report["settings"].append(
            {
                "name": setting.name,
                "kind": setting.kind,
                "lengths": lengths,
                "shape": setting.describe(),
                "variants": variants,
                "ratios": compare(variants, cfg.benchmark.compare),
            }
        )
        write_report(report, output)  # what is measured stays on disk if the run is cut short

    def rows_of(task: str) -> TaskRows:
        budget = cfg.benchmark.max_length - bench.longest_prompt
        return rows_by_task.get(task) or task_rows(
            cfg.benchmark, task, bench.tokenizer, bench.estimate, budget, bench.vocab_high, bench.architecture
        )

    comparisons = {"pipeline": ("data pipeline", pipeline_comparison), "eval": ("generate vs score", eval_comparison)}
    for key, (label, comparison) in comparisons.items():
        part = cfg.benchmark[key]
        if not part.enabled:
            continue
        if part.variant not in bench.specs:
            raise ValueError(f"benchmark.{key}.variant={part.variant} is not among the variants run")
        console.log(f"{label}: {part.variant} on {part.task}")
        report[key] = attempt(label, comparison, bench, rows_of(part.task))
        write_report(report, output)
    report["complete"] = True
    write_report(report, output)
    print_tables(report, console)
    console.print(f"Wrote {output / 'benchmark.md'} and {output / 'benchmark.json'}")
    if report["failures"]:
        parts = "; ".join(f"{f['part']}: {f['error']}" for f in report["failures"])
        raise PartsFailed(f"benchmark: {len(report['failures'])} part(s) failed (the others are written): {parts}")
    return report


class PartsFailed(RuntimeError):
    """Some variants or comparisons failed; the report holds the rest. An Exception, not SystemExit, so that a
    multirun's basic sweeper runs the other jobs (the next model) first and then fails with it."""


def write_report(report: dict[str, Any], output: Path) -> None:
    """benchmark.json and benchmark.md as far as the run got (`complete` false until the end)."""
    output.mkdir(parents=True, exist_ok=True)
    (output / "benchmark.json").write_text(json.dumps(report, indent=2, default=str))
    (output / "benchmark.md").write_text(markdown(report))


@hydra.main(version_base="1.3", config_path=str(CONFIG_DIR), config_name="benchmark")
def main(cfg: DictConfig) -> None:
    """`python -m smop.benchmark benchmark.model=t5-base benchmark.precision=bf16`."""
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
    overrides = " ".join(HydraConfig.get().overrides.task)
    run_benchmark(cfg, HydraConfig.get().runtime.output_dir, f"python -m smop.benchmark {overrides}".strip())


if __name__ == "__main__":
    main()
