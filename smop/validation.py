"""Every numeric option with a meaningful range, in one table, checked before anything is built.

Why: a value out of range otherwise fails deep in torch (`method.prompt_length=-3`), gives a confusing message
far from its cause (`method.num_prompts=0` in topk), or worse, trains and reports `completed` (SMoP with empty
prompts). `check_ranges` names the key, the value and the allowed range of every bad value at once.

Keys absent from the composed config are skipped (a method without `num_prompts`, trainer keys nobody set), and so
are values interpolated from another key (`optimizer.lr: ${method.lr}`): they are checked where they come from.
Booleans are not integers here (`method.prompt_length=true` is refused), although Python says they are.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

from omegaconf import DictConfig, ListConfig, OmegaConf

Bound = int | float | str | None  # a number, or the key of another option whose value is the bound
_ABSENT = object()


@dataclass(frozen=True)
class Rule:
    """One kind of value and its interval: `int` or `float` (ints are numbers too), or `bool`."""

    kind: Literal["int", "float", "bool"]
    low: Bound = None
    high: Bound = None
    low_open: bool = False
    high_open: bool = False

    def limits(self, cfg: DictConfig) -> tuple[float | None, float | None, str | None, str | None]:
        """The bounds as numbers and as text; a bound read from another key that is absent or not a number is
        dropped (that key's own rule reports it)."""

        def resolve(bound: Bound) -> tuple[float | None, str | None]:
            if bound is None or isinstance(bound, int | float):
                return bound, None if bound is None else _number(bound)
            value = OmegaConf.select(cfg, bound, default=None)
            if not _is_number(value):
                return None, None
            return value, f"{bound}={_number(value)}"

        (low, low_text), (high, high_text) = resolve(self.low), resolve(self.high)
        return low, high, low_text, high_text

    def fits_kind(self, value: Any) -> bool:
        if self.kind == "bool":
            return isinstance(value, bool)
        return _is_number(value) and (self.kind == "float" or isinstance(value, int))

    def accepts(self, value: Any, cfg: DictConfig) -> bool:
        if not self.fits_kind(value):
            return False
        if self.kind == "bool":
            return True
        low, high, _, _ = self.limits(cfg)
        above = low is None or (value > low if self.low_open else value >= low)
        below = high is None or (value < high if self.high_open else value <= high)
        return above and below

    def describe(self, cfg: DictConfig) -> str:
        if self.kind == "bool":
            return "true or false"
        noun = "an integer" if self.kind == "int" else "a number"
        _, _, low, high = self.limits(cfg)
        if low is not None and high is not None:
            return f"{noun} in {'(' if self.low_open else '['}{low}, {high}{')' if self.high_open else ']'}"
        if low is not None:
            return f"{noun} {'>' if self.low_open else '>='} {low}"
        if high is not None:
            return f"{noun} {'<' if self.high_open else '<='} {high}"
        return noun


@dataclass(frozen=True)
class Spec:
    """What a key accepts: any of `rules`; null too when `nullable`; a list of such values (`shape="list"`) or
    one value or a list of them (`"either"`). `when` limits the entry to some configs (e.g. methods with a
    prompt); `note` says what the value means, in the message."""

    rules: tuple[Rule, ...]
    nullable: bool = False
    shape: Literal["one", "list", "either"] = "one"
    when: Callable[[DictConfig], bool] | None = None
    note: str = ""

    def accepts(self, value: Any, cfg: DictConfig) -> bool:
        if value is None:
            return self.nullable
        if isinstance(value, list | tuple):
            return self.shape != "one" and bool(value) and all(self.accepts_one(v, cfg) for v in value)
        return self.shape != "list" and self.accepts_one(value, cfg)

    def accepts_one(self, value: Any, cfg: DictConfig) -> bool:
        return any(rule.accepts(value, cfg) for rule in self.rules)

    def bound_keys(self) -> set[str]:
        return {b for rule in self.rules for b in (rule.low, rule.high) if isinstance(b, str)}

    def describe(self, cfg: DictConfig) -> str:
        one = " or ".join(rule.describe(cfg) for rule in self.rules)
        text = {"one": one, "list": f"a non-empty list, each {one}", "either": f"{one}, or a list of them"}
        return ("null or " if self.nullable else "") + text[self.shape] + (f" ({self.note})" if self.note else "")


def integer(low: Bound = None, high: Bound = None, high_open: bool = False) -> Rule:
    return Rule("int", low, high, high_open=high_open)


def number(low: Bound = None, high: Bound = None, low_open: bool = False, high_open: bool = False) -> Rule:
    return Rule("float", low, high, low_open, high_open)


def spec(*rules: Rule, **options: Any) -> Spec:
    return Spec(tuple(rules), **options)


def has_prompt(cfg: DictConfig) -> bool:
    return cfg.method.get("module") is not None


def reads(name: str, only: tuple[str, ...] = (), unless: tuple[str, ...] = ()) -> Callable[[DictConfig], bool]:
    """The method's prompt module takes option `name` (its class one of `only`, none of `unless`)."""

    def applies(cfg: DictConfig) -> bool:
        module = cfg.method.get("module")
        if module is None or name not in module:
            return False
        kind = str(module.get("_target_", "")).rpartition(".")[2]
        return (not only or kind in only) and kind not in unless

    return applies


POSITIVE = number(0, low_open=True)
NON_NEGATIVE = number(0)
SHARE = number(0, 1)  # [0, 1]
DROPOUT = number(0, 1, high_open=True)  # [0, 1): 1 would drop everything
SEED = integer(0, 2**32 - 1)  # what numpy and Lightning's seed_everything accept
WIDTH = "null: the encoder's width"
RANK = "null: from method.budget_tokens"
POSITIONS = "null: dataset.max_length - method.prompt_length"

# (key, spec): every numeric option of smop/configs/ with a meaningful range. A key may appear twice with
# complementary `when`s (a prompt method's prompt_length against full fine-tuning's).
RANGES: tuple[tuple[str, Spec], ...] = (
    # train.yaml
    ("seed", spec(SEED)),
    ("warmup_ratio", spec(SHARE, note="share of the training steps")),
    ("warmup_steps", spec(integer(0), nullable=True, note="null: warmup_ratio")),
    # dataset/*
    ("dataset.batch_size", spec(integer(1))),
    ("dataset.eval_batch_size", spec(integer(1))),
    ("dataset.max_length", spec(integer(2), note="prompt + input tokens, EOS included")),
    ("dataset.epochs", spec(integer(1))),
    ("dataset.val_fraction", spec(number(0, 1, low_open=True, high_open=True))),
    ("dataset.split_seed", spec(SEED)),
    ("dataset.num_workers", spec(integer(0))),
    ("dataset.k_shot", spec(integer(1), nullable=True, note="training rows per class; null: every row")),
    ("dataset.dept_steps", spec(integer(1), nullable=True, note="DePT's released steps; null: none released")),
    ("dataset.dept_max_length", spec(integer(2), note="DePT's prompt + input tokens for this task")),
    ("dataset.number_range", spec(number(), shape="list", note="a number target's [low, high], e.g. STS-B's [0, 5]")),
    ("dataset.max_target_length", spec(integer(1), nullable=True, note="a text target's tokens, EOS included")),
    ("dataset.max_train_records", spec(integer(1), nullable=True, note="training rows kept; null: every row")),
    ("dataset.decoding.temperature", spec(number(0, low_open=True), note="sampling temperature")),
    ("dataset.decoding.top_p", spec(number(0, 1, low_open=True), note="nucleus share; 1: every token")),
    ("dataset.decoding.num_return_sequences", spec(integer(1), note="samples per problem: pass@k for k <= n")),
    ("dataset.sandbox.timeout", spec(number(0, low_open=True), note="wall-clock seconds per program")),
    ("dataset.sandbox.memory_mb", spec(integer(64, 1 << 20), note="address space per program, MiB")),
    ("dataset.official_ranges.train", spec(integer(0), shape="list", note="[low, high] ids of the official split")),
    ("dataset.official_ranges.validation", spec(integer(0), shape="list", note="[low, high] ids")),
    ("dataset.official_ranges.test", spec(integer(0), shape="list", note="[low, high] ids")),
    ("dataset.synthetic.num_ranges", spec(integer(1))),
    ("dataset.synthetic.num_labels", spec(integer(1))),
    ("dataset.synthetic.min_length", spec(integer(1))),
    ("dataset.synthetic.max_length", spec(integer("dataset.synthetic.min_length"))),
    ("dataset.synthetic.num_train", spec(integer(1))),
    ("dataset.synthetic.num_test", spec(integer(1))),
    # model/t5-tiny
    ("model.tiny.vocab_size", spec(integer(1))),
    ("model.tiny.d_model", spec(integer(1))),
    ("model.tiny.d_ff", spec(integer(1))),
    ("model.tiny.d_kv", spec(integer(1))),
    ("model.tiny.num_heads", spec(integer(1))),
    ("model.tiny.num_layers", spec(integer(1))),
    ("model.tiny.num_decoder_layers", spec(integer(1))),
    ("model.tiny.dropout_rate", spec(DROPOUT)),
    ("model.tiny.decoder_start_token_id", spec(integer(0, "model.tiny.vocab_size", high_open=True))),
    ("model.tiny.pad_token_id", spec(integer(0, "model.tiny.vocab_size", high_open=True))),
    ("model.tiny.eos_token_id", spec(integer(0, "model.tiny.vocab_size", high_open=True))),
    ("model.tiny.bos_token_id", spec(integer(0, "model.tiny.vocab_size", high_open=True))),
    # the tiny decoder-only models (smop/configs/model/llama-tiny.yaml, gpt2-tiny.yaml)
    ("model.tiny.hidden_size", spec(integer(1))),
    ("model.tiny.intermediate_size", spec(integer(1))),
    ("model.tiny.num_hidden_layers", spec(integer(1))),
    ("model.tiny.num_attention_heads", spec(integer(1))),
    ("model.tiny.num_key_value_heads", spec(integer(1, "model.tiny.num_attention_heads"))),
    ("model.tiny.max_position_embeddings", spec(integer(1))),
    ("model.tiny.initializer_range", spec(number(0, low_open=True))),
    ("model.tiny.n_embd", spec(integer(1))),
    ("model.tiny.n_layer", spec(integer(1))),
    ("model.tiny.n_head", spec(integer(1))),
    ("model.tiny.n_positions", spec(integer(1))),
    # method/*
    ("method.lr", spec(POSITIVE)),
    ("method.prompt_length", spec(integer(1), when=has_prompt, note="tokens per prompt")),
    ("method.prompt_length", spec(integer(0), when=lambda cfg: not has_prompt(cfg), note="this method has no prompt")),
    # options the prompt module reads (through method.module), checked only where it does: an experiment's
    # method options merged into another method (experiment=idpg_t5base method=smop) are ignored by it
    ("method.num_prompts", spec(integer(1), when=reads("num_prompts"))),
    ("method.hidden_size", spec(integer(1), when=reads("hidden_size", unless=("IDPG", "LoPA")))),
    (
        "method.hidden_size",
        spec(integer(1), nullable=True, when=reads("hidden_size", only=("IDPG", "LoPA")), note=WIDTH),
    ),
    ("method.dropout", spec(DROPOUT, when=reads("dropout"))),
    ("method.rank", spec(integer(1), nullable=True, when=reads("rank", only=("DecomposedPromptTuning",)), note=RANK)),
    ("method.rank", spec(integer(1), when=reads("rank", unless=("DecomposedPromptTuning",)))),
    ("method.budget_tokens", spec(integer(1), nullable=True, when=reads("budget_tokens"))),
    ("method.max_positions", spec(integer(1), nullable=True, when=reads("max_positions"), note=POSITIONS)),
    ("method.alpha", spec(POSITIVE, when=reads("alpha"))),
    ("method.lr_lowrank", spec(POSITIVE, when=reads("lr_lowrank"))),
    ("method.weight_decay", spec(NON_NEGATIVE, when=reads("weight_decay"))),
    ("method.adam_eps", spec(POSITIVE, nullable=True, when=reads("adam_eps"), note="null: the optimizer's")),
    ("method.encoder_lr", spec(POSITIVE, nullable=True, when=reads("encoder_lr"), note="null: method.lr")),
    ("method.encoder_remote_code", spec(Rule("bool"), when=reads("encoder_remote_code"), note="true or false")),
    ("method.shared_lr", spec(POSITIVE, nullable=True, when=reads("shared_lr"), note="null: method.lr")),
    ("method.lora.r", spec(integer(1))),
    ("method.lora.alpha", spec(POSITIVE)),
    ("method.lora.dropout", spec(DROPOUT)),
    ("method.lora.lr", spec(POSITIVE)),
    # router/*
    ("router.topk", spec(integer(1, "method.num_prompts"))),
    ("router.num_prompts", spec(integer(1))),
    ("router.tau", spec(POSITIVE)),
    ("router.logit_dropout", spec(DROPOUT)),
    ("router.load_balance_weight", spec(NON_NEGATIVE)),
    ("router.consistency_weight", spec(NON_NEGATIVE)),
    # optimizer/*
    ("optimizer.lr", spec(POSITIVE)),
    ("optimizer.weight_decay", spec(NON_NEGATIVE)),
    # trainer/* (Lightning checks these only when the Trainer is built, after the data and the model)
    ("trainer.max_epochs", spec(integer(-1), nullable=True, note="-1: no limit")),
    ("trainer.max_steps", spec(integer(-1), note="-1: no limit")),
    ("trainer.min_epochs", spec(integer(0), nullable=True)),
    ("trainer.min_steps", spec(integer(0), nullable=True)),
    ("trainer.fast_dev_run", spec(Rule("bool"), integer(0), note="an integer: that many batches")),
    ("trainer.limit_train_batches", spec(integer(0), SHARE, nullable=True, note="an integer: batches; a float: share")),
    ("trainer.limit_val_batches", spec(integer(0), SHARE, nullable=True, note="an integer: batches; a float: share")),
    ("trainer.limit_test_batches", spec(integer(0), SHARE, nullable=True, note="an integer: batches; a float: share")),
    ("trainer.val_check_interval", spec(integer(1), number(0, 1, low_open=True), nullable=True)),
    ("trainer.accumulate_grad_batches", spec(integer(1))),
    ("trainer.gradient_clip_val", spec(NON_NEGATIVE, nullable=True)),
    ("trainer.check_val_every_n_epoch", spec(integer(1), nullable=True)),
    ("trainer.log_every_n_steps", spec(integer(0))),
    ("trainer.num_sanity_val_steps", spec(integer(-1), note="-1: all validation batches")),
    # callbacks/*
    ("callbacks.early_stopping.patience", spec(integer(0))),
    ("callbacks.early_stopping.min_delta", spec(NON_NEGATIVE)),
    ("callbacks.model_checkpoint.save_top_k", spec(integer(-1), note="-1: every checkpoint")),
    ("callbacks.flop_counter.num_batches", spec(integer(1))),
    ("callbacks.fpt.fractions", spec(number(0, 1, low_open=True), shape="list", note="shares kept per stage")),
    ("callbacks.fpt.stage_steps", spec(integer(1), nullable=True, shape="either", note="null: stage_share")),
    ("callbacks.fpt.stage_share", spec(number(0, 1, low_open=True))),
    ("callbacks.fpt.score_samples", spec(integer(1))),
    ("callbacks.fpt.flop_batches", spec(integer(1))),
    ("callbacks.fpt.score_seed", spec(SEED)),
    ("callbacks.fpt.gradient_clip_val", spec(NON_NEGATIVE, nullable=True, note="null: no clipping")),
)

# method.module.* repeats method.* by interpolation (then skipped); set directly, it gets the same rule
RANGES += tuple(
    (f"method.module.{key.removeprefix('method.')}", entry)
    for key, entry in RANGES
    if key.startswith("method.") and key.count(".") == 1
)


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _number(value: int | float) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


def shown(value: Any) -> str:
    """The value as it would be written on the command line."""
    if isinstance(value, bool):
        return str(value).lower()
    if value is None:
        return "null"
    if isinstance(value, list | tuple):
        return "[" + ", ".join(shown(v) for v in value) + "]"
    return str(value)


def read(cfg: DictConfig, key: str) -> Any:
    """The key's value, `_ABSENT` when the config lacks it or interpolates it from another key."""
    parent_key, _, name = key.rpartition(".")
    parent = OmegaConf.select(cfg, parent_key, default=None) if parent_key else cfg
    if not isinstance(parent, DictConfig) or name not in parent or OmegaConf.is_interpolation(parent, name):
        return _ABSENT
    value = parent[name]
    return OmegaConf.to_container(value, resolve=True) if isinstance(value, DictConfig | ListConfig) else value


def range_problems(cfg: DictConfig) -> list[str]:
    """One message per bad value: `method.prompt_length=-3 is out of range: must be an integer >= 1`.

    A value whose bound is another key that is itself bad is not reported (`method.num_prompts=0` alone, not
    also `router.topk=1` against it)."""
    problems: dict[str, str] = {}
    for key, entry in RANGES:
        value = read(cfg, key)
        if value is _ABSENT or (entry.when is not None and not entry.when(cfg)) or entry.accepts(value, cfg):
            continue
        if isinstance(value, list | tuple):
            fits = entry.shape != "one"
        else:
            fits = entry.shape != "list" and any(rule.fits_kind(value) for rule in entry.rules)
        verdict = "is out of range" if fits else "is not valid"
        problems[key] = f"{key}={shown(value)} {verdict}: must be {entry.describe(cfg)}"
    bounds: dict[str, set[str]] = {}
    for key, entry in RANGES:
        bounds.setdefault(key, set()).update(entry.bound_keys())
    return [message for key, message in problems.items() if not bounds[key] & problems.keys()]


def check_ranges(cfg: DictConfig) -> None:
    """Raise ValueError naming every numeric option outside its range, before anything is built."""
    problems = range_problems(cfg)
    if problems:
        raise ValueError("; ".join(problems))
