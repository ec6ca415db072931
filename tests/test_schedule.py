"""The run-wide learning-rate schedule and its per-step interpolation."""

from __future__ import annotations

import itertools
import math

import pytest

from hlora.schedule import RoundSchedule, round_schedule, run_learning_rate


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
    parts = [round_schedule(t, rounds, 1.0, "linear", 0.25) for t in range(1, rounds + 1)]
    pairs = [p for p in parts if p is not None]
    assert len(pairs) == rounds
    assert (pairs[0].start, pairs[-1].end) == (0.0, 1.0)
    for before, after in itertools.pairwise(pairs):
        assert before.end == after.start  # one continuous schedule
    assert pairs[0].bounds() == (0.0, 0.5)
    assert pairs[-1].bounds()[1] == pytest.approx(0.0)
    assert round_schedule(3, rounds, 1.0, "round", 0.1) is None


def test_steps_follow_the_schedule_even_across_its_peak() -> None:
    # One round holding the whole run: its steps warm up, peak and decay (not 0 -> 0).
    (only,) = [round_schedule(1, 1, 1.0, "linear", 0.5)]
    assert only is not None
    rates = [only.rate(i, 4) for i in range(4)]
    assert rates == pytest.approx([0.25, 0.75, 0.75, 0.25])
    half = RoundSchedule("constant", 2.0, 0.0, 0.5, 0.75)
    assert [half.rate(i, 2) for i in range(2)] == [2.0, 2.0]


def test_bad_schedule_inputs() -> None:
    with pytest.raises(ValueError, match=r"need 0 <= start <= end <= 1, got 0\.5, 0\.25"):
        RoundSchedule("linear", 1.0, 0.1, 0.5, 0.25)
    with pytest.raises(ValueError, match="unknown run-wide schedule 'step'"):
        RoundSchedule("step", 1.0, 0.1, 0.0, 0.5)
    with pytest.raises(ValueError, match="unknown run-wide schedule 'round'"):
        run_learning_rate(0.5, 1.0, "round", 0.1)
    with pytest.raises(ValueError, match=r"progress must be in \[0, 1\], got 1.5"):
        run_learning_rate(1.5, 1.0, "linear", 0.1)
