"""Tests of hlora.metrics against hand-computed values."""

from __future__ import annotations

import math
import random

import pytest
import torch

from hlora.metrics import (
    METRIC_NAMES,
    EvalCounts,
    accuracy,
    binary_f1,
    compute_metrics,
    majority_baseline,
    metrics_of,
)

PREDS = [1, 1, 0, 1, 0, 0, 1, 0]
LABELS = [1, 0, 0, 1, 1, 0, 1, 1]
# tp = 3 (indices 0, 3, 6), fp = 1 (index 1), fn = 2 (indices 4, 7), tn = 2 (indices 2, 5)


def test_accuracy() -> None:
    assert accuracy(PREDS, LABELS) == pytest.approx(5 / 8)
    assert accuracy([2, 0, 1], [2, 1, 1]) == pytest.approx(2 / 3)
    assert accuracy([1], [1]) == 1.0


def test_binary_f1() -> None:
    # precision 3/4, recall 3/5 -> f1 = 2 * 3 / (2 * 3 + 1 + 2) = 2/3
    assert binary_f1(PREDS, LABELS) == pytest.approx(2 / 3)
    # positive = 0: tp = 2, fp = 2 (indices 4, 7), fn = 1 (index 1) -> 4 / 7
    assert binary_f1(PREDS, LABELS, positive=0) == pytest.approx(4 / 7)
    assert binary_f1([1, 1], [1, 1]) == 1.0
    assert binary_f1([0, 0], [1, 1]) == 0.0  # no positive predictions
    assert binary_f1([1, 1], [0, 0]) == 0.0  # no positive labels
    assert binary_f1([0, 0], [0, 0]) == 0.0  # neither: 0/0 is defined as 0.0


def test_compute_metrics_accepts_tensors() -> None:
    result = compute_metrics(("accuracy", "f1"), torch.tensor(PREDS), torch.tensor(LABELS))
    assert list(result) == ["accuracy", "f1"]
    assert result["accuracy"] == pytest.approx(5 / 8)
    assert result["f1"] == pytest.approx(2 / 3)
    assert compute_metrics(["accuracy"], PREDS, LABELS) == {"accuracy": pytest.approx(5 / 8)}
    assert METRIC_NAMES == ("accuracy", "f1")


def test_errors() -> None:
    with pytest.raises(ValueError, match=r"unknown metric\(s\) \['mcc'\]; allowed: \['accuracy'"):
        compute_metrics(["accuracy", "mcc"], PREDS, LABELS)
    with pytest.raises(ValueError, match="differ in length: 2 != 3"):
        compute_metrics(["f1"], [1, 0], [1, 0, 1])
    with pytest.raises(ValueError, match="differ in length"):
        accuracy([1], [])
    with pytest.raises(ValueError, match="differ in length"):
        binary_f1([1], [1, 0])
    with pytest.raises(ValueError, match="zero examples"):
        accuracy([], [])


def test_majority_baseline() -> None:
    # the training majority (1) on an evaluation set with 3 of 4 positives
    assert majority_baseline(("accuracy", "f1"), [1, 1, 0], [1, 0, 1, 1]) == {
        "accuracy": 0.75,
        "f1": pytest.approx(6 / 7),
    }
    assert majority_baseline(("accuracy",), [0, 1], [1, 1])["accuracy"] == 0.0  # tie -> 0
    with pytest.raises(ValueError, match="at least one training label"):
        majority_baseline(("accuracy",), [], [1])


def test_eval_counts_give_the_metrics_of_the_predictions_bit_for_bit() -> None:
    g = random.Random(3)
    for n in (1, 7, 50):
        preds = [g.randrange(2) for _ in range(n)]
        labels = [g.randrange(2) for _ in range(n)]
        counts = EvalCounts.of(preds, labels, 2, loss_sum=1.5, loss_count=n)
        assert sum(map(sum, counts.confusion)) == n
        assert counts.metrics(("accuracy", "f1")) == {
            **compute_metrics(("accuracy", "f1"), preds, labels),
            "loss": 1.5 / n,
        }
    assert EvalCounts.of([], [], 2).metrics(()) == {"loss": 0.0}
    with pytest.raises(ValueError, match="zero examples"):
        EvalCounts.of([], [], 2).metrics(("accuracy",))
    with pytest.raises(ValueError, match="outside"):
        EvalCounts.of([2], [0], 2)


def test_eval_counts_of_parts_add_up_to_those_of_the_union() -> None:
    g = random.Random(4)
    preds = [g.randrange(2) for _ in range(40)]
    labels = [g.randrange(2) for _ in range(40)]
    parts = [slice(0, 5), slice(5, 23), slice(23, 40)]
    total = EvalCounts.of(preds[parts[0]], labels[parts[0]], 2, 1.0, 5)
    for part, loss in zip(parts[1:], (2.0, 4.0), strict=True):
        count = part.stop - part.start
        total = total + EvalCounts.of(preds[part], labels[part], 2, loss, count)
    union = EvalCounts.of(preds, labels, 2, 7.0, 40)
    assert total == union
    assert [sum(row) for row in total.confusion] == [labels.count(0), labels.count(1)]
    assert metrics_of(total, ("accuracy", "f1", "perplexity"))["perplexity"] == math.exp(7 / 40)
    with pytest.raises(ValueError, match="cannot add counts of 2 and 3 labels"):
        total + EvalCounts.of([0], [0], 3)
