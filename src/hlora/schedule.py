"""The learning-rate schedule of local training, over a round or over the whole run.

A run-wide schedule is a function of the run's progress ``p`` in ``[0, 1]`` (round ``t`` of
``T`` covers ``[(t - 1) / T, t / T]``)::

    lr(p) = peak * p / w                                    p < w   (one warm-up, w = warmup_ratio)
    lr(p) = peak * (1 - q)             'linear'             q = (p - w) / (1 - w)
    lr(p) = peak * (1 + cos(pi q)) / 2 'cosine'
    lr(p) = peak                       'constant'

The server evaluates it at the two ends of each round and tells every client of the round
``(lr_start, lr_end)`` in its :class:`~hlora.protocol.TrainInstruction`; the client moves linearly
from one to the other over its local steps (:func:`step_learning_rate`), so a client's number of
steps does not change the schedule. ``'round'`` is the older per-round schedule: the instruction
carries no rates and each client warms up and decays to zero inside every round.
"""

from __future__ import annotations

import math

RUN_SCHEDULES: tuple[str, ...] = ("linear", "cosine", "constant")


def run_learning_rate(progress: float, peak: float, schedule: str, warmup_ratio: float) -> float:
    """The learning rate at ``progress`` (0: start of the run, 1: its end).

    Raises:
        ValueError: An unknown schedule, or progress outside ``[0, 1]``.
    """
    if schedule not in RUN_SCHEDULES:
        raise ValueError(f"unknown run-wide schedule {schedule!r} (allowed: {RUN_SCHEDULES})")
    if not 0.0 <= progress <= 1.0:
        raise ValueError(f"progress must be in [0, 1], got {progress}")
    if warmup_ratio > 0 and progress < warmup_ratio:
        return peak * progress / warmup_ratio
    if schedule == "constant" or warmup_ratio >= 1.0:
        return peak
    q = (progress - warmup_ratio) / (1.0 - warmup_ratio)
    if schedule == "linear":
        return peak * (1.0 - q)
    return peak * 0.5 * (1.0 + math.cos(math.pi * q))


def round_learning_rates(
    round_num: int, rounds: int, peak: float, schedule: str, warmup_ratio: float
) -> tuple[float, float] | None:
    """``(lr_start, lr_end)`` of round ``round_num`` (from 1) of ``rounds``; None for 'round'."""
    if schedule == "round":
        return None
    start = run_learning_rate((round_num - 1) / rounds, peak, schedule, warmup_ratio)
    end = run_learning_rate(round_num / rounds, peak, schedule, warmup_ratio)
    return start, end


def step_learning_rate(rates: tuple[float, float], step: int, total_steps: int) -> float:
    """The rate of local step ``step`` (from 0) of ``total_steps``, at the step's midpoint."""
    start, end = rates
    return start + (end - start) * (step + 0.5) / total_steps
