"""The learning-rate schedule of local training, over a round or over the whole run.

A run-wide schedule is a function of the run's progress ``p`` in ``[0, 1]`` (round ``t`` of
``T`` covers ``[(t - 1) / T, t / T]``)::

    lr(p) = peak * p / w                                    p < w   (one warm-up, w = warmup_ratio)
    lr(p) = peak * (1 - q)             'linear'             q = (p - w) / (1 - w)
    lr(p) = peak * (1 + cos(pi q)) / 2 'cosine'
    lr(p) = peak                       'constant'

The server tells every client of a round the schedule and the stretch of progress the round
covers (a :class:`RoundSchedule` in its :class:`~hlora.protocol.TrainInstruction`); the client
spreads its own local steps over that stretch, so however many steps a client takes, the run
follows one schedule. ``'round'`` is the older per-round schedule: the instruction
carries no rates and each client warms up and decays to zero inside every round.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

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


@dataclass(frozen=True)
class RoundSchedule:
    """The part of a run-wide schedule one round covers: what the server tells a client.

    Attributes:
        schedule: ``linear``, ``cosine`` or ``constant``.
        peak: The peak learning rate.
        warmup_ratio: Share of the run spent warming up.
        start: The run's progress when the round starts, in ``[0, 1]``.
        end: The run's progress when the round ends, in ``[start, 1]``.
    """

    schedule: str
    peak: float
    warmup_ratio: float
    start: float
    end: float

    def __post_init__(self) -> None:
        if self.schedule not in RUN_SCHEDULES:
            raise ValueError(f"unknown run-wide schedule {self.schedule!r}")
        if not 0.0 <= self.start <= self.end <= 1.0:
            raise ValueError(f"need 0 <= start <= end <= 1, got {self.start}, {self.end}")
        if not (math.isfinite(self.peak) and self.peak >= 0 and 0 <= self.warmup_ratio <= 1):
            raise ValueError(f"bad peak {self.peak} or warm-up ratio {self.warmup_ratio}")

    def rate(self, step: int, total_steps: int) -> float:
        """The rate of local step ``step`` (from 0) of ``total_steps``, at the step's midpoint."""
        progress = self.start + (self.end - self.start) * (step + 0.5) / total_steps
        return run_learning_rate(progress, self.peak, self.schedule, self.warmup_ratio)

    def bounds(self) -> tuple[float, float]:
        """The rates at the round's two ends (for the metrics log)."""
        return (
            run_learning_rate(self.start, self.peak, self.schedule, self.warmup_ratio),
            run_learning_rate(self.end, self.peak, self.schedule, self.warmup_ratio),
        )


def round_schedule(
    round_num: int, rounds: int, peak: float, schedule: str, warmup_ratio: float
) -> RoundSchedule | None:
    """The schedule of round ``round_num`` (from 1) of ``rounds``; None for ``'round'``."""
    if schedule == "round":
        return None
    return RoundSchedule(schedule, peak, warmup_ratio, (round_num - 1) / rounds, round_num / rounds)
