"""Evaluation by generation: normalised exact match to a label word, then each task's official metrics.

An output that is no label word is wrong: it gets class index -1, which counts against the true class
and for no other (as in the T5 SuperGLUE evaluation). A free-text target (QA, summaries) is scored against all
its gold texts: SQuAD EM/F1, ROUGE. Metric state lives in torchmetrics objects (tensors, never strings), so it
reduces correctly across processes.
"""

from __future__ import annotations

import math
import re
import string
from collections import Counter
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor
from torchmetrics import Metric, MetricCollection
from torchmetrics.classification import (
    BinaryF1Score,
    BinaryMatthewsCorrCoef,
    MulticlassAccuracy,
    MulticlassF1Score,
)
from torchmetrics.regression import PearsonCorrCoef, SpearmanCorrCoef
from torchmetrics.text.rouge import ROUGEScore

from smop.data.tasks import TEXT_METRICS

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCTUATION = str.maketrans("", "", string.punctuation)


def normalize(text: str, articles: bool = True) -> str:
    """Lower-case, drop punctuation (the underscore too, as the released `normalize_answer`: `not_entailment`
    and `notentailment` are one answer) and articles, squeeze spaces. Applied to outputs and label words alike."""
    text = text.lower().translate(_PUNCTUATION)
    if articles:
        text = _ARTICLES.sub(" ", text)
    return " ".join(text.split())


def to_label_index(outputs: list[str], label_words: list[str]) -> Tensor:
    """Index of the label word each output matches after normalisation, -1 where none matches.

    Articles are kept when a label word is one (the synthetic task's "A"): else "A" and an empty output would
    both normalise to "" and an empty output would count as that label. An empty output matches nothing.
    """
    articles = all(normalize(word) for word in label_words)
    lookup = {normalize(word, articles): i for i, word in enumerate(label_words)}
    if len(lookup) != len(label_words):
        raise ValueError(f"label words {label_words} are not distinct once normalised: {sorted(lookup)}")
    keys = [normalize(text, articles) for text in outputs]
    return torch.tensor([lookup.get(key, -1) if key else -1 for key in keys], dtype=torch.long)


class MacroF1(MulticlassF1Score):
    """Macro-F1 over the real classes; the extra last class holds outputs that were no label word."""

    def __init__(self, num_classes: int) -> None:
        super().__init__(num_classes=num_classes + 1, average="none")
        self.real_classes = num_classes

    def compute(self) -> Tensor:
        return super().compute()[: self.real_classes].mean()


class GroupExactMatch(Metric):
    """MultiRC EM: the share of questions whose answers are all labelled correctly."""

    full_state_update = False

    def __init__(self) -> None:
        super().__init__()
        self.add_state("groups", default=[], dist_reduce_fx="cat")
        self.add_state("correct", default=[], dist_reduce_fx="cat")

    def update(self, preds: Tensor, target: Tensor, groups: Tensor) -> None:
        self.groups.append(groups)
        self.correct.append((preds == target).float())

    def compute(self) -> Tensor:
        groups = torch.cat(self.groups) if isinstance(self.groups, list) else self.groups
        correct = torch.cat(self.correct) if isinstance(self.correct, list) else self.correct
        _, inverse = torch.unique(groups, return_inverse=True)
        per_group = torch.ones(int(inverse.max()) + 1, device=correct.device)
        per_group = per_group.scatter_reduce(0, inverse, correct, reduce="amin")
        return per_group.mean()


def squad_golds(golds: Sequence[str]) -> list[str]:
    """The golds a prediction is scored against: SQuAD 2.0's rule, a question without a non-empty gold answer has
    the single gold "", so only an empty prediction scores on it."""
    kept = [gold for gold in golds if normalize(gold)]
    return kept or [""]


def exact_match(prediction: str, golds: Sequence[str]) -> float:
    """1.0 if the normalised prediction equals a normalised gold (SQuAD's `compute_exact`, max over golds)."""
    key = normalize(prediction)
    return float(any(key == normalize(gold) for gold in squad_golds(golds)))


def token_f1(prediction: str, golds: Sequence[str]) -> float:
    """Token-overlap F1 of the normalised texts, max over golds (the official SQuAD `compute_f1`): an empty side
    scores 1 only against another empty side."""

    def f1(gold: str) -> float:
        pred_tokens, gold_tokens = normalize(prediction).split(), normalize(gold).split()
        if not pred_tokens or not gold_tokens:
            return float(pred_tokens == gold_tokens)
        same = sum((Counter(pred_tokens) & Counter(gold_tokens)).values())
        if same == 0:
            return 0.0
        precision, recall = same / len(pred_tokens), same / len(gold_tokens)
        return 2 * precision * recall / (precision + recall)

    return max(f1(gold) for gold in squad_golds(golds))


def map_no_answer(texts: Sequence[str], no_answer_text: str | None) -> list[str]:
    """A generated no-answer marker (SQuAD 2.0's `dataset.no_answer_text`, normalised) is the empty answer."""
    if not no_answer_text:
        return list(texts)
    marker = normalize(no_answer_text)
    return ["" if normalize(text) == marker else text for text in texts]


class MeanTextScore(Metric):
    """The mean over examples of a per-example score of (prediction, golds), as a fraction in [0, 1]: sums, not
    strings, are the state, so it reduces across processes."""

    full_state_update = False

    def __init__(self, score: Callable[[str, Sequence[str]], float]) -> None:
        super().__init__()
        self.score = score
        self.add_state("total", default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("count", default=torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, preds: Sequence[str], target: Sequence[Sequence[str]]) -> None:
        if len(preds) != len(target):
            raise ValueError(f"{len(preds)} predictions but {len(target)} lists of golds")
        self.total += sum(self.score(pred, golds) for pred, golds in zip(preds, target, strict=True))
        self.count += len(preds)

    def compute(self) -> Tensor:
        return (self.total / self.count.clamp(min=1)).float()


class Rouge(ROUGEScore):
    """One ROUGE F-measure (rouge1, rouge2, rougeL), the best over an example's golds, without stemming; an empty
    prediction scores 0. torchmetrics keeps per-example scores as tensors and needs no nltk for these keys."""

    def __init__(self, key: str) -> None:
        super().__init__(rouge_keys=(key,), accumulate="best")
        self.key = key

    def update(self, preds: Sequence[str], target: Sequence[Sequence[str]]) -> None:
        super().update(list(preds), [list(golds) or [""] for golds in target])

    def compute(self) -> Tensor:
        return super().compute()[f"{self.key}_fmeasure"]


class Pearson(PearsonCorrCoef):
    """Pearson correlation, 0 where it is undefined (constant predictions, e.g. every output unparsable): DePT's
    rule, so early in training `val/score` stays a number that checkpoint selection can compare."""

    def compute(self) -> Tensor:
        return torch.nan_to_num(super().compute(), nan=0.0)


class Spearman(SpearmanCorrCoef):
    """Spearman correlation, 0 where it is undefined (as Pearson)."""

    def compute(self) -> Tensor:
        return torch.nan_to_num(super().compute(), nan=0.0)


class TaskMetrics(MetricCollection):
    """The official metrics of one task; `score` is their mean (SuperGLUE's per-task score)."""

    def __init__(self, metrics: list[str], num_classes: int) -> None:
        invalid = num_classes  # the class index that stands for "no label word"
        builders = {
            "accuracy": lambda: MulticlassAccuracy(num_classes=num_classes + 1, average="micro"),
            "f1_macro": lambda: MacroF1(num_classes),
            "f1a": lambda: BinaryF1Score(),
            "f1": lambda: BinaryF1Score(),
            "mcc": lambda: BinaryMatthewsCorrCoef(),
            "em": lambda: GroupExactMatch(),
            "pearson": lambda: Pearson(),
            "spearman": lambda: Spearman(),
            "squad_em": lambda: MeanTextScore(exact_match),
            "squad_f1": lambda: MeanTextScore(token_f1),
            "rouge1": lambda: Rouge("rouge1"),
            "rouge2": lambda: Rouge("rouge2"),
            "rougeL": lambda: Rouge("rougeL"),
        }
        super().__init__({name: builders[name]() for name in metrics}, compute_groups=False)
        self.invalid = invalid

    def update(self, preds: Tensor | Sequence[str], target: Tensor | Sequence[Sequence[str]], groups: Tensor) -> None:
        """Class indices (-1: no label word) or numbers against the gold ones; or, for a text target, the generated
        texts against each example's gold texts."""
        for name, metric in self.items(keep_base=True, copy_state=False):
            if name in TEXT_METRICS:
                metric.update(preds, target)
            elif name == "em":
                metric.update(preds, target, groups)
            elif name == "f1a":
                metric.update((preds == 1).long(), target)  # no label word counts as a negative answer
            elif name in ("pearson", "spearman"):  # a number target: predicted and gold values
                metric.update(preds.float(), target.float())
            elif name in ("f1", "mcc"):  # binary: no label word is the wrong class
                metric.update(torch.where(preds < 0, 1 - target, preds), target)
            else:
                metric.update(torch.where(preds < 0, self.invalid, preds), target)

    def compute(self) -> dict[str, Tensor]:
        values = super().compute()
        values["score"] = torch.stack([v.float() for v in values.values()]).mean()
        return values


class RoutingCounts(Metric):
    """How many instances used each prompt in an epoch (summed across processes)."""

    full_state_update = False

    def __init__(self, num_prompts: int) -> None:
        super().__init__()
        self.add_state("counts", default=torch.zeros(num_prompts, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, routes: Tensor) -> None:
        self.counts += torch.bincount(routes.flatten(), minlength=self.counts.numel())

    def compute(self) -> Tensor:
        return self.counts


UNPARSABLE = -1.0  # what an output that is no number counts as (the T5 codebases' string_to_float default)


def to_number(outputs: list[str]) -> Tensor:
    """Each output as a number (a number target, e.g. STS-B); an output that is none counts as UNPARSABLE."""

    def parse(text: str) -> float:
        try:
            value = float(text.strip())
        except ValueError:
            return UNPARSABLE
        return value if math.isfinite(value) else UNPARSABLE

    return torch.tensor([parse(text) for text in outputs], dtype=torch.float)


def read_outputs(task: Any, texts: list[str]) -> tuple[dict[str, list[Any]], int]:
    """What generated texts say for the task, by field, and how many say nothing: label word and index (-1 and
    None: no label word), the number (UNPARSABLE: none), the answer ("" for the no-answer text), or the completion."""
    if task.target == "number":
        values = to_number(texts).tolist()
        return {"value": values}, sum(value == UNPARSABLE for value in values)
    if task.target == "text":
        return {"answer": map_no_answer(texts, task.no_answer_text)}, 0
    if task.target == "code":  # the completion as written; running it is smop.code.evaluation's (or the scoring CLI's)
        return {"completion": list(texts)}, 0
    indices = to_label_index(texts, task.label_words).tolist()
    labels = [task.label_words[index] if index >= 0 else None for index in indices]
    return {"label": labels, "label_index": indices}, sum(index < 0 for index in indices)
