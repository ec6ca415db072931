"""The run-wide learning-rate schedule and its per-step interpolation."""

from __future__ import annotations

import itertools
import math

import pytest

from hlora.schedule import round_learning_rates, run_learning_rate, step_learning_rate


def test_warmup_then_linear_decay_to_zero() -> None:
    peak = 2e-3
    assert run_learning_rate(0.0, peak, "linear", 0.1) == 0.0
    assert run_learning_rate(0.05, peak, "linear", 0.1) == pytest.approx(1e-3)
    assert run_learning_rate(0.1, peak, "linear", 0.1) == pytest.approx(peak)
    assert run_learning_rate(0.55, peak, "linear", 0.1) == pytest.approx(1e-3)
    assert run_learning_rate(1.0, peak, "linear", 0.1) == pytest.approx(0.0)


def test_cosine_and_constant() -> None:
    assert run_learning_rate(0.55, 1.0, "cosine", 0.1) == pytest.approx(0.5)
    q = (0.3 - 0.1) / 0.9
    assert run_learning_rate(0.3, 1.0, "cosine", 0.1) == pytest.approx(
        0.5 * (1 + math.cos(math.pi * q))
    )
    assert run_learning_rate(0.9, 1.0, "constant", 0.2) == 1.0
    assert run_learning_rate(0.1, 1.0, "constant", 0.2) == pytest.approx(0.5)
    assert run_learning_rate(0.0, 1.0, "linear", 0.0) == 1.0  # no warm-up


def test_rounds_tile_the_run() -> None:
    rounds = 8
    ends = [round_learning_rates(t, rounds, 1.0, "linear", 0.25) for t in range(1, rounds + 1)]
    assert all(e is not None for e in ends)
    pairs = [e for e in ends if e is not None]
    assert pairs[0] == (0.0, 0.5)
    for (_, end), (start, _) in itertools.pairwise(pairs):
        assert end == start  # one continuous schedule
    assert pairs[-1][1] == pytest.approx(0.0)
    assert round_learning_rates(3, rounds, 1.0, "round", 0.1) is None


def test_step_rates_move_linearly_inside_a_round() -> None:
    rates = [step_learning_rate((1.0, 0.0), i, 4) for i in range(4)]
    assert rates == pytest.approx([0.875, 0.625, 0.375, 0.125])


def test_bad_schedule_inputs() -> None:
    with pytest.raises(ValueError, match="unknown run-wide schedule 'round'"):
        run_learning_rate(0.5, 1.0, "round", 0.1)
    with pytest.raises(ValueError, match=r"progress must be in \[0, 1\], got 1.5"):
        run_learning_rate(1.5, 1.0, "linear", 0.1)
