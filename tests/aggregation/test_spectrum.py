"""The energy of a global update beyond each client rank."""

from __future__ import annotations

import pytest
import torch

from hlora.aggregation import LowRankDelta
from hlora.aggregation.spectrum import energy_beyond, singular_values


def _delta(values: list[float], scale: float = 1.0) -> LowRankDelta:
    k = len(values)
    q_left, _ = torch.linalg.qr(torch.randn(12, k, dtype=torch.float64))
    q_right, _ = torch.linalg.qr(torch.randn(10, k, dtype=torch.float64))
    s = torch.tensor(values, dtype=torch.float64) / scale
    return LowRankDelta(left=q_left * s, right=q_right.T.clone(), scale=scale)


def test_shares_beyond_each_rank() -> None:
    layers = {"a": _delta([3.0, 2.0, 1.0, 1.0], scale=2.0), "b": _delta([1.0, 0.0, 0.0, 0.0])}
    shares = energy_beyond(layers, [1, 2, 4])
    # a: energies 9, 4, 1, 1 of 15; b: everything in the first component
    assert shares["1"] == pytest.approx((6 / 15 + 0.0) / 2)
    assert shares["2"] == pytest.approx((2 / 15 + 0.0) / 2)
    assert shares["4"] == pytest.approx(0.0, abs=1e-12)
    torch.testing.assert_close(
        singular_values(layers["a"]), torch.tensor([3.0, 2.0, 1.0, 1.0], dtype=torch.float64)
    )


def test_zero_updates_have_no_spectrum() -> None:
    zero = LowRankDelta(left=torch.zeros(4, 2), right=torch.zeros(2, 3))
    assert energy_beyond({"z": zero}, [2]) == {}
