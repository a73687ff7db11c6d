"""SuperGLUE data: templates, label words and label encodings, MultiRC flattening, the seeded 90/10 split,
truncation that keeps the closing fields, dynamic padding, the bundled samples and the error messages."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf
from transformers import ByT5Tokenizer

import smop.data.sources as sources
from smop.builders import build_datamodule
from smop.data import TaskDataModule
from smop.data.sources import read_records, sample_dir, split_file
from smop.data.splits import split_train_val
from smop.data.tasks import Task

CONFIGS = Path(__file__).resolve().parents[1] / "smop" / "configs"
SUPERGLUE = ("rte", "cb", "copa", "wic", "boolq", "multirc")
TOKENIZER = ByT5Tokenizer()  # byte-level: no files, one token per byte
EOS = TOKENIZER.eos_token_id

# Label values in index order, as the official JSONL writes them and as the hub (aps/super_glue) does.
JSONL_LABELS: dict[str, list[Any]] = {
    "rte": ["entailment", "not_entailment"],
    "cb": ["entailment", "contradiction", "neutral"],
    "copa": [0, 1],
    "wic": [False, True],
    "boolq": [False, True],
    "multirc": [0, 1],
}
HUB_LABELS = {task: list(range(len(values))) for task, values in JSONL_LABELS.items()}
LABEL_WORDS = {
    "rte": ["entailment", "not_entailment"],
    "cb": ["entailment", "contradiction", "neutral"],
    "copa": ["choice1", "choice2"],
    "wic": ["False", "True"],
    "boolq": ["False", "True"],
    "multirc": ["False", "True"],
}


# --- building datamodules the way smop/run.py does ------------------------------------------------------


def dataset_options(task: str, **overrides: Any) -> dict[str, Any]:
    """smop/configs/dataset/<task>.yaml minus `epochs`, as smop/run.py passes it on."""
    cfg = OmegaConf.load(CONFIGS / "dataset" / f"{task}.yaml")
    cfg.split_seed = 0  # ${seed} and ${dataset.name} need the full tree; set them here
    cfg.hub_config = task
    resolved = OmegaConf.to_container(OmegaConf.create({"dataset": cfg}), resolve=True)["dataset"]  # its style
    options = {k: v for k, v in resolved.items() if k not in ("epochs", "templates", "template_style")}
    return {**options, **overrides}


def direct(task: str, **overrides: Any) -> TaskDataModule:
    """The same, constructed directly (hydra wraps constructor errors in InstantiationException)."""
    options = dataset_options(task, **overrides)
    options.pop("_target_")
    return TaskDataModule(tokenizer=TOKENIZER, **options)


def make_dm(task: str, **overrides: Any) -> TaskDataModule:
    """`instantiate` of the dataset config, with the byte-level tokenizer (as smop/run.py does)."""
    return instantiate(OmegaConf.create(dataset_options(task, **overrides)), tokenizer=TOKENIZER, _convert_="all")


def record(task: str, i: int, label: Any, long: str = "") -> dict[str, Any]:
    """An official-format SuperGLUE record whose texts are unique per `i`; `long` is appended to the long field."""
    if task == "rte":
        return {"premise": f"Premise {i}.{long}", "hypothesis": f"Hypothesis {i}.", "label": label, "idx": i}
    if task == "cb":
        return {"premise": f"Premise {i}.{long}", "hypothesis": f"Hypothesis {i}.", "label": label, "idx": i}
    if task == "copa":
        return {
            "premise": f"Premise {i}.{long}",
            "choice1": f"First {i}.",
            "choice2": f"Second {i}.",
            "question": "effect" if i % 2 else "cause",
            "label": label,
            "idx": i,
        }
    if task == "wic":
        return {
            "word": f"w{i}",
            "sentence1": f"First w{i} sentence.{long}",
            "sentence2": f"Second w{i} sentence.",
            "idx": i,
            "label": label,
            "start1": 6,
            "end1": 8,
            "start2": 7,
            "end2": 9,
            "version": 1.1,
        }
    if task == "boolq":
        return {"question": f"is question {i} true", "passage": f"Passage {i}.{long}", "idx": i, "label": label}
    if task == "multirc":  # one paragraph, two questions; answer labels alternate, starting with `label`
        questions = []
        for q in range(2):
            answers = [
                {"text": f"Answer {i}.{q}.{a}", "idx": 10 * i + 3 * q + a, "label": label if a % 2 == 0 else 1 - label}
                for a in range(3 if q == 0 else 2)
            ]
            questions.append({"question": f"Question {i}.{q}?", "answers": answers, "idx": 2 * i + q})
        return {"idx": i, "version": 1.1, "passage": {"text": f"Paragraph {i}.{long}", "questions": questions}}
    raise ValueError(task)


def hub_rows(task: str, i: int, label: int, long: str = "") -> list[dict[str, Any]]:
    """The same record as the hub writes it: integer labels; MultiRC as flat rows, one per answer."""
    if task != "multirc":
        return [record(task, i, label, long)]
    official = record(task, i, label, long)
    return [
        {
            "paragraph": official["passage"]["text"],
            "question": q["question"],
            "answer": a["text"],
            "idx": {"paragraph": official["idx"], "question": q["idx"], "answer": a["idx"]},
            "label": a["label"],
        }
        for q in official["passage"]["questions"]
        for a in q["answers"]
    ]


def write_jsonl(path: Path, records: list[dict[str, Any]]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


def official_train(task: str, per_label: list[int]) -> list[dict[str, Any]]:
    """Records with `per_label[k]` of label k, interleaved so that file order is not label order."""
    values = [v for k, n in enumerate(per_label) for v in [JSONL_LABELS[task][k]] * n]
    values = values[::2] + values[1::2]
    return [record(task, i, v) for i, v in enumerate(values)]


def decoded(ids: list[int]) -> str:
    return TOKENIZER.decode(ids, skip_special_tokens=True)


# --- formats, label words, label encodings ---------------------------------------------------------------

KNOWN: dict[str, tuple[dict[str, Any], list[str], list[str]]] = {
    "rte": (
        {
            "premise": "Dana Reeve died of lung cancer.",
            "hypothesis": "Dana Reeve is dead.",
            "label": "entailment",
            "idx": 7,
        },
        ["rte sentence1: Dana Reeve died of lung cancer. sentence2: Dana Reeve is dead."],
        ["entailment"],
    ),
    "cb": (
        {"premise": "It was raining all night.", "hypothesis": "The ground is wet.", "label": "neutral", "idx": 3},
        ["cb hyopthesis: The ground is wet.. premise: It was raining all night."],
        ["neutral"],
    ),  # released typo
    "copa": (
        {
            "premise": "My body cast a shadow over the grass.",
            "choice1": "The sun was rising.",
            "choice2": "The grass was cut.",
            "question": "cause",
            "label": 0,
            "idx": 0,
        },
        [
            "choice1: The sun was rising. choice2: The grass was cut. premise: My body cast a shadow over the "
            "grass. question: cause"
        ],
        ["choice1"],
    ),
    "wic": (
        {
            "word": "place",
            "sentence1": "Do you want to come over to my place later?",
            "sentence2": "A political system with no place for the less prominent groups.",
            "idx": 0,
            "label": False,
            "start1": 31,
            "end1": 36,
            "start2": 27,
            "end2": 32,
            "version": 1.1,
        },
        [
            "wic sentence1: Do you want to come over to my place later? sentence2: A political system with no "
            "place for the less prominent groups. word: place"
        ],
        ["False"],
    ),
    "boolq": (
        {
            "question": "is the sky blue on a clear day",
            "passage": "Sky -- The sky looks blue.",
            "idx": 0,
            "label": True,
        },
        ["boolq passage: Sky -- The sky looks blue. question: is the sky blue on a clear day"],
        ["True"],
    ),
    "multirc": (
        {
            "idx": 4,
            "version": 1.1,
            "passage": {
                "text": "Sam ate an apple. Then he slept.",
                "questions": [
                    {
                        "question": "What did Sam eat?",
                        "idx": 9,
                        "answers": [
                            {"text": "An apple", "idx": 20, "label": 1},
                            {"text": "A pear", "idx": 21, "label": 0},
                        ],
                    },
                    {
                        "question": "What did he do next?",
                        "idx": 10,
                        "answers": [{"text": "He slept", "idx": 22, "label": 1}],
                    },
                ],
            },
        },
        [
            "question: What did Sam eat? answer: An apple. paragraph: Sam ate an apple. Then he slept.",
            "question: What did Sam eat? answer: A pear. paragraph: Sam ate an apple. Then he slept.",
            "question: What did he do next? answer: He slept. paragraph: Sam ate an apple. Then he slept.",
        ],
        ["True", "False", "True"],
    ),
}


@pytest.fixture
def task_dir(tmp_path: Path):
    """An official-format folder for one task: a balanced train.jsonl and the given val.jsonl."""

    def make(task: str, test_records: list[dict[str, Any]], per_label: int = 10) -> Path:
        folder = tmp_path / task
        write_jsonl(folder / "train.jsonl", official_train(task, [per_label] * len(JSONL_LABELS[task])))
        write_jsonl(folder / "val.jsonl", test_records)
        return folder

    return make


def test_every_superglue_task_has_a_config() -> None:
    assert {task for task in SUPERGLUE if (CONFIGS / "dataset" / f"{task}.yaml").is_file()} == set(SUPERGLUE)


@pytest.mark.parametrize("task", SUPERGLUE)
def test_template_and_label_words(task: str, task_dir) -> None:
    """A known official record -> exactly the reference input text + EOS, and its label word + EOS as target."""
    known, texts, words = KNOWN[task]
    dm = make_dm(task, source="dir", data_dir=str(task_dir(task, [known])))
    dm.setup()
    assert dm.task.label_words == LABEL_WORDS[task]
    rows = dm.splits["test"]
    assert len(rows) == len(texts)
    for row, text, word in zip(rows, texts, words, strict=True):
        assert row["input_ids"] == TOKENIZER(text).input_ids
        assert TOKENIZER.decode(row["input_ids"]) == text + "</s>"
        assert TOKENIZER.decode(row["labels"]) == word + "</s>"
        assert row["label_index"] == LABEL_WORDS[task].index(word)
    assert dm.max_target_length == max(len(w.encode()) for w in LABEL_WORDS[task]) + 1


@pytest.mark.parametrize("task", SUPERGLUE)
def test_official_jsonl_label_encodings(task: str, task_dir) -> None:
    """RTE/CB strings, BoolQ/WiC booleans, COPA ints, MultiRC nested 0/1 -> the index of the right label word."""
    values = JSONL_LABELS[task]
    dm = make_dm(task, source="dir", data_dir=str(task_dir(task, [record(task, k, v) for k, v in enumerate(values)])))
    dm.setup()
    rows = dm.splits["test"]
    if task == "multirc":  # answer labels alternate v, 1-v, v | 1-v... per question, see `record`
        expected = [k if a % 2 == 0 else 1 - k for k in range(2) for a in (0, 1, 2, 0, 1)]
    else:
        expected = list(range(len(values)))
    assert [r["label_index"] for r in rows] == expected
    assert [decoded(r["labels"]) for r in rows] == [LABEL_WORDS[task][k] for k in expected]


@pytest.mark.parametrize("task", SUPERGLUE)
def test_hub_integer_labels_and_flat_multirc(task: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """source=hub: integer labels in the label-word order; MultiRC's flat rows group by question."""
    n = len(HUB_LABELS[task])
    train = [row for i in range(20 * n) for row in hub_rows(task, i, HUB_LABELS[task][i % n])]
    test = [row for k in range(n) for row in hub_rows(task, 1000 + k, HUB_LABELS[task][k])]
    calls = []

    def fake_hub(name: str, config: str, split: str) -> list[dict[str, Any]]:
        calls.append((name, config, split))
        return train if split == "train" else test

    monkeypatch.setattr(sources, "_load_hub", fake_hub)
    dm = make_dm(task, source="hub")
    dm.setup()
    assert sorted(calls) == [("aps/super_glue", task, "train"), ("aps/super_glue", task, "validation")]
    rows = dm.splits["test"]
    assert [r["label_index"] for r in rows] == [row["label"] for row in test]
    assert [decoded(r["labels"]) for r in rows] == [LABEL_WORDS[task][row["label"]] for row in test]
    if task == "multirc":
        assert [decoded(r["input_ids"]) for r in rows] == [
            f"question: {row['question']} answer: {row['answer']}. paragraph: {row['paragraph']}" for row in test
        ]
        by_question = Counter(r["group"] for r in rows)
        assert len(by_question) == 2 * n  # two questions per paragraph, answers 3 + 2
        assert sorted(by_question.values()) == [2, 2, 3, 3]
    else:
        assert [decoded(r["input_ids"]) for r in rows] == [dm.task.template.format(**row) for row in test]


def test_label_index_rejects_unknown_values() -> None:
    rte = Task("rte", "{premise}", ["entailment", "not_entailment"], ["entailment", "not_entailment"])
    assert rte.label_index("not_entailment") == 1 and rte.label_index(0) == 0
    for bad in ("maybe", 2, -1, None):
        with pytest.raises(ValueError):
            rte.label_index(bad)
    boolq = Task("boolq", "{passage}", ["False", "True"])
    assert boolq.label_index(True) == 1 and boolq.label_index(False) == 0
    with pytest.raises(ValueError):
        boolq.label_index("True")


# --- MultiRC flattening ---------------------------------------------------------------------------------


def test_multirc_one_example_per_answer_grouped_by_question(task_dir) -> None:
    records = [record("multirc", i, i % 2) for i in range(3)]
    dm = make_dm("multirc", source="dir", data_dir=str(task_dir("multirc", records)))
    dm.setup()
    rows = dm.splits["test"]
    answers = [(q["question"], a) for r in records for q in r["passage"]["questions"] for a in q["answers"]]
    assert len(rows) == len(answers) == 15
    groups = [r["group"] for r in rows]
    for (question, answer), row in zip(answers, rows, strict=True):
        assert decoded(row["input_ids"]).startswith(f"question: {question} answer: {answer['text']}. paragraph: ")
        assert row["label_index"] == answer["label"]
    # same question -> same group; different questions (also across paragraphs) -> different groups
    question_of = [question for question, _ in answers]
    for i in range(len(rows)):
        for j in range(len(rows)):
            assert (groups[i] == groups[j]) == (question_of[i] == question_of[j])
    # groups reach the batch, where EM reads them
    batch = next(iter(dm.test_dataloader()))
    assert batch["group"].tolist() == groups


# --- the seeded, stratified 90/10 split -------------------------------------------------------------------


def test_split_train_val_stratified_seeded_disjoint() -> None:
    labels = ["a"] * 50 + ["b"] * 30 + ["c"] * 7 + ["d"]
    labels = labels[::3] + labels[1::3] + labels[2::3]  # file order is not label order
    train, val = split_train_val(labels, 0.1, seed=1)
    assert not set(train) & set(val)
    assert sorted(train + val) == list(range(len(labels)))
    counts = Counter(labels[i] for i in val)
    # the reference's count per label: n*9//10 train (floor), the rest val; rounding would give 2 / 3 / 1 / 0
    assert [counts[label] for label in "abcd"] == [5, 3, 1, 1]
    assert (train, val) == split_train_val(labels, 0.1, seed=1)
    assert (train, val) == split_train_val(list(labels), 0.1, seed=1)
    assert val != split_train_val(labels, 0.1, seed=2)[1]
    _, val3 = split_train_val(labels, 0.25, seed=1)
    assert len(val3) == sum(n - n * 3 // 4 for n in Counter(labels).values())


@pytest.mark.parametrize("task", ["rte", "cb", "boolq"])
def test_datamodule_split(task: str, task_dir, tmp_path: Path) -> None:
    """train + val = the official train set, per label 90/10; the official val.jsonl is the test set."""
    per_label = [40, 23, 11][: len(JSONL_LABELS[task])]
    folder = tmp_path / "split"
    train_records = official_train(task, per_label)
    test_records = [record(task, 5000 + k, v) for k, v in enumerate(JSONL_LABELS[task])]
    write_jsonl(folder / "train.jsonl", train_records)
    write_jsonl(folder / "val.jsonl", test_records)

    def split(seed: int) -> tuple[dict[str, list[str]], TaskDataModule]:
        dm = make_dm(task, source="dir", data_dir=str(folder), split_seed=seed)
        dm.setup()
        return {name: [decoded(r["input_ids"]) for r in rows] for name, rows in dm.splits.items()}, dm

    texts, dm = split(0)
    everything = [dm.task.template.format(**r) for r in train_records]
    assert sorted(texts["train"] + texts["val"]) == sorted(everything)
    assert not set(texts["train"]) & set(texts["val"])
    assert texts["test"] == [dm.task.template.format(**r) for r in test_records]
    val_labels = Counter(r["label_index"] for r in dm.splits["val"])
    assert [val_labels[k] for k in range(len(per_label))] == [4, 3, 2][: len(per_label)]  # n - n*9//10
    assert split(0)[0] == texts
    assert split(1)[0]["val"] != texts["val"]
    assert split(1)[0]["test"] == texts["test"]


@pytest.mark.parametrize("layout", ["jsonl", "hub"])
def test_multirc_split_by_paragraph(layout: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """No paragraph (hence no question) in both train and val, in the official and in the hub's flat layout."""
    paragraphs = 35  # the reference's count keeps 35*9//10 = 31 for training (rounding would keep 32)
    if layout == "jsonl":
        folder = tmp_path / "multirc"
        write_jsonl(folder / "train.jsonl", [record("multirc", i, i % 2) for i in range(paragraphs)])
        write_jsonl(folder / "val.jsonl", [record("multirc", 999, 0)])
        options = {"source": "dir", "data_dir": str(folder)}
    else:
        rows = [row for i in range(paragraphs) for row in hub_rows("multirc", i, i % 2)]
        monkeypatch.setattr(
            sources, "_load_hub", lambda name, config, split: rows if split == "train" else hub_rows("multirc", 999, 0)
        )
        options = {"source": "hub"}

    def paragraph_sets(seed: int) -> tuple[set[str], set[str]]:
        dm = make_dm("multirc", split_seed=seed, **options)
        dm.setup()
        return tuple({decoded(r["input_ids"]).split(" paragraph: ")[1] for r in dm.splits[s]} for s in ("train", "val"))

    train, val = paragraph_sets(0)
    assert not train & val
    assert len(train | val) == paragraphs
    assert len(val) == 4
    assert paragraph_sets(0) == (train, val)
    assert paragraph_sets(1)[1] != val


# --- truncation ---------------------------------------------------------------------------------------------

LONG = " " + "lorem ipsum dolor sit amet " * 30  # ~800 characters on the long field


def closing_part(task: str, rec: dict[str, Any]) -> tuple[str, str]:
    """(what must start the text, what must end it) after the long field was cut."""
    return {
        "rte": ("rte sentence1: Premise", f" sentence2: {rec.get('hypothesis')}"),
        "cb": (f"cb hyopthesis: {rec.get('hypothesis')}. premise: Premise", ""),
        "copa": (
            f"choice1: {rec.get('choice1')} choice2: {rec.get('choice2')} premise: Premise",
            f" question: {rec.get('question')}",
        ),
        "wic": ("wic sentence1: First", f" sentence2: {rec.get('sentence2')} word: {rec.get('word')}"),
        "boolq": ("boolq passage: Passage", f" question: {rec.get('question')}"),
        "multirc": ("question: Question 0.0? answer: Answer 0.0.0. paragraph: Paragraph", ""),
    }[task]


@pytest.mark.parametrize("task", SUPERGLUE)
def test_truncation_keeps_closing_fields_and_eos(task: str, task_dir) -> None:
    max_length, prompt_length = 96, 10
    budget = max_length - prompt_length
    long_record, short_record = record(task, 0, JSONL_LABELS[task][0], LONG), record(task, 1, JSONL_LABELS[task][1])
    dm = make_dm(
        task,
        source="dir",
        data_dir=str(task_dir(task, [long_record, short_record])),
        max_length=max_length,
        prompt_length=prompt_length,
    )
    dm.setup()
    for split in ("train", "val", "test"):
        for row in dm.splits[split]:
            assert len(row["input_ids"]) <= budget
            assert row["input_ids"][-1] == EOS
            assert EOS not in row["input_ids"][:-1]
    rows = dm.splits["test"]
    head, tail = closing_part(task, long_record)
    text = decoded(rows[0]["input_ids"])
    assert text.startswith(head) and text.endswith(tail), text
    assert len(rows[0]["input_ids"]) >= budget - 4  # the long field is cut to fit, not dropped wholesale
    # a short record is left as it is
    if task == "multirc":
        short_texts = [decoded(r["input_ids"]) for r in rows if "Paragraph 1." in decoded(r["input_ids"])]
        assert short_texts[0] == "question: Question 1.0? answer: Answer 1.0.0. paragraph: Paragraph 1."
    else:
        assert decoded(rows[1]["input_ids"]) == dm.task.template.format(**short_record)


def test_truncation_of_multibyte_text_and_of_too_long_closing_fields(task_dir) -> None:
    """Cutting inside a multi-byte character still fits; closing fields longer than the budget cut the end."""
    umlauts = record("rte", 0, "entailment", " " + "übergrößenträger " * 40)
    huge_hypothesis = {**record("rte", 1, "not_entailment"), "hypothesis": "x" * 500}
    dm = make_dm("rte", source="dir", data_dir=str(task_dir("rte", [umlauts, huge_hypothesis])), max_length=80)
    dm.setup()
    first, second = dm.splits["test"]
    for row in (first, second):
        assert len(row["input_ids"]) <= 80 and row["input_ids"][-1] == EOS
    assert decoded(first["input_ids"]).endswith(" sentence2: Hypothesis 0.")
    assert decoded(second["input_ids"]).startswith("rte sentence1: ")


def test_prompt_longer_than_max_length_is_an_error() -> None:
    with pytest.raises(ValueError, match="max_length"):
        direct("rte", max_length=20, prompt_length=20)


# --- dynamic padding ----------------------------------------------------------------------------------------


def test_batches_pad_to_their_longest_row(task_dir) -> None:
    records = [{**record("cb", i, JSONL_LABELS["cb"][i % 3]), "premise": "p" * (5 + 7 * i)} for i in range(6)]
    dm = make_dm("cb", source="dir", data_dir=str(task_dir("cb", records)), eval_batch_size=3)
    dm.setup()
    rows = dm.splits["test"]
    batches = list(dm.test_dataloader())
    assert len(batches) == 2
    for b, batch in enumerate(batches):
        chunk = rows[3 * b : 3 * b + 3]
        lengths = [len(r["input_ids"]) for r in chunk]
        assert batch["input_ids"].shape == (3, max(lengths)) and max(lengths) < dm.budget
        assert batch["attention_mask"].sum(1).tolist() == lengths
        for i, row in enumerate(chunk):
            n = lengths[i]
            assert batch["input_ids"][i, :n].tolist() == row["input_ids"]
            assert (batch["input_ids"][i, n:] == TOKENIZER.pad_token_id).all()
            assert batch["attention_mask"][i, :n].all() and not batch["attention_mask"][i, n:].any()
            target = row["labels"]
            assert batch["labels"][i, : len(target)].tolist() == target
            assert (batch["labels"][i, len(target) :] == -100).all()
        assert batch["labels"].shape[1] == max(len(r["labels"]) for r in chunk)
        assert batch["label_index"].tolist() == [r["label_index"] for r in chunk]
    assert (batches[0]["labels"] == -100).any()  # "neutral" is shorter than "contradiction"
    assert batches[0]["input_ids"].dtype == torch.long and batches[0]["attention_mask"].dtype == torch.long


# --- the bundled samples -------------------------------------------------------------------------------------


@pytest.mark.parametrize("task", SUPERGLUE)
def test_bundled_samples(task: str) -> None:
    dm = make_dm(task)
    for split, minimum in (("train", 60), ("validation", 20)):
        records = read_records(split_file(sample_dir(task), dm.split_names[split]), dm.task)
        if task == "multirc":
            labels = [a["label"] for r in records for q in r["passage"]["questions"] for a in q["answers"]]
        else:
            labels = [r["label"] for r in records]
        assert len(labels) >= minimum, (task, split, len(labels))
        assert {dm.task.label_index(v) for v in labels} == set(range(len(LABEL_WORDS[task]))), (task, split)
    dm.setup()
    assert dm.splits["train"] and dm.splits["val"] and dm.splits["test"]
    assert len(dm.splits["test"]) >= 20
    budget = dm.budget
    assert all(len(r["input_ids"]) <= budget and r["input_ids"][-1] == EOS for s in dm.splits.values() for r in s)


def test_run_builds_the_datamodule_from_the_composed_config(make_cfg) -> None:
    cfg = make_cfg("dataset=cb", "method.prompt_length=7", "dataset.max_length=64", "seed=3")
    dm = build_datamodule(cfg, TOKENIZER)
    assert dm.task.name == "cb" and dm.budget == 64 - 7 and dm.split_seed == 3
    assert all(len(r["input_ids"]) <= 57 for s in dm.splits.values() for r in s)


# --- error messages -------------------------------------------------------------------------------------------


def test_missing_folder_and_file_are_named(tmp_path: Path) -> None:
    missing = tmp_path / "no_such_folder"
    with pytest.raises(FileNotFoundError, match="no_such_folder"):
        make_dm("rte", source="dir", data_dir=str(missing)).setup()
    folder = tmp_path / "only_train"
    write_jsonl(folder / "train.jsonl", official_train("rte", [5, 5]))
    with pytest.raises(FileNotFoundError, match="val.jsonl"):
        make_dm("rte", source="dir", data_dir=str(folder)).setup()
    with pytest.raises(ValueError, match="data_dir"):
        make_dm("rte", source="dir", data_dir=None).setup()
    with pytest.raises(ValueError, match="source"):
        direct("rte", source="somewhere")


@pytest.mark.parametrize(
    ("task", "line", "bad", "message"),
    [
        ("rte", 3, "{not json", ""),
        ("rte", 2, json.dumps({"premise": "p", "label": "entailment"}), "hypothesis"),
        ("rte", 4, json.dumps({"premise": "p", "hypothesis": "h", "label": "maybe"}), "maybe"),
        ("boolq", 2, json.dumps({"passage": "p", "question": "q", "label": "yes"}), "yes"),
        ("copa", 3, json.dumps({**record("copa", 0, 0), "label": 2}), ""),
        ("cb", 2, json.dumps(["a", "list"]), ""),
        (
            "multirc",
            2,
            json.dumps(
                {
                    **record("multirc", 0, 0),
                    "passage": {
                        "text": "t",
                        "questions": [{"question": "q", "idx": 0, "answers": [{"text": "a", "idx": 0, "label": 7}]}],
                    },
                }
            ),
            "7",
        ),
        (
            "multirc",
            3,
            json.dumps(
                {
                    "idx": 0,
                    "passage": {
                        "text": "t",
                        "questions": [{"question": "q", "idx": 0, "answers": [{"idx": 0, "label": 1}]}],
                    },
                }
            ),
            "text",
        ),
    ],
)
def test_malformed_line_names_file_and_line(task: str, line: int, bad: str, message: str, tmp_path: Path) -> None:
    folder = tmp_path / task
    good = [json.dumps(r) for r in official_train(task, [3] * len(JSONL_LABELS[task]))]
    lines = good[: line - 1] + [bad] + good[line - 1 :]
    folder.mkdir()
    (folder / "train.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    write_jsonl(folder / "val.jsonl", good and [json.loads(g) for g in good])
    with pytest.raises(ValueError, match=f"train.jsonl:{line}:") as info:
        make_dm(task, source="dir", data_dir=str(folder)).setup()
    assert message in str(info.value)
    assert str(folder / "train.jsonl") in str(info.value)


def test_blank_lines_are_skipped_and_empty_files_rejected(tmp_path: Path) -> None:
    task = make_dm("rte").task
    path = tmp_path / "train.jsonl"
    path.write_text("\n" + json.dumps(record("rte", 0, "entailment")) + "\n\n", encoding="utf-8")
    assert len(read_records(path, task)) == 1
    path.write_text("\n", encoding="utf-8")
    with pytest.raises(ValueError, match="no records"):
        read_records(path, task)
