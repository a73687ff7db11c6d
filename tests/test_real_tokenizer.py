"""Truncation and target lengths on real subwords: the t5-base SentencePiece tokenizer the DePT authors saved next to
their prompts (../shared/fixtures/t5-tokenizer). A byte-level tokenizer hides what real pieces do: "0" is two pieces
("▁", "0"), "not_entailment" five, and a cut passage must end on a whole piece."""

from __future__ import annotations

from pathlib import Path

import pytest
from helpers import task_datamodule

from smop.data.datamodule import encode

FOLDER = Path(__file__).resolve().parents[1].parent / "shared" / "fixtures" / "t5-tokenizer"
pytestmark = pytest.mark.skipif(
    not FOLDER.is_dir(), reason=f"the real t5-base tokenizer is not at {FOLDER} (../shared/fixtures)"
)


@pytest.fixture(scope="module")
def t5():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(FOLDER)


@pytest.mark.parametrize(
    ("task", "length"),
    [("rte", 6), ("multirc", 4), ("mnli", 3), ("cola", 3), ("stsb", 3)],  # pieces of the longest target, EOS included
)
def test_generation_length_is_the_longest_target_in_real_pieces(t5, task, length):
    """not_entailment: ▁not _ en tail ment </s>; False: ▁Fal s e </s>; "0": ▁ 0 </s>; STS-B's "2.4": ▁ 2.4 </s>."""
    assert task_datamodule(task, t5).max_target_length == length


def test_a_long_premise_is_cut_on_whole_pieces_so_the_hypothesis_and_eos_survive(t5):
    dm = task_datamodule("mnli", t5)
    premise = " ".join(["The committee postponed its decision on the unprecedented infrastructure budget."] * 40)
    example = {"premise": premise, "hypothesis": "A decision was delayed.", "label": 1}
    (ids,) = encode(dm.task, t5, [example], budget=64)
    assert len(ids) <= 64 and ids[-1] == t5.eos_token_id
    text = t5.decode(ids, skip_special_tokens=True)
    assert text.startswith("premise: The committee postponed") and text.endswith("hypothesis: A decision was delayed.")
    kept = text.removeprefix("premise: ").removesuffix(" hypothesis: A decision was delayed.")
    assert premise.startswith(kept) and len(kept) < len(premise)  # a prefix of the premise, whole pieces only


def test_a_long_answer_is_cut_to_max_target_length_with_the_eos_last(t5):
    dm = task_datamodule("squad_v2", t5, max_target_length=5)
    dm.setup()
    rows = [row for row in dm.splits["train"] if row["golds"]]
    assert all(len(row["labels"]) <= 5 and row["labels"][-1] == t5.eos_token_id for row in rows)
    longest = max(rows, key=lambda row: len(t5(row["golds"][0]).input_ids))
    assert len(t5(longest["golds"][0]).input_ids) > 5 and len(longest["labels"]) == 5
    assert t5.decode(longest["labels"][:-1]) == t5.decode(t5(longest["golds"][0]).input_ids[:4])
