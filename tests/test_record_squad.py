"""ReCoRD (both layouts, template styles, a training row per answer) and SQuAD 2.0's official JSON documents."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from conftest import ROOT
from helpers import task_datamodule
from transformers import ByT5Tokenizer

from smop.checks import check_config
from smop.data import TaskDataModule
from smop.data.record import clean_passage, hub_rows
from smop.data.sources import sample_dir
from smop.data.tasks import Task, each_gold
from smop.metrics import MeanTextScore, exact_match, token_f1
from smop.run import run

TOKENIZER = ByT5Tokenizer()


def datamodule(task: str, **overrides) -> TaskDataModule:
    return task_datamodule(task, TOKENIZER, **overrides)


def decode(ids: list[int]) -> str:
    return TOKENIZER.decode(ids, skip_special_tokens=True)


def lines(folder, name: str) -> list[dict]:
    return [json.loads(line) for line in (folder / name).read_text(encoding="utf-8").splitlines()]


# a SuperGLUE ReCoRD line: two mentions of "Ana Ruiz" (deduplicated), a highlight after a full stop and one after none
PASSAGE = "Ana Ruiz won in Lyon.\n@highlight\nRuiz thanked Lyon\n@highlight\nNext: Graz"
NESTED = {
    "source": "made up",
    "idx": 7,
    "passage": {
        "text": PASSAGE,
        "entities": [
            {"start": 0, "end": 7},  # Ana Ruiz
            {"start": 16, "end": 19},  # Lyon
            {"start": 33, "end": 36},  # Ruiz
            {"start": 46, "end": 49},  # Lyon again
            {"start": 68, "end": 71},  # Graz
        ],
    },
    "qas": [
        {
            "idx": 0,
            "query": "@placeholder won the race",
            "answers": [
                {"start": 0, "end": 7, "text": "Ana Ruiz"},
                {"start": 33, "end": 36, "text": "Ruiz"},
                {"start": 0, "end": 7, "text": "Ana Ruiz"},  # the same answer twice: one gold
            ],
        },
        {"idx": 1, "query": "The next race is in @placeholder", "answers": [{"start": 68, "end": 71, "text": "Graz"}]},
    ],
}
CLEAN = "Ana Ruiz won in Lyon. Ruiz thanked Lyon. Next: Graz."
DEPT_INPUT = f"record query: @placeholder won the race entities: Ana Ruiz, Lyon, Ruiz, Graz passage: {CLEAN}"


def test_a_nested_official_line_becomes_one_hub_row_per_question():
    rows = hub_rows(NESTED)
    assert [row["query"] for row in rows] == ["@placeholder won the race", "The next race is in @placeholder"]
    assert rows[0]["entities"] == ["Ana Ruiz", "Lyon", "Ruiz", "Graz"]  # text[start:end+1], first occurrences
    assert rows[0]["entity_spans"]["text"] == ["Ana Ruiz", "Lyon", "Ruiz", "Lyon", "Graz"]
    assert rows[0]["answers"] == ["Ana Ruiz", "Ruiz"] and rows[1]["answers"] == ["Graz"]
    assert rows[1]["idx"] == {"passage": 7, "query": 1}
    assert clean_passage(PASSAGE) == CLEAN  # "." + highlight: a space; a bare highlight: ". "; a final "."
    assert clean_passage('He said "go!"\n@highlight\nDone.') == 'He said "go!" Done.'


def test_depts_template_on_a_fixed_record_and_the_fpt_style(tmp_path):
    (tmp_path / "train.jsonl").write_text("\n".join(json.dumps(NESTED) for _ in range(5)) + "\n")
    (tmp_path / "val.jsonl").write_text(json.dumps(NESTED) + "\n")  # SuperGLUE's name for the validation file
    dm = datamodule("record", source="dir", data_dir=str(tmp_path))
    dm.setup()
    assert decode(dm.splits["test"][0]["input_ids"]) == DEPT_INPUT
    assert [row["golds"] for row in dm.splits["test"]] == [["Ana Ruiz", "Ruiz"], ["Graz"]]
    assert dm.split_info["records"]["test"] == 2  # counted in questions
    fpt = datamodule("record", source="dir", data_dir=str(tmp_path), template_style="fpt")
    fpt.setup()
    assert decode(fpt.splits["test"][0]["input_ids"]) == DEPT_INPUT.removeprefix("record ")


def test_an_unknown_template_style_is_refused_naming_the_styles(make_cfg):
    with pytest.raises(ValueError, match=r"dataset.template_style=plain for record is not one of: dept, fpt"):
        datamodule("record", template_style="plain")
    cfg = make_cfg("dataset=record", "dataset.template_style=plain")
    assert cfg.dataset.template is None  # the interpolation leaves null, the check names the styles
    with pytest.raises(ValueError, match=r"template_style=plain for record is not one of: dept, fpt"):
        check_config(cfg)
    with pytest.raises(ValueError, match=r"cola has no template styles \(dataset.templates\)"):
        datamodule("cola", template_style="fpt")
    check_config(make_cfg("dataset=record", "dataset.template_style=fpt"))
    assert make_cfg("dataset=cola").dataset.template == datamodule("cola").task.template  # others unchanged


def test_training_has_a_row_per_unique_answer_and_evaluation_a_row_per_question():
    dm = datamodule("record", max_target_length=40)  # ByT5: a token per byte
    dm.setup()
    records = {name: dm.split_info["records"][name] for name in ("train", "val", "test")}
    assert records["train"] + records["val"] == len(lines(sample_dir("record"), "train.jsonl")) == 67
    assert [len(dm.splits[name]) for name in ("val", "test")] == [records["val"], records["test"]] == [7, 21]
    first = datamodule("record", train_targets="first", max_target_length=40)  # the same split, one row per question
    first.setup()
    assert len(first.splits["train"]) == records["train"]
    answers = sorted(gold for row in first.splits["train"] for gold in row["golds"])
    assert len(answers) > records["train"]  # some questions have several answers
    assert sorted(decode(row["labels"]) for row in dm.splits["train"]) == answers  # each answer trained on once
    assert dm.split_info["examples"]["train"] == len(dm.splits["train"]) == len(answers)
    assert all(decode(row["labels"]) == row["golds"][0] for row in dm.splits["train"])  # its target first, all kept


def test_the_sample_is_the_hubs_layout_with_consistent_offsets():
    for name in ("train.jsonl", "validation.jsonl"):
        for row in lines(sample_dir("record"), name):
            spans = row["entity_spans"]
            assert all(
                row["passage"][start : end + 1] == text
                for text, start, end in zip(spans["text"], spans["start"], spans["end"], strict=True)
            )
            assert row["entities"] == list(dict.fromkeys(spans["text"])) and set(row["answers"]) <= set(row["entities"])
            assert "\n@highlight\n" in row["passage"]
    rows = lines(sample_dir("record"), "train.jsonl") + lines(sample_dir("record"), "validation.jsonl")
    assert sum(len(row["answers"]) > 1 for row in rows) >= 10 and any(not row["passage"].isascii() for row in rows)


def test_a_malformed_record_names_its_file_and_line(tmp_path):
    bad = {**NESTED, "qas": [{**NESTED["qas"][0], "answers": [{"start": 0, "end": 2, "text": "Ana"}]}]}
    (tmp_path / "train.jsonl").write_text(json.dumps(NESTED) + "\n" + json.dumps(bad) + "\n")
    (tmp_path / "val.jsonl").write_text(json.dumps(NESTED) + "\n")
    with pytest.raises(ValueError, match=r"train.jsonl:2: malformed record record: qas\[0\]: answer\(s\) \['Ana'\]"):
        datamodule("record", source="dir", data_dir=str(tmp_path)).setup()
    outside = {**NESTED, "passage": {**NESTED["passage"], "entities": [{"start": 60, "end": 90}]}}
    (tmp_path / "train.jsonl").write_text(json.dumps(outside) + "\n")
    with pytest.raises(ValueError, match=r"train.jsonl:1: .*passage.entities\[0\] has start=60, end=90 outside"):
        datamodule("record", source="dir", data_dir=str(tmp_path)).setup()


def test_em_and_f1_take_the_best_gold_of_a_question():
    golds = [["Dana Whitcombe", "Whitcombe"], ["Dana Whitcombe", "Whitcombe"], ["Norway"]]
    preds = ["whitcombe", "Mayor Whitcombe", "Norway."]
    assert [exact_match(p, g) for p, g in zip(preds, golds, strict=True)] == [1.0, 0.0, 1.0]
    # "mayor whitcombe" against "dana whitcombe": P = R = 1/2, F1 1/2; against "whitcombe": P 1/2, R 1, F1 2/3
    assert token_f1(preds[1], golds[1]) == pytest.approx(2 / 3)
    em, f1 = MeanTextScore(exact_match), MeanTextScore(token_f1)
    em.update(preds, golds)
    f1.update(preds, golds)
    assert em.compute().item() == pytest.approx(2 / 3) and f1.compute().item() == pytest.approx(8 / 9)


def test_train_targets_each_is_for_text_targets():
    with pytest.raises(ValueError, match=r"dataset.train_targets=each trains on every gold text; boolq has"):
        datamodule("boolq", train_targets="each")
    with pytest.raises(ValueError, match=r"dataset.train_targets=all for record; allowed: first, each"):
        datamodule("record", train_targets="all")
    with pytest.raises(ValueError, match=r"format=record \(record\) answers with entity names: set target: text"):
        Task("record", "{query}", [], format="record")
    rows = list(each_gold([{"golds": ["b", "c", "b"], "group": 0}, {"golds": [], "group": 1}]))
    assert rows == [{"golds": ["b", "c"], "group": 0}, {"golds": ["c", "b"], "group": 0}, {"golds": [], "group": 1}]


@pytest.mark.slow
@pytest.mark.parametrize("model", ["t5-tiny", "llama-tiny"])
def test_record_runs_end_to_end_on_its_sample(make_cfg, model):
    overrides = [f"model={model}", "dataset=record", "method=prompt_tuning", "method.prompt_length=4"]
    results = run(
        make_cfg(*overrides, "dataset.max_length=160", "dataset.max_target_length=8", "trainer.fast_dev_run=true")
    )
    assert results["status"] == "completed" and set(results["metrics"]["test"]) == {"squad_em", "squad_f1", "score"}
    assert results["split"]["examples"]["train"] > results["split"]["records"]["train"]  # a row per answer


# --- SQuAD 2.0's official documents ------------------------------------------------------------------------
def squad_document(questions: int = 2) -> dict:
    context = "Mont Blanc is 4,806 metres high. It lies between France and Italy."
    qas = [
        {"id": "q0", "question": "How high is Mont Blanc?", "is_impossible": False,
         "answers": [{"text": "4,806 metres", "answer_start": 14}, {"text": "4,806", "answer_start": 14}]},
        {"id": "q1", "question": "Who climbed it first in 1999?", "is_impossible": True, "answers": [],
         "plausible_answers": [{"text": "France", "answer_start": 49}]},
    ]  # fmt: skip
    paragraphs = [{"context": context, "qas": qas[:questions]}, {"context": "Zürich is in Switzerland.", "qas": [
        {"id": "q2", "question": "Where is Zürich?", "is_impossible": False,
         "answers": [{"text": "Switzerland", "answer_start": 13}]}]}]  # fmt: skip
    return {"version": "v2.0", "data": [{"title": "Alps", "paragraphs": paragraphs}]}


def write_official(folder, document: dict) -> None:
    for name in ("train-v2.0.json", "dev-v2.0.json"):
        (folder / name).write_text(json.dumps(document, ensure_ascii=False), encoding="utf-8")


def test_squad_official_files_read_into_the_hubs_rows(make_cfg, tmp_path):
    write_official(tmp_path, squad_document())
    check_config(make_cfg("dataset=squad_v2", "dataset.source=dir", f"dataset.data_dir={tmp_path}"))
    dm = datamodule("squad_v2", source="dir", data_dir=str(tmp_path))
    dm.setup()
    test = dm.splits["test"]
    assert [row["golds"] for row in test] == [["4,806 metres", "4,806"], [], ["Switzerland"]]
    assert decode(test[1]["labels"]) == "no answer"  # unanswerable: plausible answers are not gold
    assert decode(test[2]["input_ids"]) == "question: Where is Zürich? context: Zürich is in Switzerland."
    rows = dm._raw("validation")
    assert rows[0] == {
        "id": "q0",
        "title": "Alps",
        "context": squad_document()["data"][0]["paragraphs"][0]["context"],
        "question": "How high is Mont Blanc?",
        "answers": {"text": ["4,806 metres", "4,806"], "answer_start": [14, 14]},
    }
    assert rows[1]["answers"] == {"text": [], "answer_start": []}


def test_a_malformed_squad_document_names_the_file_and_json_path(tmp_path):
    document = squad_document()
    del document["data"][0]["paragraphs"][1]["qas"][0]["question"]
    write_official(tmp_path, document)
    with pytest.raises(
        ValueError,
        match=r"train-v2.0.json: malformed squad document: data\[0\].paragraphs\[1\].qas\[0\] has no 'question'",
    ):  # noqa: E501
        datamodule("squad_v2", source="dir", data_dir=str(tmp_path)).setup()
    document = squad_document()
    document["data"][0]["paragraphs"][0]["qas"][1]["answers"] = [{"text": "France", "answer_start": 49}]
    write_official(tmp_path, document)
    with pytest.raises(ValueError, match=r"data\[0\].paragraphs\[0\].qas\[1\] is_impossible but has 1 answer"):
        datamodule("squad_v2", source="dir", data_dir=str(tmp_path)).setup()
    (tmp_path / "train-v2.0.json").write_text('{"version": "v2.0", "data": [')
    with pytest.raises(ValueError, match=r"train-v2.0.json: not one JSON document \(squad format\)"):
        datamodule("squad_v2", source="dir", data_dir=str(tmp_path)).setup()


def test_a_folder_with_both_layouts_for_a_split_is_refused(tmp_path):
    write_official(tmp_path, squad_document())
    (tmp_path / "train.jsonl").write_text("{}\n")
    with pytest.raises(ValueError, match=r"holds both train.jsonl \(the hub's layout\) and train-v2.0.json"):
        datamodule("squad_v2", source="dir", data_dir=str(tmp_path)).setup()
    (tmp_path / "train.jsonl").unlink()
    (tmp_path / "dev-v2.0.json").unlink()
    with pytest.raises(FileNotFoundError, match=r"expected one of validation.jsonl, .*, dev-v2.0.json"):
        datamodule("squad_v2", source="dir", data_dir=str(tmp_path)).setup()
    with pytest.raises(ValueError, match=r"official_format=None for squad_v2: give both"):
        datamodule("squad_v2", official_format=None)


# --- the FPT experiment -------------------------------------------------------------------------------------
def test_fpt_record_composes_with_fpts_template_lengths_and_stacks(make_cfg):
    cfg = make_cfg("experiment=fpt_record")
    assert cfg.dataset.name == "record" and cfg.model.name_or_path.endswith("t5-large-lm-adapt")
    assert cfg.dataset.template == "query: {query} entities: {entities} passage: {passage}"
    assert (cfg.dataset.max_target_length, cfg.dataset.train_targets, cfg.seed) == (200, "each", 2022)
    assert list(cfg.callbacks.fpt.stacks) == ["encoder", "decoder"] and cfg.trainer.max_steps == 30000
    check_config(cfg)


def test_the_fpt_grid_lists_the_record_job(tmp_path):
    out = subprocess.run(
        [sys.executable, str(ROOT / "sweep.py"), "fpt", "--list", "--sweep-dir", str(tmp_path)],
        capture_output=True, text=True, cwd=ROOT, env=os.environ.copy(), timeout=300,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    job = [line.split() for line in out.stdout.splitlines() if line.startswith("fpt-record-")]
    assert job and job[0][0] == "fpt-record-s2022"
    assert job[0][2:] == ["python", "train.py", "experiment=fpt_record", "dataset=record", "seed=2022"]


def test_record_inputs_to_label_are_read_as_in_training():
    from smop.predict import unlabeled_examples

    dm = datamodule("record")
    unlabelled = {**NESTED, "qas": [{"idx": 3, "query": "@placeholder won the race"}]}  # the test file: no answers
    pairs = unlabeled_examples(dm.task, unlabelled, 0)
    assert [idx for idx, _ in pairs] == [{"passage": 7, "query": 3}]
    assert dm.task.template.format(**pairs[0][1]) == DEPT_INPUT
    hub = hub_rows(NESTED)[0]
    assert dm.task.template.format(**unlabeled_examples(dm.task, hub, 0)[0][1]) == DEPT_INPUT
