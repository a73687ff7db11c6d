"""WinoGrande, Yelp-2, SciTail and PAWS as config data: DePT's templates and targets (WinoGrande's intended option
template, not the reference's option1 twice), a label read from another field than `label`, Yelp tested on the hub's
`test` split and PAWS on its labelled test split, the hub config passed as written, and every task end to end."""

from __future__ import annotations

import json
import sys
import types

import pytest
from helpers import task_datamodule
from transformers import ByT5Tokenizer

import smop.data.sources as sources
from smop.data import TaskDataModule
from smop.data.sources import sample_dir
from smop.run import run

TASKS = ["winogrande", "yelp_polarity", "scitail", "paws"]
# a record in the hub's layout -> DePT's input text and target
KNOWN = {
    "winogrande": (
        {
            "sentence": "Ann gave Beth a book because _ wanted it.",
            "option1": "Ann",
            "option2": "Beth",
            "answer": "2",
        },
        "sentence: Ann gave Beth a book because _ wanted it. option0: Ann option1: Beth",
        "1",
    ),
    "yelp_polarity": ({"label": 0, "text": "Cold food. Rude staff."}, "sentence: Cold food. Rude staff.", "0"),
    "scitail": (
        {
            "sentence1": "Ice floats.",
            "sentence2": "Ice melts.",
            "annotator_labels": ["neutral"],
            "gold_label": "neutral",
        },
        "premise: Ice floats. hypothesis: Ice melts.",
        "1",
    ),
    "paws": (
        {"id": 1, "sentence1": "A went to B.", "sentence2": "B went to A.", "label": 0},
        "sentence1: A went to B. sentence2: B went to A.",
        "0",
    ),
}
TOKENIZER = ByT5Tokenizer()


def datamodule(task: str, **overrides) -> TaskDataModule:
    return task_datamodule(task, TOKENIZER, **overrides)


def decoded(ids: list[int]) -> str:
    return TOKENIZER.decode(ids, skip_special_tokens=True)


def write(folder, split: str, rows: list[dict]) -> None:
    (folder / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def sample_rows(task: str, split: str) -> list[dict]:
    return [json.loads(line) for line in (sample_dir(task) / f"{split}.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("task", TASKS)
def test_template_and_target_are_depts(task, tmp_path):
    record, text, target = KNOWN[task]
    dm = datamodule(task)
    for split in ("train", dm.split_names["validation"]):
        write(tmp_path, split, [record] * 10)
    dm = datamodule(task, source="dir", data_dir=str(tmp_path))
    dm.setup()
    row = dm.splits["test"][0]
    assert decoded(row["input_ids"]) == text and decoded(row["labels"]) == target


def test_winogrande_fills_each_option_once_and_answer_2_is_target_1():
    dm = datamodule("winogrande")
    dm.setup()
    first = sample_rows("winogrande", "validation")[0]
    row = dm.splits["test"][0]
    assert decoded(row["input_ids"]).endswith(f"option0: {first['option1']} option1: {first['option2']}")
    assert decoded(row["labels"]) == str(int(first["answer"]) - 1)


@pytest.mark.parametrize("task", TASKS)
def test_bundled_sample_has_every_class_in_the_hub_layout(task):
    dm = datamodule(task)
    dm.setup()
    assert len(dm.splits["train"]) + len(dm.splits["val"]) == 64 and len(dm.splits["test"]) == 24
    for split in ("train", "val", "test"):
        assert {row["label_index"] for row in dm.splits[split]} == {0, 1}
    labels = [r[dm.task.label_field] for r in sample_rows(task, "train")]
    assert labels.count(dm.task.label_names[0] if dm.task.label_names else 0) == 32  # balanced, as the hub writes it


def test_a_record_without_its_label_field_is_refused_by_name(tmp_path, monkeypatch):
    """A file is checked record by record; hub rows are refused when flattened."""
    record = {k: v for k, v in KNOWN["winogrande"][0].items() if k != "answer"}
    write(tmp_path, "train", [{**record, "label": 1}])  # a `label` is no answer
    write(tmp_path, "validation", [KNOWN["winogrande"][0]])
    with pytest.raises(
        ValueError, match=r"train.jsonl:1: malformed winogrande record: missing field\(s\) \['answer'\]"
    ):
        datamodule("winogrande", source="dir", data_dir=str(tmp_path)).setup()
    monkeypatch.setattr(sources, "_load_hub", lambda name, config, split: [record] * 4)
    with pytest.raises(ValueError, match=r"winogrande record has no label field 'answer' \(dataset.label_field\)"):
        datamodule("winogrande", source="hub").setup()


def test_scitail_reads_gold_label_strings_and_refuses_another():
    dm = datamodule("scitail", split_protocol="dept")
    dm.setup()
    assert dm.split_info["records"] == {"train": 64, "val": 12, "test": 12}  # small: the halves of validation
    assert dm.task.label_index("entailment") == 0 and dm.task.label_index("neutral") == 1
    with pytest.raises(ValueError, match=r"label 'contradiction' is not one of \['entailment', 'neutral'\]"):
        dm.task.label_index("contradiction")


def test_yelp_tests_on_the_hubs_test_split(monkeypatch):
    """DePT's `large` rule on the hub: 1,000 training rows validate, the `test` split (there is no validation) tests."""
    train = [{"label": i % 2, "text": f"review {i}"} for i in range(1010)]
    test = [{"label": i % 2, "text": f"test review {i}"} for i in range(6)]
    calls = []

    def fake_hub(name, config, split):
        calls.append((name, config, split))
        return {"train": train, "test": test}[split]

    monkeypatch.setattr(sources, "_load_hub", fake_hub)
    dm = datamodule("yelp_polarity", source="hub", split_protocol="dept")
    dm.setup()
    assert sorted(calls) == [("fancyzhx/yelp_polarity", "plain_text", s) for s in ("test", "train")]
    assert dm.split_info["records"] == {"train": 10, "val": 1000, "test": 6}
    assert decoded(dm.splits["test"][0]["input_ids"]) == "sentence: test review 0"
    smop = datamodule("yelp_polarity")  # SMoP's protocol tests on the same file: the bundled test.jsonl
    smop.setup()
    assert decoded(smop.splits["test"][0]["input_ids"])[10:60] == sample_rows("yelp_polarity", "test")[0]["text"][:50]
    with pytest.raises(ValueError, match=r"split_protocol=official tests on a labelled official test file"):
        datamodule("yelp_polarity", split_protocol="official").setup()  # its test file already is the validation one


@pytest.mark.parametrize("protocol", ["dept", "official"])
def test_paws_validates_on_validation_and_tests_on_its_labelled_test_split(protocol):
    dm = datamodule("paws", split_protocol=protocol)
    dm.setup()
    assert dm.split_info["records"] == {"train": 64, "val": 24, "test": 24}
    template = "sentence1: {sentence1} sentence2: {sentence2}"
    for split, role in (("val", "validation"), ("test", "test")):
        assert decoded(dm.splits[split][0]["input_ids"]) == template.format(**sample_rows("paws", role)[0])


@pytest.mark.parametrize("config", [None, "plain_text"])
def test_the_hub_config_is_passed_as_written(monkeypatch, config):
    """A null hub_config is the dataset's unnamed config (None), not the task's name."""
    calls = []

    def load_dataset(name, config, split):
        calls.append((name, config, split))
        return [{"label": 1, "text": "Great."}]

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))
    dm = datamodule("yelp_polarity", source="hub", hub_config=config)
    assert sources.load_split_records(dm.task, "hub", None, dm.hub_name, config, "train") == [
        {"label": 1, "text": "Great."}
    ]
    assert calls == [("fancyzhx/yelp_polarity", config, "train")]


def test_k_shot_reads_the_tasks_own_label_field():
    """WinoGrande's class is its `answer`: k-shot keeps K rows of each answer."""
    dm = datamodule("winogrande", k_shot=3)
    dm.setup()
    assert sorted(row["label_index"] for row in dm.splits["train"]) == [0, 0, 0, 1, 1, 1]


# --- WSC: T5's span marking by word index ------------------------------------------------------------------------
WSC_RECORD = {
    "text": "The trophy doesn't fit into the brown suitcase because it is too large.",
    "span1_index": 0,
    "span2_index": 9,
    "span1_text": "The trophy",
    "span2_text": "it",
    "idx": 0,
    "label": 1,
}


def test_wsc_marks_its_spans_by_word_index_as_t5():
    from smop.data.tasks import mark_spans

    marked = "* The trophy * doesn't fit into the brown suitcase because # it # is too large."
    assert mark_spans(WSC_RECORD) == marked
    # a span text with regex characters is only compared, never compiled (the reference's regex breaks on it)
    odd = {**WSC_RECORD, "text": "Mr. (A) saw Bo because he ran.", "span1_text": "Mr. (A)", "span2_index": 5}
    odd["span2_text"] = "he"
    assert mark_spans(odd) == "* Mr. (A) * saw Bo because # he # ran."
    with pytest.raises(ValueError, match=r"span2_text 'it' is not at word 8 of the text"):
        mark_spans({**WSC_RECORD, "span2_index": 8})


def test_wsc_template_target_and_sample(tmp_path):
    for split in ("train", "val"):
        (tmp_path / f"{split}.jsonl").write_text("\n".join(json.dumps({**WSC_RECORD, "idx": i}) for i in range(10)))
    dm = datamodule("wsc", source="dir", data_dir=str(tmp_path))
    dm.setup()
    row = dm.splits["test"][0]
    assert (
        decoded(row["input_ids"])
        == "text: * The trophy * doesn't fit into the brown suitcase because # it # is too large."
    )
    assert decoded(row["labels"]) == "1"
    sample = datamodule("wsc")
    sample.setup()
    assert {r["label_index"] for r in sample.splits["test"]} == {0, 1} and len(sample.splits["test"]) >= 20


@pytest.mark.slow
def test_wsc_runs_end_to_end(make_cfg):
    overrides = ["dataset=wsc", "method=prompt_tuning", "method.prompt_length=4", "trainer.fast_dev_run=true"]
    assert run(make_cfg(*overrides, "callbacks=none"))["status"] == "completed"
