"""Classification metrics of the GLUE tasks, as small pure functions."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import SupportsInt

METRIC_NAMES: tuple[str, ...] = ("accuracy", "f1")
"""Metrics of predicted labels (:func:`compute_metrics`)."""
PERPLEXITY = "perplexity"
"""``exp`` of the mean token loss of held-out answers (free-form instruction data); lower is
better. Computed by the runtime from the loss, not from labels."""


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
    p, y = _as_ints(preds, labels)
    return sum(a == b for a, b in zip(p, y, strict=True)) / len(y)


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
    p, y = _as_ints(preds, labels)
    tp = sum(a == positive and b == positive for a, b in zip(p, y, strict=True))
    fp = sum(a == positive and b != positive for a, b in zip(p, y, strict=True))
    fn = sum(a != positive and b == positive for a, b in zip(p, y, strict=True))
    denominator = 2 * tp + fp + fn
    return 2 * tp / denominator if denominator else 0.0


_METRICS: dict[str, Callable[[list[int], list[int]], float]] = {
    "accuracy": accuracy,
    "f1": binary_f1,
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
    p, y = _as_ints(preds, labels)
    return {name: _METRICS[name](p, y) for name in metric_names}


def _as_ints(
    preds: Iterable[SupportsInt], labels: Iterable[SupportsInt]
) -> tuple[list[int], list[int]]:
    p = [int(v) for v in preds]
    y = [int(v) for v in labels]
    if len(p) != len(y):
        raise ValueError(f"preds and labels differ in length: {len(p)} != {len(y)}")
    if not y:
        raise ValueError("cannot compute a metric over zero examples")
    return p, y


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
