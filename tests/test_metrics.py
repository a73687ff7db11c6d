"""Evaluation metrics against hand-computed values: normalisation, label lookup, accuracy, CB's macro-F1 with
invalid outputs, MultiRC's F1a and EM, and independence from how updates are split into batches."""

from __future__ import annotations

import pytest
import torch

from smop.metrics import RoutingCounts, TaskMetrics, normalize, to_label_index


def values(metrics: TaskMetrics) -> dict[str, float]:
    return {name: float(value) for name, value in metrics.compute().items()}


def run(
    names: list[str],
    num_classes: int,
    preds: list[int],
    target: list[int],
    groups: list[int] | None = None,
    chunks: list[int] | None = None,
) -> dict[str, float]:
    """TaskMetrics fed in batches of the given sizes (one batch by default)."""
    metrics = TaskMetrics(names, num_classes)
    groups = groups if groups is not None else list(range(len(preds)))
    chunks = chunks or [len(preds)]
    assert sum(chunks) == len(preds)
    start = 0
    for size in chunks:
        part = slice(start, start + size)
        metrics.update(torch.tensor(preds[part]), torch.tensor(target[part]), torch.tensor(groups[part]))
        start += size
    return values(metrics)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("Entailment", "entailment"),
        ("The Entailment.", "entailment"),
        ("not_entailment!", "notentailment"),  # the released normalize_answer removes "_" too
        ("  A   True  ", "true"),
        ("an apple, the pie", "apple pie"),
        ("answer theory", "answer theory"),  # articles only as whole words
        ("Not-Entailment", "notentailment"),
        ('"choice2"', "choice2"),
        ("False.</s>", "falses"),  # punctuation goes, letters stay
        ("", ""),
    ],
)
def test_normalize(text: str, expected: str) -> None:
    assert normalize(text) == expected


def test_to_label_index() -> None:
    words = ["entailment", "not_entailment"]
    outputs = [
        "entailment",
        "Not_Entailment.",
        "the entailment",
        "maybe",
        "",
        "not entailment",
        "entailment x",
        "notentailment",
        "not-entailment",
    ]
    assert to_label_index(outputs, words).tolist() == [0, 1, 0, -1, -1, -1, -1, 1, 1]
    with pytest.raises(ValueError, match="not distinct"):
        to_label_index(["a_b"], ["ab", "a_b"])
    assert to_label_index(["true", "FALSE", "yes"], ["False", "True"]).tolist() == [1, 0, -1]
    assert to_label_index(["choice2", "Choice1!", "choice"], ["choice1", "choice2"]).tolist() == [1, 0, -1]
    assert to_label_index([], words).dtype == torch.long


def test_accuracy_counts_invalid_outputs_wrong() -> None:
    result = run(["accuracy"], 2, preds=[0, 1, -1, 1, -1], target=[0, 0, 1, 1, 0])
    assert result["accuracy"] == pytest.approx(2 / 5)
    assert result["score"] == pytest.approx(2 / 5)
    assert run(["accuracy"], 2, [-1, -1], [0, 1])["accuracy"] == 0.0
    assert run(["accuracy"], 3, [2, 1, 0], [2, 1, 0])["accuracy"] == 1.0


def manual_macro_f1(preds: list[int], target: list[int], num_classes: int) -> float:
    """One-vs-rest F1 per real class (0/0 -> 0), averaged; -1 is no class."""
    scores = []
    for c in range(num_classes):
        tp = sum(p == c and t == c for p, t in zip(preds, target, strict=True))
        fp = sum(p == c and t != c for p, t in zip(preds, target, strict=True))
        fn = sum(p != c and t == c for p, t in zip(preds, target, strict=True))
        scores.append(2 * tp / (2 * tp + fp + fn) if tp + fp + fn else 0.0)
    return sum(scores) / num_classes


def test_cb_macro_f1_by_hand() -> None:
    # index:   0  1   2  3  4   5  6  7
    target = [0, 0, 0, 1, 1, 2, 2, 2]
    preds = [0, -1, 1, 1, -1, 2, 0, 2]
    # class 0: tp 1 (0), fp 1 (6), fn 2 (1 invalid, 2)  -> 2/5
    # class 1: tp 1 (3), fp 1 (2), fn 1 (4 invalid)     -> 2/4
    # class 2: tp 2 (5, 7), fp 0, fn 1 (6)             -> 4/5
    f1 = (2 / 5 + 2 / 4 + 4 / 5) / 3
    accuracy = 4 / 8
    result = run(["accuracy", "f1_macro"], 3, preds, target)
    assert result["f1_macro"] == pytest.approx(f1)
    assert result["accuracy"] == pytest.approx(accuracy)
    assert result["score"] == pytest.approx((accuracy + f1) / 2)
    assert manual_macro_f1(preds, target, 3) == pytest.approx(f1)
    # an invalid output is not a prediction of any real class: relabelling it as class 0 changes F1
    as_class0 = run(["accuracy", "f1_macro"], 3, [0 if p < 0 else p for p in preds], target)
    assert as_class0["f1_macro"] != pytest.approx(f1)
    assert as_class0["accuracy"] == pytest.approx(5 / 8)


def test_cb_macro_f1_matches_manual_arithmetic_on_random_outputs() -> None:
    generator = torch.Generator().manual_seed(0)
    for _ in range(5):
        target = torch.randint(0, 3, (97,), generator=generator).tolist()
        preds = torch.randint(-1, 3, (97,), generator=generator).tolist()
        result = run(["accuracy", "f1_macro"], 3, preds, target, chunks=[40, 7, 50])
        assert result["f1_macro"] == pytest.approx(manual_macro_f1(preds, target, 3), abs=1e-6)
        correct = sum(p == t for p, t in zip(preds, target, strict=True))
        assert result["accuracy"] == pytest.approx(correct / 97, abs=1e-6)


def test_multirc_f1a_and_em_by_hand() -> None:
    # question 10: all right; 11: an invalid output on a true answer; 12: right; 13: a false positive
    groups = [10, 10, 10, 11, 11, 12, 13, 13]
    target = [1, 0, 1, 0, 1, 1, 0, 0]
    preds = [1, 0, 1, 0, -1, 1, 1, 0]
    # F1a over answers (invalid = negative): tp 3, fp 1 (13), fn 1 (11) -> 6 / 8
    result = run(["f1a", "em"], 2, preds, target, groups)
    assert result["f1a"] == pytest.approx(6 / 8)
    assert result["em"] == pytest.approx(2 / 4)
    assert result["score"] == pytest.approx((6 / 8 + 2 / 4) / 2)
    # an invalid output on a false answer: fine for F1a (a negative), wrong for EM
    result = run(["f1a", "em"], 2, [1, -1], [1, 0], [5, 5])
    assert result["f1a"] == pytest.approx(1.0)
    assert result["em"] == 0.0


def test_em_groups_need_not_be_contiguous_or_small() -> None:
    base = 100_000
    groups = [3 * base + 1, 7 * base + 2, 3 * base + 1, 9, 7 * base + 2, 9]
    target = [1, 0, 0, 1, 1, 0]
    preds = [1, 0, 0, 1, 0, 0]  # question 7*base+2 has one wrong answer
    for chunks in ([6], [1, 1, 1, 1, 1, 1], [4, 2], [2, 3, 1]):
        assert run(["em"], 2, preds, target, groups, chunks)["em"] == pytest.approx(2 / 3)


@pytest.mark.parametrize(
    ("names", "num_classes"), [(["accuracy"], 2), (["accuracy", "f1_macro"], 3), (["f1a", "em"], 2)]
)
def test_results_do_not_depend_on_batching(names: list[str], num_classes: int) -> None:
    generator = torch.Generator().manual_seed(1)
    n = 120
    target = torch.randint(0, num_classes, (n,), generator=generator).tolist()
    preds = torch.randint(-1, num_classes, (n,), generator=generator).tolist()
    groups = torch.randint(0, 30, (n,), generator=generator).tolist()
    whole = run(names, num_classes, preds, target, groups)
    assert set(whole) == {*names, "score"}
    for chunks in ([1] * n, [17, 64, 39], [n - 1, 1]):
        split = run(names, num_classes, preds, target, groups, chunks)
        assert split == pytest.approx(whole)
    assert whole["score"] == pytest.approx(sum(whole[name] for name in names) / len(names))


def test_reset_starts_a_new_epoch() -> None:
    metrics = TaskMetrics(["accuracy", "f1a", "em"], 2)
    metrics.update(torch.tensor([0, 0]), torch.tensor([1, 1]), torch.tensor([0, 1]))
    assert values(metrics)["accuracy"] == 0.0
    metrics.reset()
    metrics.update(torch.tensor([1, 1]), torch.tensor([1, 1]), torch.tensor([0, 1]))
    assert values(metrics) == {"accuracy": 1.0, "f1a": 1.0, "em": 1.0, "score": 1.0}


def test_routing_counts() -> None:
    counts = RoutingCounts(4)
    counts.update(torch.tensor([0, 2, 2]))
    counts.update(torch.tensor([[3], [2]]))
    assert counts.compute().tolist() == [1, 0, 3, 1]


def test_an_empty_output_is_no_label_even_when_a_label_word_is_an_article():
    """The synthetic task's labels are "A" and "B": "A" must not normalise away and match an empty output."""
    assert to_label_index(["", "A", "a.", " B ", "the"], ["A", "B"]).tolist() == [-1, 0, 0, 1, -1]
    assert to_label_index(["", "The entailment"], ["entailment", "not_entailment"]).tolist() == [-1, 0]
