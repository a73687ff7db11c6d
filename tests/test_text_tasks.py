"""Free-text targets (QA, summaries): SQuAD EM/F1 with SQuAD 2.0's no-answer rule, ROUGE-1/2/L, the no-answer
text, the tasks' templates and bundled samples, and each task end to end."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import CONFIGS
from helpers import task_datamodule
from omegaconf import OmegaConf
from transformers import ByT5Tokenizer

from smop.data import TaskDataModule
from smop.data.sources import sample_dir
from smop.data.tasks import Task
from smop.metrics import MeanTextScore, TaskMetrics, exact_match, map_no_answer, token_f1

TEXT_TASKS = ["squad_v2", "newsqa", "searchqa", "hotpotqa", "nq", "xsum"]
TOKENIZER = ByT5Tokenizer()


def datamodule(task: str, **overrides) -> TaskDataModule:
    return task_datamodule(task, TOKENIZER, **overrides)


def decode(ids: list[int]) -> str:
    return TOKENIZER.decode([i for i in ids if i >= 0], skip_special_tokens=True)


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


# --- tasks -------------------------------------------------------------------------------------------------------
KNOWN = {  # a record in the hub's layout -> (input text, target text, golds)
    "squad_v2": (
        {
            "id": "1",
            "title": "T",
            "context": "Ann won.",
            "question": "Who won?",
            "answers": {"text": ["Ann", "Ann"], "answer_start": [0, 0]},
        },
        "question: Who won? context: Ann won.",
        "Ann",
        ["Ann", "Ann"],
    ),
    "newsqa": (
        {"context": "Rain fell.", "question": "What fell?", "answers": ["Rain", "rain"], "key": "k", "labels": []},
        "question: What fell? context: Rain fell.",
        "Rain",
        ["Rain", "rain"],
    ),
    **{
        task: (
            {"context": "Ann won.", "question": "Who won?", "answers": ["Ann", "ann", "Ann."], "key": "k"},
            "question: Who won? context: Ann won.",
            "Ann",
            ["Ann", "ann", "Ann."],
        )
        for task in ("searchqa", "hotpotqa", "nq")
    },
    "xsum": ({"document": "A long story.", "summary": "Short.", "id": "7"}, "A long story.", "Short.", ["Short."]),
}


@pytest.mark.parametrize("task", TEXT_TASKS)
def test_template_target_and_golds(task, tmp_path):
    record, text, target, golds = KNOWN[task]
    for split in ("train", "validation"):
        (tmp_path / f"{split}.jsonl").write_text("\n".join(json.dumps(record) for _ in range(10)) + "\n")
    dm = datamodule(task, source="dir", data_dir=str(tmp_path))
    dm.setup()
    row = dm.splits["test"][0]
    assert decode(row["input_ids"]) == text and decode(row["labels"]) == target and row["golds"] == golds
    batch = dm.collate(dm.splits["test"][:3])
    assert batch["golds"] == [golds] * 3


def test_an_unanswerable_question_learns_the_no_answer_text(tmp_path):
    record = {"id": "1", "title": "T", "context": "C.", "question": "Q?", "answers": {"text": [], "answer_start": []}}
    for split in ("train", "validation"):
        (tmp_path / f"{split}.jsonl").write_text("\n".join(json.dumps(record) for _ in range(10)) + "\n")
    dm = datamodule("squad_v2", source="dir", data_dir=str(tmp_path))
    dm.setup()
    assert decode(dm.splits["test"][0]["labels"]) == "no answer" and dm.splits["test"][0]["golds"] == []
    (tmp_path / "train.jsonl").write_text(json.dumps({**record, "answers": {"text": []}}) + "\n")
    with pytest.raises(ValueError, match=r"train.jsonl:1: malformed newsqa record: answers has no non-empty gold"):
        datamodule("newsqa", source="dir", data_dir=str(tmp_path)).setup()


def test_a_long_summary_is_cut_to_max_target_length_with_its_eos(tmp_path):
    record = {"document": "D.", "summary": "word " * 100, "id": "1"}
    for split in ("train", "validation"):
        (tmp_path / f"{split}.jsonl").write_text("\n".join(json.dumps(record) for _ in range(10)) + "\n")
    dm = datamodule("xsum", source="dir", data_dir=str(tmp_path), max_target_length=12)
    dm.setup()
    labels = dm.splits["train"][0]["labels"]
    assert len(labels) == 12 and labels[-1] == TOKENIZER.eos_token_id and dm.max_target_length == 12
    assert decode(labels) == ("word " * 100)[:11]  # ByT5: one token per byte


def test_max_target_length_is_required_for_text_targets_and_refused_for_labels():
    with pytest.raises(ValueError, match=r"dataset.max_target_length=None for xsum \(target=text\): a text target"):
        datamodule("xsum", max_target_length=None)
    with pytest.raises(ValueError, match=r"dataset.max_target_length=0 for xsum: give an integer >= 1"):
        datamodule("xsum", max_target_length=0)
    options = OmegaConf.to_container(OmegaConf.load(CONFIGS / "dataset" / "boolq.yaml"))
    options = {k: v for k, v in options.items() if k not in ("_target_", "epochs")}
    with pytest.raises(ValueError, match=r"dataset.max_target_length=5 for boolq \(target=labels\)"):
        TaskDataModule(tokenizer=TOKENIZER, max_target_length=5, **options)


@pytest.mark.parametrize("task", TEXT_TASKS)
def test_bundled_sample_parses_in_the_hub_layout(task):
    dm = datamodule(task)
    dm.setup()
    rows = {split: dm.splits[split] for split in ("train", "val", "test")}
    assert len(rows["train"]) + len(rows["val"]) >= 60 and len(rows["test"]) >= 20
    golds = [row["golds"] for split in rows.values() for row in split]
    assert all(all(isinstance(gold, str) and gold.strip() for gold in example) for example in golds)
    assert any(any(not gold.isascii() for gold in example) for example in golds)  # unicode
    records = [json.loads(line) for line in (sample_dir(task) / "train.jsonl").read_text().splitlines()]
    longest = max(len(TOKENIZER(record[dm.task.truncate_field]).input_ids) for record in records)
    assert longest > dm.budget >= max(len(row["input_ids"]) for split in rows.values() for row in split)  # truncated
    if task != "xsum":
        assert sum(len(example) > 1 for example in golds) >= 20  # several gold answers
    if task == "squad_v2":
        assert all(sum(not row["golds"] for row in split) >= 2 for split in (rows["train"], rows["test"]))


def test_predictions_of_a_text_task_write_the_answer_and_the_raw_output():
    import io
    from types import SimpleNamespace

    from smop.predict import write_predictions

    task = Task("squad_v2", "{question}", [], metrics=["squad_em"], target="text", target_field="answers",
                no_answer_text="no answer")  # fmt: skip
    loaded = SimpleNamespace(task=task, generate=lambda examples, decoding: [["Paris"], ["No answer."]])
    out = io.StringIO()
    assert write_predictions(loaded, [(0, {"question": "a"}), (1, {"question": "b"})], out) == 0
    lines = [json.loads(line) for line in out.getvalue().splitlines()]
    assert lines == [{"idx": 0, "answer": "Paris", "output": "Paris"}, {"idx": 1, "answer": "", "output": "No answer."}]
