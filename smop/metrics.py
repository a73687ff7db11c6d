"""Evaluation by generation: normalised exact match to a label word, then each task's official metrics.

An output that is no label word is wrong: it gets class index -1, which counts against the true class
and for no other (as in the T5 SuperGLUE evaluation). Metric state lives in torchmetrics objects, so it
reduces correctly across processes.
"""

from __future__ import annotations

import math
import re
import string

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
            "pearson": lambda: PearsonCorrCoef(),
            "spearman": lambda: SpearmanCorrCoef(),
        }
        super().__init__({name: builders[name]() for name in metrics}, compute_groups=False)
        self.invalid = invalid

    def update(self, preds: Tensor, target: Tensor, groups: Tensor) -> None:
        for name, metric in self.items(keep_base=True, copy_state=False):
            if name == "em":
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
