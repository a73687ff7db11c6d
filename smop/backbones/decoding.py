"""How a kind picks each new token: greedy or sampled (temperature, nucleus/top-p), how many continuations per
example, and the stop strings that end a row early. Both kinds read the same `Decoding`.

Stop strings: a row stops once its decoded new text (special tokens skipped) contains one. As in transformers, the
returned tokens keep the stop string (and whatever else its last token carries); `truncate_at_stop` cuts the decoded
text just before the first stop string, which code generation wants removed.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import Tensor
from transformers import PreTrainedTokenizerBase


class DecodingError(ValueError):
    """A decoding option outside its range, or options that do not go together."""


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


@dataclass(frozen=True)
class Decoding:
    """Greedy by default. temperature and top_p only shape sampling (do_sample=True); greedy ignores them."""

    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    num_return_sequences: int = 1
    stop: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if not isinstance(self.do_sample, bool):
            raise DecodingError(f"decoding.do_sample={self.do_sample!r}: must be true or false")
        if not _is_number(self.temperature) or self.temperature <= 0:
            raise DecodingError(
                f"decoding.temperature={self.temperature!r}: must be a number > 0 (1.0 keeps the model's "
                "distribution, smaller sharpens it); for greedy decoding set do_sample=false"
            )
        if not _is_number(self.top_p) or not 0 < self.top_p <= 1:
            raise DecodingError(f"decoding.top_p={self.top_p!r}: must be in (0, 1] (1.0 keeps every token)")
        n = self.num_return_sequences
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise DecodingError(f"decoding.num_return_sequences={n!r}: must be an integer >= 1")
        if n > 1 and not self.do_sample:
            raise DecodingError(
                f"decoding.num_return_sequences={n} needs do_sample=true: greedy decoding would return {n} "
                "identical sequences per example"
            )
        object.__setattr__(self, "stop", _stop_strings(self.stop))


def _stop_strings(stop: object) -> tuple[str, ...]:
    """A tuple of non-empty strings (a list from a config is accepted); a bare string would be split into chars."""
    if isinstance(stop, str):
        raise DecodingError(f"decoding.stop={stop!r} is one string: give a list of strings, e.g. [{stop!r}]")
    try:
        strings = tuple(stop)  # type: ignore[arg-type]
    except TypeError:
        raise DecodingError(f"decoding.stop={stop!r}: must be a list of non-empty strings") from None
    bad = [s for s in strings if not isinstance(s, str) or not s]
    if bad:
        raise DecodingError(f"decoding.stop={list(strings)!r}: {bad[0]!r} is not a non-empty string")
    return strings


def check_generation(max_new_tokens: int, decoding: Decoding, tokenizer: PreTrainedTokenizerBase | None) -> None:
    """Refuse, before any forward pass, a generation that cannot run."""
    if isinstance(max_new_tokens, bool) or not hasattr(max_new_tokens, "__index__") or max_new_tokens < 1:
        raise DecodingError(f"max_new_tokens={max_new_tokens!r}: must be an integer >= 1")
    if decoding.stop and tokenizer is None:
        raise DecodingError(f"decoding.stop={list(decoding.stop)!r} needs a tokenizer to decode the new tokens")


def top_p_filter(logits: Tensor, top_p: float) -> Tensor:
    """[..., V] logits with every token outside the nucleus set to -inf. The nucleus is the smallest set of most
    probable tokens whose probability reaches top_p; it always holds the most probable token."""
    if top_p >= 1:
        return logits
    ordered, order = logits.sort(dim=-1, descending=True)
    probs = ordered.softmax(-1)
    ahead = probs.cumsum(-1) - probs  # the probability of the tokens before each one: 0 for the most probable
    outside = torch.empty_like(ahead, dtype=torch.bool).scatter_(-1, order, ahead >= top_p)
    return logits.masked_fill(outside, float("-inf"))


# splitmix64's constants as int64 (torch's int64 arithmetic wraps): a counter-based generator, so that a row's draws
# are a function of its own key and the step alone, not of the batch it is decoded in
_GOLDEN, _MIX1, _MIX2 = -7046029254386353131, -4658895280553007687, -7723592293110705685


def _shift(x: Tensor, bits: int) -> Tensor:
    """Logical right shift of int64 (torch's >> is arithmetic)."""
    return (x >> bits) & ((1 << (64 - bits)) - 1)


def _mix(x: Tensor) -> Tensor:
    """splitmix64's finaliser: every output bit depends on every input bit."""
    x = (x ^ _shift(x, 30)) * _MIX1
    x = (x ^ _shift(x, 27)) * _MIX2
    return x ^ _shift(x, 31)


def continuation_keys(keys: Tensor, n: int) -> Tensor:
    """[B] example keys -> [B * n] keys of their continuations, rows i*n .. i*n+n-1 for example i."""
    j = torch.arange(n, device=keys.device).repeat(keys.shape[0])
    return _mix(keys.long().repeat_interleave(n) * _GOLDEN + j)


def keyed_gumbel(keys: Tensor, step: int, vocab: int) -> Tensor:
    """[R, V] standard Gumbel noise, a pure function of each row's key, the step and the token id."""
    base = _mix(keys.long() * _GOLDEN + step)
    bits = _mix(base[:, None] + torch.arange(vocab, device=keys.device) * _GOLDEN)
    uniform = (_shift(bits, 11).double() + 0.5) / 2**53  # 53 random bits, strictly inside (0, 1)
    return -torch.log(-torch.log(uniform)).float()


def next_token(
    logits: Tensor,
    decoding: Decoding,
    generator: torch.Generator | None = None,
    keys: Tensor | None = None,
    step: int = 0,
) -> Tensor:
    """[B, V] logits -> [B] tokens: the argmax when greedy; else one draw per row from the temperature-scaled,
    nucleus-filtered distribution. With `keys` (one int64 per row) the draw is Gumbel-max over noise keyed by (row
    key, step): the same row draws the same tokens in any batch, at any batch size or world size. Else from
    `generator` (on the logits' device) when given: reproducible for the same batches."""
    if not decoding.do_sample:
        return logits.argmax(-1)
    scaled = top_p_filter(logits.float() / decoding.temperature, decoding.top_p)
    if keys is not None:
        return (scaled + keyed_gumbel(keys, step, scaled.shape[-1]).to(scaled.device)).argmax(-1)
    return torch.multinomial(scaled.softmax(-1), 1, generator=generator).squeeze(1)


def reached_stop(new_tokens: Tensor, done: Tensor, tokenizer: PreTrainedTokenizerBase, stop: Sequence[str]) -> Tensor:
    """[B] True for the rows not yet done whose new tokens [B, t], decoded, contain a stop string. The whole new
    text is decoded each time: a character split over several tokens only reads right once all of them are in."""
    hit = torch.zeros_like(done)
    rows = (~done).nonzero().squeeze(1)
    if rows.numel() == 0:
        return hit
    texts = tokenizer.batch_decode(new_tokens[rows], skip_special_tokens=True)
    found = [any(s in text for s in stop) for text in texts]
    hit[rows] = torch.tensor(found, dtype=torch.bool, device=done.device)
    return hit


def truncate_at_stop(texts: Sequence[str], stop: Sequence[str]) -> list[str]:
    """Each text cut just before its first stop string (the stop string is removed); a text without one is kept."""
    return [text[: min([i for i in (text.find(s) for s in stop) if i >= 0], default=len(text))] for text in texts]


@contextmanager
def global_rng_from(generator: torch.Generator | None, device: torch.device) -> Iterator[None]:
    """The global RNG of the CPU (and of `device`, a GPU) seeded from `generator` inside, restored after: for
    transformers' generate, which draws from the global RNG only. Without a generator, the global RNG as it is."""
    if generator is None:
        yield
        return
    seed = int(torch.randint(2**62, (1,), generator=generator, device=generator.device))
    gpu = device.type != "cpu"
    with torch.random.fork_rng(devices=[device] if gpu else [], device_type=device.type if gpu else "cuda"):
        torch.random.default_generator.manual_seed(seed)
        if gpu:
            module = torch.get_device_module(device.type)
            module.default_generators[module.current_device() if device.index is None else device.index].manual_seed(
                seed
            )
        yield
