"""The fast path of a GPU run, resolved once from the config: the frozen backbone stored in bf16, SDPA attention,
torch.compile of the training step, inputs padded to a multiple of 8, evaluation batches sorted by length.

Each part has its own switch; `auto` turns it on only where it pays and changes no result beyond float rounding
(CUDA training in bf16), so CPU runs behave as before. The config keeps `auto`; the resolved values go to
results.json (`backbone_dtype`, `fast_path`), so a checkpoint trained on a GPU evaluates unchanged on a CPU."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from smop.checks import DTYPE_NAMES as DTYPES  # model.dtype besides null (the checkpoint's own) and auto

AUTO = "auto"
ATTENTIONS = ("sdpa", "eager")  # model.attention: transformers' attn_implementation
BF16_PRECISIONS = ("bf16-mixed", "bf16-true", "bf16")  # Lightning's names of a bf16 run ("bf16" is bf16-mixed)
COMPILE_OPTIONS = {"backend": "inductor", "mode": None, "dynamic": True}  # torch.compile's keywords we pass
SHARDED = ("fsdp", "deepspeed")  # strategies that own the weights' dtype and wrapping: auto leaves them alone
PAD_WITH_COMPILE = 8  # dataset.pad_to_multiple_of=auto under compile: fewer distinct shapes, tensor-core tiles


@dataclass(frozen=True)
class FastPath:
    """What a run does, as resolved for this machine (None/False: the plain path)."""

    backbone_dtype: str | None  # the frozen weights' dtype name; None keeps the checkpoint's own
    attention: str = "sdpa"
    compile: bool = False
    compile_options: dict[str, Any] = field(default_factory=lambda: dict(COMPILE_OPTIONS))
    pad_to_multiple_of: int | None = None
    sort_eval_by_length: bool = False

    def record(self) -> dict[str, Any]:
        """results.json's `fast_path`."""
        return asdict(self)


def _get(node: Any, key: str, default: Any = None) -> Any:
    return node.get(key, default) if node is not None and hasattr(node, "get") else default


def on_cuda(trainer: Any) -> bool:
    """Whether Lightning will run this trainer config on a CUDA device (accelerator gpu/cuda, or auto with one)."""
    accelerator = str(_get(trainer, "accelerator", "auto"))
    return accelerator in ("gpu", "cuda", "auto") and torch.cuda.is_available()


def sharded(trainer: Any) -> bool:
    strategy = _get(trainer, "strategy", "auto")
    target = _get(strategy, "_target_", strategy)
    return any(name in str(target).lower() for name in SHARDED)


def bf16_precision(trainer: Any) -> bool:
    return str(_get(trainer, "precision", "32-true")) in BF16_PRECISIONS


def backbone_trains(cfg: Any) -> bool:
    """Full fine-tuning updates the backbone's weights: they keep an fp32 copy (LoRA's adapters are fp32 anyway)."""
    return bool(_get(cfg.get("method"), "train_backbone", False))


def check_backend(backend: Any, where: str) -> None:
    """A torch.compile backend this torch knows, refused by name before anything is built (torch itself says so
    only at the first compiled call, after the data and the model are loaded)."""
    if backend == COMPILE_OPTIONS["backend"]:  # always there: no need to import dynamo (a second) to know
        return
    from torch._dynamo import list_backends

    if not isinstance(backend, str) or backend not in list_backends(exclude_tags=()):
        raise ValueError(f"{where}={backend} is not a torch.compile backend here: one of {', '.join(list_backends())}")


def check_fast_path(cfg: Any) -> None:
    """Refuse a bad fast-path value by name, with the allowed ones, before anything is built."""
    model, dataset = cfg.get("model"), cfg.get("dataset")
    dtype = _get(model, "dtype")
    if dtype is not None and dtype != AUTO and dtype not in DTYPES:
        raise ValueError(f"model.dtype={dtype} is not one of: null, {AUTO}, {', '.join(DTYPES)}")
    attention = _get(model, "attention", "sdpa")
    if attention not in ATTENTIONS:
        raise ValueError(f"model.attention={attention} is not one of: {', '.join(ATTENTIONS)}")
    compile_ = _get(model, "compile", False)
    if not (isinstance(compile_, bool) or compile_ == AUTO):
        raise ValueError(f"model.compile={compile_} is not one of: false, true, {AUTO}")
    options = _get(model, "compile_options") or {}
    unknown = sorted(set(options) - set(COMPILE_OPTIONS))
    if unknown:
        raise ValueError(f"model.compile_options has {unknown}; allowed keys: {', '.join(COMPILE_OPTIONS)}")
    check_backend(options.get("backend", "inductor"), "model.compile_options.backend")
    if options.get("dynamic") not in (None, True, False):
        raise ValueError(f"model.compile_options.dynamic={options['dynamic']} is not one of: null, true, false")
    sort_eval = _get(dataset, "sort_eval_by_length", False)
    if not (isinstance(sort_eval, bool) or sort_eval == AUTO):
        raise ValueError(f"dataset.sort_eval_by_length={sort_eval} is not one of: false, true, {AUTO}")
    multiple = _get(dataset, "pad_to_multiple_of")
    integer = isinstance(multiple, int) and not isinstance(multiple, bool) and multiple >= 1
    if multiple is not None and multiple != AUTO and not integer:
        raise ValueError(f"dataset.pad_to_multiple_of={multiple} is not one of: null, {AUTO}, an integer >= 1 (8, 16)")


def resolve_fast_path(cfg: Any) -> FastPath:
    """The concrete choices for this config on this machine. `auto` means:

    - model.dtype: bfloat16 when the run is on CUDA in bf16 precision, not sharded, and the backbone is frozen
      (its weights never update, so an fp32 master copy is dead weight); else null, the checkpoint's own.
    - model.compile: on when it trains on CUDA (not sharded); off on CPU, where compiling costs more than it saves.
    - dataset.pad_to_multiple_of: 8 when the step is compiled, else null (pad to the longest row).
    - dataset.sort_eval_by_length: on for a run on CUDA (evaluation batches of similar length; the order changes
      float rounding only); off on CPU, whose evaluations stay batch for batch as before."""
    check_fast_path(cfg)
    model, trainer = cfg.get("model"), cfg.get("trainer")
    cuda = on_cuda(trainer) and not sharded(trainer)
    dtype = _get(model, "dtype")
    if dtype == AUTO:
        dtype = "bfloat16" if cuda and bf16_precision(trainer) and not backbone_trains(cfg) else None
    compile_ = _get(model, "compile", False)
    if compile_ == AUTO:
        compile_ = cuda and bool(cfg.get("train", True))
    options = {**COMPILE_OPTIONS, **dict(_get(model, "compile_options") or {})}
    multiple = _get(cfg.get("dataset"), "pad_to_multiple_of")
    if multiple == AUTO:
        multiple = PAD_WITH_COMPILE if compile_ else None
    sort_eval = _get(cfg.get("dataset"), "sort_eval_by_length", False)
    if sort_eval == AUTO:
        sort_eval = on_cuda(trainer)
    return FastPath(dtype, _get(model, "attention", "sdpa"), bool(compile_), options, multiple, bool(sort_eval))
