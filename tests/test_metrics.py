"""Tests of hlora.metrics against hand-computed values."""

from __future__ import annotations

import pytest
import torch

from hlora.metrics import METRIC_NAMES, accuracy, binary_f1, compute_metrics, majority_baseline

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
