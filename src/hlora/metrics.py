"""Classification metrics of the GLUE tasks, as small pure functions."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import SupportsInt

METRIC_NAMES: tuple[str, ...] = ("accuracy", "f1")
"""Metrics of predicted labels (:func:`compute_metrics`)."""
PERPLEXITY = "perplexity"
"""``exp`` of the mean token loss of held-out answers (free-form instruction data); lower is
better. Computed from the loss (:func:`metrics_of`), not from labels."""
_MAX_LOG_PERPLEXITY = 80.0  # exp(80) ~ 5e34: a finite perplexity for any loss


Confusion = tuple[tuple[int, ...], ...]
"""``confusion[true][predicted]`` example counts, ``(num_labels, num_labels)``: every metric of
:data:`METRIC_NAMES` is computed from it, once."""


def confusion_matrix(
    preds: Iterable[SupportsInt], labels: Iterable[SupportsInt], num_labels: int = 0
) -> Confusion:
    """Counts of predicted against true labels.

    Args:
        preds: Predicted class ids (ints, or anything ``int()`` accepts: numpy, torch).
        labels: True class ids, same length as ``preds``.
        num_labels: Its size; 0: one more than the largest id seen (at least 2).

    Raises:
        ValueError: Lengths that differ, or an id outside ``[0, num_labels)``.
    """
    p, y = [int(v) for v in preds], [int(v) for v in labels]
    if len(p) != len(y):
        raise ValueError(f"preds and labels differ in length: {len(p)} != {len(y)}")
    size = num_labels or max([1, *p, *y]) + 1
    grid = [[0] * size for _ in range(size)]
    for a, b in zip(p, y, strict=True):
        if not (0 <= a < size and 0 <= b < size):
            raise ValueError(f"label {b} or prediction {a} outside [0, {size})")
        grid[b][a] += 1
    return tuple(tuple(row) for row in grid)


def _examples(confusion: Confusion) -> int:
    total = sum(sum(row) for row in confusion)
    if not total:
        raise ValueError("cannot compute a metric over zero examples")
    return total


def _accuracy(confusion: Confusion) -> float:
    return sum(confusion[i][i] for i in range(len(confusion))) / _examples(confusion)


def _binary_f1(confusion: Confusion, positive: int = 1) -> float:
    _examples(confusion)
    if positive >= len(confusion):
        return 0.0  # the positive class appears neither predicted nor true
    tp = confusion[positive][positive]
    fp = sum(row[positive] for i, row in enumerate(confusion) if i != positive)
    fn = sum(v for j, v in enumerate(confusion[positive]) if j != positive)
    denominator = 2 * tp + fp + fn
    return 2 * tp / denominator if denominator else 0.0


def accuracy(preds: Iterable[SupportsInt], labels: Iterable[SupportsInt]) -> float:
    """Fraction of predictions equal to the labels.

    Args:
        preds: Predicted class ids (ints, or anything ``int()`` accepts: numpy, torch).
        labels: True class ids, same length as ``preds``.

    Returns:
        Accuracy in [0, 1].

    Raises:
        ValueError: If the lengths differ or there are no examples.
    """
    return _accuracy(confusion_matrix(preds, labels))


def binary_f1(
    preds: Iterable[SupportsInt], labels: Iterable[SupportsInt], positive: int = 1
) -> float:
    """F1 score of the ``positive`` class: ``2 tp / (2 tp + fp + fn)``.

    Args:
        preds: Predicted class ids (ints, or anything ``int()`` accepts: numpy, torch).
        labels: True class ids, same length as ``preds``.
        positive: The class treated as positive.

    Returns:
        F1 in [0, 1]. It is 0.0 when there are neither positive predictions nor positive labels
        (the ratio is 0/0 then; scikit-learn's default also gives 0.0).

    Raises:
        ValueError: If the lengths differ or there are no examples.
    """
    return _binary_f1(confusion_matrix(preds, labels), positive)


_METRICS: dict[str, Callable[[Confusion], float]] = {
    "accuracy": _accuracy,
    "f1": _binary_f1,
}


def compute_metrics(
    metric_names: Sequence[str], preds: Iterable[SupportsInt], labels: Iterable[SupportsInt]
) -> dict[str, float]:
    """Compute several metrics at once.

    Args:
        metric_names: Names from :data:`METRIC_NAMES` (for example ``TaskInfo.metrics``).
        preds: Predicted class ids (ints, or anything ``int()`` accepts: numpy, torch).
        labels: True class ids, same length as ``preds``.

    Returns:
        ``{name: value}`` in the order of ``metric_names``.

    Raises:
        ValueError: If a name is unknown, the lengths differ or there are no examples.
    """
    unknown = [name for name in metric_names if name not in _METRICS]
    if unknown:
        raise ValueError(f"unknown metric(s) {unknown}; allowed: {list(METRIC_NAMES)}")
    confusion = confusion_matrix(preds, labels)
    return {name: _METRICS[name](confusion) for name in metric_names}


def majority_baseline(
    metric_names: Sequence[str], train_labels: Sequence[int], eval_labels: Sequence[int]
) -> dict[str, float]:
    """The metrics of always predicting the training data's most frequent class.

    Ties go to the smaller class id. Names that are not label metrics (``perplexity``) are
    skipped. This is the floor a classifier must clear to have learned
    anything (on MRPC dev: accuracy 0.684, F1 0.812).

    Raises:
        ValueError: No training or evaluation labels.
    """
    if not train_labels:
        raise ValueError("majority_baseline needs at least one training label")
    counts: dict[int, int] = {}
    for label in train_labels:
        counts[int(label)] = counts.get(int(label), 0) + 1
    majority = min(counts, key=lambda c: (-counts[c], c))
    names = [m for m in metric_names if m in METRIC_NAMES]
    return compute_metrics(names, [majority] * len(eval_labels), eval_labels) if names else {}


@dataclass(frozen=True)
class EvalCounts:
    """What an evaluation adds up: every metric of :data:`METRIC_NAMES` and the mean loss follow
    from it, and the counts of several evaluation sets add up to those of their union (how the
    server combines the nodes' own held-out evaluations, weighted by their sizes).

    Attributes:
        confusion: ``confusion[true][predicted]`` example counts, ``(num_labels, num_labels)``.
        loss_sum: Summed loss (:meth:`hlora.objectives.Objective.score`).
        loss_count: How many terms ``loss_sum`` adds up.
    """

    confusion: Confusion
    loss_sum: float
    loss_count: int

    @staticmethod
    def of(
        preds: Iterable[SupportsInt],
        labels: Iterable[SupportsInt],
        num_labels: int,
        loss_sum: float = 0.0,
        loss_count: int = 0,
    ) -> EvalCounts:
        """Counts of predicted against true labels (:func:`confusion_matrix`).

        Raises:
            ValueError: Lengths that differ, or a label outside ``[0, num_labels)``.
        """
        confusion = confusion_matrix(preds, labels, num_labels)
        return EvalCounts(confusion, float(loss_sum), int(loss_count))

    def __add__(self, other: EvalCounts) -> EvalCounts:
        if len(other.confusion) != len(self.confusion):
            raise ValueError(
                f"cannot add counts of {len(self.confusion)} and {len(other.confusion)} labels"
            )
        grid = tuple(
            tuple(a + b for a, b in zip(r, s, strict=True))
            for r, s in zip(self.confusion, other.confusion, strict=True)
        )
        return EvalCounts(grid, self.loss_sum + other.loss_sum, self.loss_count + other.loss_count)

    def metrics(self, metric_names: Sequence[str]) -> dict[str, float]:
        """The label metrics among ``metric_names`` (the functions :func:`compute_metrics`
        uses) and ``loss``, the mean loss.

        Raises:
            ValueError: A label metric over zero examples.
        """
        out = {m: _METRICS[m](self.confusion) for m in metric_names if m in METRIC_NAMES}
        out["loss"] = self.loss_sum / max(1, self.loss_count)
        return out


def metrics_of(counts: EvalCounts, metric_names: Sequence[str]) -> dict[str, float]:
    """The label metrics among ``metric_names``, the mean ``loss`` and, when asked,
    ``perplexity`` = ``exp(loss)`` of an evaluation's counts."""
    metrics = counts.metrics(metric_names)
    if PERPLEXITY in metric_names:
        metrics[PERPLEXITY] = math.exp(min(metrics["loss"], _MAX_LOG_PERPLEXITY))
    return metrics
