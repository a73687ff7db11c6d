"""Decoding options: out-of-range values are refused by name; the nucleus is exactly the smallest top set; the
causal kind's sampled KV-cache decode is the token-by-token one drawing the same random numbers; several
continuations per example come in example order; stop strings end a row early and are cut from its text; the
seq2seq kind maps the same options onto transformers' generate."""

from __future__ import annotations

import pytest
import torch
from conftest import CONFIGS
from omegaconf import OmegaConf
from transformers import ByT5Tokenizer

from smop.backbones import build_backbone
from smop.backbones.causal import CausalKind
from smop.backbones.decoding import (
    Decoding,
    DecodingError,
    check_generation,
    next_token,
    reached_stop,
    top_p_filter,
    truncate_at_stop,
)
from smop.backbones.seq2seq import Seq2SeqKind

TOKENIZER = ByT5Tokenizer()  # eos 1, pad 0, id = byte + 3
PAD, EOS = 0, 1
TINY_T5 = dict(vocab_size=384, d_model=32, d_ff=64, d_kv=8, num_heads=2, num_layers=1, decoder_start_token_id=0)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"temperature": 0.0}, r"decoding.temperature=0.0: must be a number > 0"),
        ({"temperature": float("nan")}, r"decoding.temperature=nan: must be a number > 0"),
        ({"top_p": 0.0}, r"decoding.top_p=0.0: must be in \(0, 1\]"),
        ({"top_p": 1.5}, r"decoding.top_p=1.5: must be in \(0, 1\]"),
        ({"num_return_sequences": 0, "do_sample": True}, r"decoding.num_return_sequences=0: must be an integer >= 1"),
        ({"num_return_sequences": 2}, r"decoding.num_return_sequences=2 needs do_sample=true"),
        ({"do_sample": "yes"}, r"decoding.do_sample='yes': must be true or false"),
        ({"stop": "\n"}, r"decoding.stop='\\n' is one string: give a list of strings, e.g. \['\\n'\]"),
        ({"stop": ["\n", ""]}, r"decoding.stop=\['\\n', ''\]: '' is not a non-empty string"),
    ],
)
def test_out_of_range_options_are_refused_by_name(options, message):
    with pytest.raises(DecodingError, match=message):
        Decoding(**options)


def test_a_stop_list_becomes_a_tuple_and_generation_needs_a_tokenizer_for_it():
    decoding = Decoding(stop=["\n", "###"])
    assert decoding.stop == ("\n", "###")
    with pytest.raises(DecodingError, match=r"decoding.stop=\['\\n', '###'\] needs a tokenizer"):
        check_generation(4, decoding, None)
    with pytest.raises(DecodingError, match=r"max_new_tokens=0: must be an integer >= 1"):
        check_generation(0, Decoding(), TOKENIZER)


@pytest.mark.parametrize(("top_p", "kept"), [(0.4, [1]), (0.7, [1, 3]), (0.85, [1, 3, 0]), (0.99, [1, 3, 0, 2])])
def test_the_nucleus_is_the_smallest_set_of_top_tokens_that_reaches_top_p(top_p, kept):
    probs = torch.tensor([[0.15, 0.5, 0.05, 0.3]])
    filtered = top_p_filter(probs.log(), top_p)
    assert sorted(filtered[0].isfinite().nonzero().flatten().tolist()) == sorted(kept)
    torch.testing.assert_close(filtered[0, kept], probs.log()[0, kept])


def test_the_nucleus_always_holds_the_most_probable_token():
    logits = torch.tensor([[0.0, 0.0, 5.0, 1.0], [3.0, 2.0, 1.0, 0.0]])
    filtered = top_p_filter(logits, 1e-9)
    assert filtered.isfinite().nonzero().tolist() == [[0, 2], [1, 0]]


@pytest.fixture(scope="module", params=["llama-tiny", "gpt2-tiny"])
def causal(request):
    """A tiny random-weight causal LM of the repository's configs."""
    torch.manual_seed(0)
    options = OmegaConf.to_container(OmegaConf.load(CONFIGS / "model" / f"{request.param}.yaml").tiny)
    return build_backbone("tiny", options).eval()


def prompted(backbone, sources: list[list[int]], prompt_length: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    """[P ; E[source]] right-padded, with its mask, as the system hands it over: P is a random (learned-like)
    prompt, not a token's embedding."""
    table = backbone.get_input_embeddings()
    prompt = torch.randn(prompt_length, table.embedding_dim, generator=torch.Generator().manual_seed(1))
    width = prompt_length + max(map(len, sources))
    embeds = torch.zeros(len(sources), width, table.embedding_dim)
    mask = torch.zeros(len(sources), width, dtype=torch.long)
    for i, source in enumerate(sources):
        row = torch.cat([prompt, table(torch.tensor(source))])
        embeds[i, : len(row)], mask[i, : len(row)] = row, 1
    return embeds.detach(), mask


SOURCES = [[40, 41, 42, 43, 44, 45], [50, 60], [70, 71, 72, 73]]  # of different lengths: padded in one batch


def sample_by_hand(backbone, embeds, mask, steps: int, decoding: Decoding, generator) -> torch.Tensor:
    """Each row recomputed whole each step (no padding, no cache); every step one [rows, V] multinomial draw over
    all rows, finished ones included, so the generator's numbers fall as in the batched decode."""
    n = decoding.num_return_sequences
    rows = [embeds[i, mask[i].bool()] for i in range(embeds.shape[0]) for _ in range(n)]
    table = backbone.get_input_embeddings()
    done, out = torch.zeros(len(rows), dtype=torch.bool), []
    for _ in range(steps):
        logits = torch.stack([backbone(inputs_embeds=row[None]).logits[0, -1] for row in rows])
        probs = top_p_filter(logits / decoding.temperature, decoding.top_p).softmax(-1)
        token = torch.multinomial(probs, 1, generator=generator).squeeze(1).masked_fill(done, PAD)
        out.append(token)
        done = done | token.eq(EOS)
        if done.all():
            break
        rows = [torch.cat([row, table(t.view(1))]) for row, t in zip(rows, token, strict=True)]
    return torch.stack(out, dim=1)


@pytest.mark.parametrize(
    "decoding",
    [Decoding(do_sample=True), Decoding(do_sample=True, temperature=0.7, top_p=0.9, num_return_sequences=2)],
)
def test_sampled_cached_decode_equals_a_token_by_token_one_with_the_same_draws(causal, decoding):
    embeds, mask = prompted(causal, SOURCES)
    with torch.no_grad():
        expected = sample_by_hand(causal, embeds, mask, 8, decoding, torch.Generator().manual_seed(3))
        generated = CausalKind().generate(
            causal, embeds, mask, 8, TOKENIZER, decoding, torch.Generator().manual_seed(3)
        )
        again = CausalKind().generate(causal, embeds, mask, 8, TOKENIZER, decoding, torch.Generator().manual_seed(3))
    assert generated.shape == expected.shape == (len(SOURCES) * decoding.num_return_sequences, 8)
    assert torch.equal(generated, expected) and torch.equal(generated, again)


def test_continuations_come_in_example_order_and_differ_when_sampled(causal):
    embeds, mask = prompted(causal, SOURCES)
    kind, n = CausalKind(), 4
    greedy = kind.generate(causal, embeds, mask, 6, TOKENIZER)
    cold = Decoding(do_sample=True, temperature=1e-4, num_return_sequences=n)
    assert torch.equal(kind.generate(causal, embeds, mask, 6, TOKENIZER, cold), greedy.repeat_interleave(n, dim=0))
    narrow = Decoding(do_sample=True, top_p=1e-9, num_return_sequences=n)  # the top token only: greedy again
    assert torch.equal(kind.generate(causal, embeds, mask, 6, TOKENIZER, narrow), greedy.repeat_interleave(n, dim=0))
    hot = kind.generate(causal, embeds, mask, 6, TOKENIZER, Decoding(do_sample=True, num_return_sequences=n))
    assert hot.shape == (len(SOURCES) * n, 6)
    assert all(len({tuple(row) for row in hot[i * n : (i + 1) * n].tolist()}) > 1 for i in range(len(SOURCES)))


def first_stop(tokens: list[int], stop: str) -> int:
    """How many of `tokens` it takes for their text to contain `stop` (all of them when it never does)."""
    return next(
        (k for k in range(1, len(tokens) + 1) if stop in TOKENIZER.decode(tokens[:k], skip_special_tokens=True)),
        len(tokens),
    )


def test_a_stop_string_ends_its_row_early_and_is_cut_from_the_text(causal):
    embeds, mask = prompted(causal, SOURCES)
    kind = CausalKind()
    greedy = kind.generate(causal, embeds, mask, 8, TOKENIZER).tolist()
    texts = TOKENIZER.batch_decode(greedy, skip_special_tokens=True)
    stop = texts[0][1:3]  # two characters of row 0's continuation, after its start
    lengths = [first_stop(row, stop) for row in greedy]
    assert lengths[0] < 8 and any(k == 8 for k in lengths), (texts, stop)  # one row stops early, another runs on
    stopped = kind.generate(causal, embeds, mask, 8, TOKENIZER, Decoding(stop=(stop,)))
    for row, new, k in zip(greedy, stopped.tolist(), lengths, strict=True):
        assert new == row[:k] + [PAD] * (len(new) - k)  # the tokens keep the stop string, then padding
    cut = truncate_at_stop(TOKENIZER.batch_decode(stopped, skip_special_tokens=True), [stop])
    assert cut == [text.split(stop)[0] for text in texts] and stop not in "".join(cut)


def test_a_stop_string_split_over_tokens_is_seen_once_its_last_byte_is_in():
    new = torch.tensor([[b + 3 for b in "ab\u00e9".encode()], [b + 3 for b in "x\u00e9z".encode()]])  # é: 2 bytes
    found = [reached_stop(new[:, :k], torch.zeros(2, dtype=torch.bool), TOKENIZER, ["\u00e9"]).tolist() for k in (3, 4)]
    assert found == [[False, True], [True, True]]  # row 0 after its 3rd byte: half an é, not yet the stop string
    assert reached_stop(new, torch.tensor([True, False]), TOKENIZER, ["\u00e9"]).tolist() == [False, True]


def test_truncate_at_stop_cuts_at_the_earliest_stop_string():
    texts = ["return x\ndef f", "a;b\nc", "x\ny\nz", "no stop here", ""]
    assert truncate_at_stop(texts, ["\ndef", "\n", ";"]) == ["return x", "a", "x", "no stop here", ""]
    assert truncate_at_stop(texts, []) == texts


@pytest.fixture(scope="module")
def t5():
    torch.manual_seed(0)
    return build_backbone("tiny", TINY_T5).eval()


def test_seq2seq_sampling_returns_n_rows_per_example_reproducibly_without_touching_the_global_rng(t5):
    embeds, mask = prompted(t5, SOURCES)
    kind, n = Seq2SeqKind(), 3
    decoding = Decoding(do_sample=True, temperature=0.9, top_p=0.95, num_return_sequences=n)
    state = torch.get_rng_state()
    first = kind.generate(t5, embeds, mask, 6, TOKENIZER, decoding, torch.Generator().manual_seed(5))
    again = kind.generate(t5, embeds, mask, 6, TOKENIZER, decoding, torch.Generator().manual_seed(5))
    assert torch.equal(torch.get_rng_state(), state)
    assert first.shape[0] == len(SOURCES) * n and first.shape[1] <= 6 + 1  # the decoder start token first
    assert torch.equal(first, again) and bool(first[:, 0].eq(0).all())
    greedy = kind.generate(t5, embeds, mask, 6, TOKENIZER)
    cold = Decoding(do_sample=True, temperature=1e-4, num_return_sequences=n)
    assert torch.equal(kind.generate(t5, embeds, mask, 6, TOKENIZER, cold), greedy.repeat_interleave(n, dim=0))


def test_seq2seq_stop_strings_end_a_row_early(t5):
    embeds, mask = prompted(t5, SOURCES)
    kind = Seq2SeqKind()
    sampled = Decoding(do_sample=True)
    free = kind.generate(t5, embeds, mask, 8, TOKENIZER, sampled, torch.Generator().manual_seed(2))
    text = TOKENIZER.decode(free[0], skip_special_tokens=True)
    stop = text[1]
    stopped = kind.generate(
        t5, embeds, mask, 8, TOKENIZER, Decoding(do_sample=True, stop=(stop,)), torch.Generator().manual_seed(2)
    )
    k = first_stop(free[0, 1:].tolist(), stop) + 1
    assert k < free.shape[1], (text, stop)
    assert stopped[0, :k].tolist() == free[0, :k].tolist() and set(stopped[0, k:].tolist()) <= {PAD}
    assert truncate_at_stop([TOKENIZER.decode(stopped[0], skip_special_tokens=True)], [stop]) == [text.split(stop)[0]]


def test_seq2seq_sampling_is_not_limited_to_transformers_default_top_50(t5):
    """At a high temperature the first token is nearly uniform over the 384 ids: some of 64 draws rank below 50."""
    embeds, mask = prompted(t5, SOURCES[:1])
    hot = Decoding(do_sample=True, temperature=100.0, num_return_sequences=64)
    first = Seq2SeqKind().generate(t5, embeds, mask, 1, TOKENIZER, hot, torch.Generator().manual_seed(0))[:, 1]
    with torch.no_grad():
        logits = t5(inputs_embeds=embeds, attention_mask=mask, decoder_input_ids=torch.zeros(1, 1, dtype=torch.long))
    ranks = logits.logits[0, -1].argsort(descending=True).argsort()
    assert int(ranks[first].max()) >= 50


# --- keyed sampling: a row's draws are its own, whatever the batch ------------------------------------------------
def test_keyed_draws_follow_the_nucleus_filtered_distribution():
    """Gumbel-max over noise keyed by (row, step) is a draw from softmax(logits / T) within the nucleus: 40,000
    rows of the same logits land on each token at its probability, never outside the nucleus, and the same key
    draws the same token."""
    logits = torch.tensor([2.0, 1.0, 0.5, -1.0, -3.0]).repeat(40_000, 1)
    decoding = Decoding(do_sample=True, temperature=0.8, top_p=0.9)
    keys = torch.arange(40_000)
    drawn = next_token(logits, decoding, keys=keys, step=3)
    probs = top_p_filter(logits[0] / 0.8, 0.9).softmax(-1)
    frequencies = torch.bincount(drawn, minlength=5).double() / len(drawn)
    assert torch.allclose(frequencies, probs.double(), atol=0.01) and bool(frequencies[probs == 0].eq(0).all())
    assert torch.equal(next_token(logits, decoding, keys=keys, step=3), drawn)
    assert not torch.equal(next_token(logits, decoding, keys=keys, step=4), drawn)  # another step, other draws


def test_keyed_sampling_gives_each_example_the_same_continuations_in_any_batch(causal, t5):
    """A code task's samples do not depend on dataset.eval_batch_size or the number of devices: each example's n
    continuations, decoded with the others or alone, are the same tokens (seq2seq and causal kinds)."""
    decoding, n = Decoding(do_sample=True, temperature=1.5, num_return_sequences=2), 2
    keys = torch.tensor([11, 12, 13])
    with torch.no_grad():
        for kind, backbone in ((CausalKind(), causal), (Seq2SeqKind(), t5)):
            embeds, mask = prompted(backbone, SOURCES)
            together = kind.generate(backbone, embeds, mask, 6, TOKENIZER, decoding, keys=keys)
            for i, source in enumerate(SOURCES):
                single = prompted(backbone, [source])
                alone = kind.generate(backbone, *single, 6, TOKENIZER, decoding, keys=keys[i : i + 1])
                width = alone.shape[1]
                assert torch.equal(together[i * n : (i + 1) * n, :width], alone), (kind.name, i)
                assert bool(together[i * n : (i + 1) * n, width:].eq(PAD).all())  # finished rows: padding after
            other = kind.generate(backbone, embeds, mask, 6, TOKENIZER, decoding, keys=keys + 100)
            assert not torch.equal(other, together)  # other keys, other samples
