"""GLUE as config data: DePT's templates and targets, the hub's field layout read from the bundled samples and from a
folder of split files (JSON lines or Parquet), binary F1 and Matthews correlation with a no-label-word output counted
wrong, and every task end to end."""

from __future__ import annotations

import json

import pytest
import torch
from helpers import task_datamodule
from transformers import ByT5Tokenizer

from smop.data import TaskDataModule
from smop.data.sources import sample_dir
from smop.data.tasks import Task
from smop.metrics import TaskMetrics
from smop.run import run

GLUE = ["cola", "sst2", "mrpc", "qqp", "mnli", "qnli", "glue_rte"]
# a record in the hub's layout -> DePT's input text (tasks.py: "field: value" pieces joined by spaces, no prefix)
KNOWN = {
    "cola": ({"sentence": "The boy quickly ran.", "label": 1}, "sentence: The boy quickly ran."),
    "sst2": ({"sentence": "a gorgeous film", "label": 1}, "sentence: a gorgeous film"),
    "mrpc": ({"sentence1": "A b.", "sentence2": "C d.", "label": 0}, "sentence1: A b. sentence2: C d."),
    "qqp": ({"question1": "Why?", "question2": "How?", "label": 0}, "question1: Why? question2: How?"),
    "mnli": ({"premise": "P.", "hypothesis": "H.", "label": 2}, "premise: P. hypothesis: H."),
    "qnli": ({"question": "Who?", "sentence": "Ann did.", "label": 0}, "question: Who? sentence: Ann did."),
    "glue_rte": ({"sentence1": "X.", "sentence2": "Y.", "label": 1}, "sentence1: X. sentence2: Y."),
}
TOKENIZER = ByT5Tokenizer()


def datamodule(task: str, **overrides) -> TaskDataModule:
    return task_datamodule(task, TOKENIZER, **overrides)


@pytest.mark.parametrize("task", GLUE)
def test_template_and_target_are_depts(task, tmp_path):
    record, text = KNOWN[task]
    for split in datamodule(task).split_names.values():
        rows = [{**record, "idx": i} for i in range(10)]
        (tmp_path / f"{split}.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    dm = datamodule(task, source="dir", data_dir=str(tmp_path))
    dm.setup()
    row = dm.splits["test"][0]
    assert TOKENIZER.decode(row["input_ids"], skip_special_tokens=True) == text
    assert TOKENIZER.decode(row["labels"], skip_special_tokens=True) == str(record["label"])


@pytest.mark.parametrize("task", GLUE)
def test_bundled_sample_has_every_class_in_the_hub_layout(task):
    dm = datamodule(task)
    dm.setup()
    assert len(dm.splits["train"]) + len(dm.splits["val"]) >= 60 and len(dm.splits["test"]) >= 20
    for split in ("train", "test"):
        assert {row["label_index"] for row in dm.splits[split]} == set(range(len(dm.task.label_words)))


def test_mnli_tests_on_validation_matched_and_reads_parquet(tmp_path):
    """A folder in the hub's layout: train as Parquet, the matched validation as JSON lines; a bad Parquet row is
    named by its row number."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [{"premise": f"p{i}", "hypothesis": "h", "label": i % 3, "idx": i} for i in range(30)]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "train.parquet")
    matched = [{"premise": "matched", "hypothesis": "h", "label": i % 3, "idx": i} for i in range(6)]
    (tmp_path / "validation_matched.jsonl").write_text("\n".join(json.dumps(r) for r in matched) + "\n")
    dm = datamodule(
        "mnli", source="dir", data_dir=str(tmp_path), splits={"train": "train", "validation": "validation_matched"}
    )
    dm.setup()
    assert len(dm.splits["test"]) == 6 and "test_alt" not in dm.splits
    assert TOKENIZER.decode(dm.splits["test"][0]["input_ids"], skip_special_tokens=True).startswith("premise: matched")
    pq.write_table(
        pa.Table.from_pylist([*rows[:4], {"premise": "no hypothesis", "label": 0, "idx": 4}]),
        tmp_path / "train.parquet",
    )
    with pytest.raises(ValueError, match=r"train.parquet: row 5: malformed mnli record: missing field"):
        datamodule(
            "mnli", source="dir", data_dir=str(tmp_path), splits={"train": "train", "validation": "validation_matched"}
        ).setup()


def test_a_folder_without_the_test_split_names_the_files_it_looked_for(make_cfg, tmp_path):
    from smop.checks import check_config

    (tmp_path / "train.jsonl").write_text(json.dumps(KNOWN["mnli"][0]) + "\n")
    with pytest.raises(
        FileNotFoundError, match=r"'validation_matched' split: expected one of validation_matched.jsonl"
    ):
        check_config(make_cfg("dataset=mnli", "dataset.source=dir", f"dataset.data_dir={tmp_path}"))


def test_matthews_and_binary_f1_count_a_non_label_output_as_wrong():
    metrics = TaskMetrics(["mcc", "f1", "accuracy"], num_classes=2)
    target = torch.tensor([1, 1, 0, 0, 1, 0])
    preds = torch.tensor([1, -1, 0, 1, -1, -1])  # -1: the output was no label word
    metrics.update(preds, target, torch.arange(6))
    values = metrics.compute()
    # counted wrong: [1, 0, 0, 1, 0, 1] -> tp 1, fn 2, tn 1, fp 2
    tp, fn, tn, fp = 1, 2, 1, 2
    f1 = 2 * tp / (2 * tp + fp + fn)
    mcc = (tp * tn - fp * fn) / ((tp + fp) * (tp + fn) * (tn + fp) * (tn + fn)) ** 0.5
    assert values["f1"].item() == pytest.approx(f1) and values["mcc"].item() == pytest.approx(mcc)
    assert values["accuracy"].item() == pytest.approx(2 / 6)


def test_a_binary_metric_on_three_classes_is_refused():
    with pytest.raises(ValueError, match=r"metric\(s\) \['mcc'\] of mnli score two classes, but it has 3 label words"):
        Task("mnli", "{premise}", ["0", "1", "2"], metrics=["mcc"])


# --- STS-B: a number target --------------------------------------------------------------------------------------
def test_stsb_targets_are_depts_rounded_scores(tmp_path):
    rows = [
        {"sentence1": f"a{i}", "sentence2": "b", "label": value, "idx": i}
        for i, value in enumerate([3.84, 0.0, 5.0, 2.25])
    ]
    for split in ("train", "validation"):
        (tmp_path / f"{split}.jsonl").write_text("\n".join(json.dumps(r) for r in rows * 3) + "\n")
    dm = datamodule("stsb", source="dir", data_dir=str(tmp_path))
    dm.setup()
    texts = [TOKENIZER.decode(row["labels"], skip_special_tokens=True) for row in dm.splits["test"][:4]]
    assert texts == ["3.8", "0.0", "5.0", str(round(2.25, 1))]
    assert [row["value"] for row in dm.splits["test"][:4]] == [3.84, 0.0, 5.0, 2.25]
    assert dm.max_target_length == max(len(TOKENIZER(str(round(v / 10, 1))).input_ids) for v in range(51))
    batch = dm.collate(dm.splits["test"][:4])
    assert batch["value"].dtype == torch.float and batch["value"].tolist() == pytest.approx([3.84, 0.0, 5.0, 2.25])


def test_pearson_and_spearman_with_an_unparsable_output():
    from smop.metrics import UNPARSABLE, to_number

    def pearson(a: list[float], b: list[float]) -> float:
        ma, mb = sum(a) / len(a), sum(b) / len(b)
        cov = sum((x - ma) * (y - mb) for x, y in zip(a, b, strict=True))
        return cov / (sum((x - ma) ** 2 for x in a) * sum((y - mb) ** 2 for y in b)) ** 0.5

    def ranks(values: list[float]) -> list[float]:  # ties share their mean rank
        return [sum(1 for w in values if w < v) + (sum(1 for w in values if w == v) + 1) / 2 for v in values]

    preds = to_number(["3.5", " 1.0", "five", "4.2", "nan", "0.5"])
    assert preds.tolist() == pytest.approx([3.5, 1.0, UNPARSABLE, 4.2, UNPARSABLE, 0.5])
    gold = torch.tensor([3.8, 1.2, 2.0, 4.9, 3.0, 0.0])
    metrics = TaskMetrics(["pearson", "spearman"], num_classes=0)
    metrics.update(preds, gold, torch.arange(6))
    values = metrics.compute()
    p, g = preds.tolist(), gold.tolist()
    assert values["pearson"].item() == pytest.approx(pearson(p, g), abs=1e-5)
    assert values["spearman"].item() == pytest.approx(pearson(ranks(p), ranks(g)), abs=1e-5)
    constant = TaskMetrics(["pearson", "spearman"], num_classes=0)  # every output unparsable: DePT scores 0, not NaN
    constant.update(to_number(["x"] * 6), gold, torch.arange(6))
    assert {name: value.item() for name, value in constant.compute().items()} == {
        "pearson": 0.0,
        "spearman": 0.0,
        "score": 0.0,
    }


def test_a_label_metric_on_a_number_target_is_refused():
    with pytest.raises(ValueError, match=r"metric\(s\) \['accuracy'\] do not score a number target \(stsb\)"):
        Task("stsb", "{sentence1}", [], metrics=["accuracy"], target="number")


# --- split protocols ---------------------------------------------------------------------------------------------
def test_dept_small_sets_validate_and_test_on_the_halves_of_the_official_validation_whatever_the_seed():
    first, other = datamodule("cola", split_protocol="dept"), datamodule("cola", split_protocol="dept", split_seed=7)
    first.setup(), other.setup()
    assert first.split_info["records"] == {"train": 64, "val": 12, "test": 12}
    assert first.split_info["hash"] == other.split_info["hash"]  # the permutation's seed is 42, not the run's
    torch.manual_seed(42)
    order = torch.randperm(24).tolist()  # the reference: torch.randperm after seeding 42
    validation = [json.loads(line) for line in (sample_dir("cola") / "validation.jsonl").read_text().splitlines()]
    expected = {validation[i]["sentence"][:40] for i in order[:12]}  # long rows are truncated to max_length
    assert {TOKENIZER.decode(r["input_ids"], skip_special_tokens=True)[10:50] for r in first.splits["val"]} == expected


def test_dept_large_sets_hold_out_1000_training_rows(tmp_path):
    rows = [{"sentence": f"s{i}", "label": i % 2, "idx": i} for i in range(1100)]
    (tmp_path / "train.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    (tmp_path / "validation.jsonl").write_text("\n".join(json.dumps(r) for r in rows[:30]) + "\n")
    dm = datamodule("sst2", source="dir", data_dir=str(tmp_path), split_protocol="dept")
    dm.setup()
    assert dm.split_info["records"] == {"train": 100, "val": 1000, "test": 30}


def test_dept_mnli_validates_on_mismatched_and_tests_on_matched():
    dm = datamodule("mnli", split_protocol="dept")
    dm.setup()
    assert dm.split_info["records"] == {"train": 66, "val": 24, "test": 24}
    mismatched = (sample_dir("mnli") / "validation_mismatched.jsonl").read_text().splitlines()
    first = TOKENIZER.decode(dm.splits["val"][0]["input_ids"], skip_special_tokens=True)
    assert first == "premise: {premise} hypothesis: {hypothesis}".format(**json.loads(mismatched[0]))


def test_the_official_protocol_needs_a_labelled_test_file(tmp_path):
    with pytest.raises(ValueError, match=r"split_protocol=official tests on a labelled official test file, but cola"):
        datamodule("cola", split_protocol="official").setup()
    rows = [{"sentence": f"s{i}", "label": i % 2, "idx": i} for i in range(20)]
    for split in ("train", "validation", "test"):
        (tmp_path / f"{split}.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    splits = {"train": "train", "validation": "validation", "test": "test"}
    dm = datamodule("cola", source="dir", data_dir=str(tmp_path), split_protocol="official", splits=splits)
    dm.setup()
    assert dm.split_info["records"] == {"train": 20, "val": 20, "test": 20}


def test_an_unknown_split_protocol_is_refused_by_name(make_cfg):
    from smop.checks import check_config

    with pytest.raises(ValueError, match=r"dataset.split_protocol=dpet is not one of: smop, dept, official"):
        check_config(make_cfg("dataset=cola", "dataset.split_protocol=dpet"))


def test_dept_large_on_a_sample_smaller_than_its_held_out_rows_is_refused():
    with pytest.raises(ValueError, match=r"dept_split=large holds out 1,000 training rows .* sst2's training file has"):
        datamodule("sst2", split_protocol="dept").setup()


def test_mnli_reports_matched_and_mismatched_accuracy(make_cfg):
    """The smop protocol tests on validation_matched (`test`) and on validation_mismatched (`test_alt`); DePT's
    validates on mismatched and so has no second test set."""
    dm = task_datamodule("mnli")
    dm.setup()
    assert dm.split_info["records"]["test_alt"] == len(dm.splits["test_alt"]) >= 20
    assert [len(loader.dataset) for loader in dm.test_dataloader()] == [
        len(dm.splits["test"]),
        len(dm.splits["test_alt"]),
    ]
    dept = task_datamodule("mnli", split_protocol="dept")
    dept.setup()
    assert "test_alt" not in dept.splits and dept.split_info["hash"]["val"] == dm.split_info["hash"]["test_alt"]
    results = run(
        make_cfg("dataset=mnli", "method=prompt_tuning", "method.prompt_length=4", "trainer.fast_dev_run=true")
    )
    assert set(results["metrics"]["test"]) == set(results["metrics"]["test_alt"]) == {"accuracy", "score"}


@pytest.mark.parametrize(
    ("task", "record", "text", "target"),
    [
        ("mnli", {"premise": "P.", "hypothesis": "H.", "label": 1}, "hypothesis: H. premise: P.", "neutral"),
        ("qqp", {"question1": "A?", "question2": "B?", "label": 1}, "question1: A? question2: B?", "is_duplicate"),
    ],
)
def test_fpt_style_uses_fpts_template_and_label_names(make_cfg, task, record, text, target, tmp_path):
    """dataset.template_style=fpt (experiment=fpt_mnli / fpt_qqp): FPT's order of the fields and its label names."""
    from smop.checks import check_config

    dm = datamodule(task, template_style="fpt", source="dir", data_dir=str(tmp_path))
    for split in dm.split_names.values():
        (tmp_path / f"{split}.jsonl").write_text("\n".join(json.dumps({**record, "idx": i}) for i in range(10)) + "\n")
    dm.setup()
    row = dm.splits["test"][0]
    assert TOKENIZER.decode(row["input_ids"], skip_special_tokens=True) == text
    assert TOKENIZER.decode(row["labels"], skip_special_tokens=True) == target
    cfg = make_cfg(f"experiment=fpt_{task}")
    assert (cfg.dataset.template, cfg.dataset.label_words[1]) == (dm.task.template, target)
    with pytest.raises(ValueError, match=rf"dataset.template_style=t5 for {task} is not one of: dept, fpt"):
        check_config(make_cfg(f"dataset={task}", "dataset.template_style=t5"))
