"""Free-text targets (QA, summaries): SQuAD EM/F1 with SQuAD 2.0's no-answer rule, ROUGE-1/2/L, the no-answer
text, the tasks' templates and bundled samples, and each task end to end."""

from __future__ import annotations

import pytest
import torch

from smop.data.tasks import Task
from smop.metrics import MeanTextScore, TaskMetrics, exact_match, map_no_answer, token_f1


# --- metrics -----------------------------------------------------------------------------------------------------
def test_exact_match_normalises_case_punctuation_articles_and_spaces():
    assert exact_match("The  Eiffel Tower!", ["eiffel tower"]) == 1.0
    assert exact_match("an eiffel, tower", ["Eiffel Tower"]) == 1.0
    assert exact_match("Eiffel Towers", ["Eiffel Tower"]) == 0.0
    assert exact_match("Paris", ["London", "paris."]) == 1.0  # max over golds


def test_token_f1_is_the_best_overlap_over_golds():
    # "the" is dropped: pred [big, red, dog]; "red cat": 1 shared -> P 1/3, R 1/2, F 0.4; the second: P 1, R 3/4
    assert token_f1("the big red dog", ["red cat"]) == pytest.approx(0.4)
    assert token_f1("the big red dog", ["red cat", "big red dog runs"]) == pytest.approx(6 / 7)
    assert token_f1("dog dog", ["dog"]) == pytest.approx(2 * 0.5 * 1 / 1.5)  # counts, not sets
    assert token_f1("cat", ["dog"]) == 0.0


@pytest.mark.parametrize("golds", [[], [""], ["  "], [" . "]])
def test_a_question_without_an_answer_scores_only_an_empty_prediction(golds):
    assert exact_match("", golds) == 1.0 and token_f1("", golds) == 1.0
    assert exact_match("Paris", golds) == 0.0 and token_f1("Paris", golds) == 0.0
    assert exact_match("", ["Paris"]) == 0.0 and token_f1("", ["Paris"]) == 0.0


def test_the_no_answer_text_counts_as_the_empty_answer():
    assert map_no_answer(["No answer.", "Paris", " no  ANSWER", "no answers"], "no answer") == [
        "",
        "Paris",
        "",
        "no answers",
    ]
    assert map_no_answer(["no answer"], None) == ["no answer"]


def test_squad_metrics_are_means_over_examples_as_fractions():
    metrics = TaskMetrics(["squad_em", "squad_f1"], num_classes=0)
    preds = ["Eiffel Tower", "big red dog", "", "Paris"]
    golds = [["the Eiffel Tower"], ["red cat", "big red dog runs"], [], []]
    metrics.update(preds, golds, torch.arange(4))
    values = metrics.compute()
    assert values["squad_em"].item() == pytest.approx((1 + 0 + 1 + 0) / 4)
    assert values["squad_f1"].item() == pytest.approx((1 + 6 / 7 + 1 + 0) / 4)
    assert values["score"].item() == pytest.approx((0.5 + (2 + 6 / 7) / 4) / 2)


def test_squad_state_is_sums_that_merge_across_processes():
    """What DDP's reduction does: two processes' sums added give the mean over all examples."""
    first, second = MeanTextScore(exact_match), MeanTextScore(exact_match)
    first.update(["a", "b"], [["a"], ["c"]])
    second.update(["d"], [["d"]])
    assert all(isinstance(state, torch.Tensor) for state in (first.total, first.count))
    first.merge_state(second)
    assert first.compute().item() == pytest.approx(2 / 3)


def test_rouge_on_a_hand_example_an_empty_prediction_and_several_golds():
    metrics = TaskMetrics(["rouge1", "rouge2", "rougeL"], num_classes=0)
    # unigrams: the x2, cat, on, mat shared -> 5/6; bigrams: "the cat", "on the", "the mat" of 5; LCS 5 of 6
    metrics.update(["The cat sat on the mat.", ""], [["the cat lay on the mat"], ["a summary"]], torch.arange(2))
    values = metrics.compute()
    assert values["rouge1"].item() == pytest.approx(5 / 6 / 2, abs=1e-5)
    assert values["rouge2"].item() == pytest.approx(3 / 5 / 2, abs=1e-5)
    assert values["rougeL"].item() == pytest.approx(5 / 6 / 2, abs=1e-5)
    best = TaskMetrics(["rouge1"], num_classes=0)
    best.update(["the cat sat"], [["dogs run", "the cat sat"]], torch.arange(1))
    assert best.compute()["rouge1"].item() == pytest.approx(1.0)
    empty = TaskMetrics(["rouge1", "rouge2", "rougeL"], num_classes=0)
    empty.update([""], [["anything at all"]], torch.arange(1))
    assert all(value.item() == 0.0 for value in empty.compute().values())


def test_a_text_metric_on_a_label_task_and_a_label_metric_on_a_text_task_are_refused():
    with pytest.raises(ValueError, match=r"metric\(s\) \['squad_f1'\] do not score a labels target"):
        Task("boolq", "{question}", ["False", "True"], metrics=["squad_f1"])
    with pytest.raises(ValueError, match=r"metric\(s\) \['accuracy'\] do not score a text target"):
        Task("squad_v2", "{question}", [], metrics=["accuracy"], target="text", target_field="answers")
    with pytest.raises(ValueError, match=r"squad_v2 has a text target: set dataset.target_field"):
        Task("squad_v2", "{question}", [], metrics=["squad_em"], target="text")
