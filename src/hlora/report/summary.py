"""Reading round records back: the values of one record, a run's series by round, and
:func:`summarize`, which reduces one run to its final and best metrics, rounds to a target and
traffic. Every reader tolerates missing keys and non-numbers (see :mod:`hlora.report.records`)."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any


def round_of(record: Mapping[str, Any]) -> int | None:
    """The ``round`` of a record as an int, or None when it is missing or not an integer."""
    value = record.get("round")
    if isinstance(value, bool) or not isinstance(value, int):
        return None
    return value


def as_number(value: Any) -> float | None:
    """``value`` as a finite float, or None when it is missing, not a number, NaN or infinite."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    number = float(value)
    return number if math.isfinite(number) else None


def lower_is_better(metric: str) -> bool:
    """Whether smaller values of ``metric`` are better: losses (names ending in ``loss``) and
    perplexity."""
    name = metric.lower()
    return name.endswith("loss") or name == "perplexity"


def eval_value(record: Mapping[str, Any], metric: str) -> float | None:
    """The finite value of ``eval[metric]`` in a record, or None."""
    evaluation = record.get("eval")
    if not isinstance(evaluation, Mapping):
        return None
    return as_number(evaluation.get(metric))


def round_train_loss(record: Mapping[str, Any]) -> float | None:
    """A record's ``train_loss``; else the example-weighted mean of its clients' losses; or None."""
    loss = as_number(record.get("train_loss"))
    if loss is not None:
        return loss
    clients = record.get("clients")
    if not isinstance(clients, Sequence) or isinstance(clients, (str, bytes)):
        return None
    total = weight_sum = 0.0
    for client in clients:
        if not isinstance(client, Mapping):
            continue
        client_loss = as_number(client.get("loss"))
        weight = as_number(client.get("num_examples"))
        if client_loss is None:
            continue
        weight = 1.0 if weight is None or weight <= 0 else weight
        total += weight * client_loss
        weight_sum += weight
    return total / weight_sum if weight_sum else None


def summarize(
    records: Sequence[Mapping[str, Any]],
    metric_names: Sequence[str],
    *,
    targets: Mapping[str, float] | None = None,
) -> dict[str, Any]:
    """Reduce the round records of one run to its headline numbers.

    Records are taken in the given (file, hence chronological) order. Missing, null and
    non-finite values are ignored. Metrics are maximized, except losses (names ending in
    ``loss``, e.g. ``"loss"`` for ``eval.loss``), which are minimized for ``best`` and reach
    their target by falling to it.

    Args:
        records: The round records, e.g. from :func:`load_run_records`.
        metric_names: The ``eval`` metrics to summarize, e.g. ``("accuracy", "f1")``.
        targets: Optional target value per metric, for ``rounds_to_target``.

    Returns:
        A dict with:

        - ``rounds``: the number of records;
        - ``final``: per metric, its value at the last evaluation that reported it (None if none);
        - ``best``: per metric, its best value over all evaluations (None if none);
        - ``best_round``: per metric, the first round reaching ``best`` (None if none);
        - ``rounds_to_target`` (only when ``targets`` is given): per target metric, the first
          round whose evaluation reached the target, or None;
        - ``total_bytes_sent`` / ``total_bytes_received``: sums over records (missing counts 0);
        - ``mean_bytes_per_round``: ``(total_bytes_sent + total_bytes_received) / rounds``,
          None without records;
        - ``wall_time_s``: the last record's ``wall_time_s`` (None if missing);
        - ``mean_train_loss_last_round``: the last record's ``train_loss``, else the
          ``num_examples``-weighted mean of its clients' losses, else None;
        - ``final_by_rank``: client rank -> the metrics of that rank's truncation of the global
          update at the last evaluation that had them (empty when none was evaluated).
    """
    final: dict[str, float | None] = {}
    best: dict[str, float | None] = {}
    best_round: dict[str, int | None] = {}
    for metric in metric_names:
        final[metric] = best[metric] = best_round[metric] = None
        minimize = lower_is_better(metric)
        for record in records:
            value = eval_value(record, metric)
            if value is None:
                continue
            final[metric] = value
            current = best[metric]
            if current is None or (value < current if minimize else value > current):
                best[metric] = value
                best_round[metric] = round_of(record)

    summary: dict[str, Any] = {
        "rounds": len(records),
        "final": final,
        "best": best,
        "best_round": best_round,
    }
    if targets is not None:
        reached: dict[str, int | None] = {}
        for metric, target in targets.items():
            reached[metric] = None
            minimize = lower_is_better(metric)
            for record in records:
                value = eval_value(record, metric)
                if value is not None and (value <= target if minimize else value >= target):
                    reached[metric] = round_of(record)
                    break
        summary["rounds_to_target"] = reached

    sent = math.fsum(as_number(record.get("bytes_sent")) or 0.0 for record in records)
    received = math.fsum(as_number(record.get("bytes_received")) or 0.0 for record in records)
    summary["total_bytes_sent"] = int(sent) if sent.is_integer() else sent
    summary["total_bytes_received"] = int(received) if received.is_integer() else received
    summary["mean_bytes_per_round"] = (sent + received) / len(records) if records else None
    last = records[-1] if records else None
    summary["wall_time_s"] = as_number(last.get("wall_time_s")) if last is not None else None
    summary["mean_train_loss_last_round"] = round_train_loss(last) if last is not None else None
    by_rank: dict[str, Any] = {}
    for record in records:
        if isinstance(record.get("eval_by_rank"), Mapping) and record["eval_by_rank"]:
            by_rank = dict(record["eval_by_rank"])
    summary["final_by_rank"] = by_rank
    return summary


def series(
    records: Sequence[Mapping[str, Any]], value_of: Callable[[Mapping[str, Any]], float | None]
) -> tuple[list[int], list[float]]:
    """The (round, value) points of the records where ``value_of(record)`` is a finite number."""
    points: list[tuple[int, float]] = []
    for record in records:
        round_num = round_of(record)
        value = value_of(record) if round_num is not None else None
        if round_num is not None and value is not None:
            points.append((round_num, value))
    points.sort()
    return [p[0] for p in points], [p[1] for p in points]


def eval_series(records: Sequence[Mapping[str, Any]], metric: str) -> tuple[list[int], list[float]]:
    """The rounds at which ``eval[metric]`` was a finite number, and those values, by round."""
    return series(records, lambda r: eval_value(r, metric))


def rank_series(
    records: Sequence[Mapping[str, Any]], metric: str
) -> dict[str, tuple[list[int], list[float]]]:
    """Per client rank, the rounds and values of ``eval_by_rank[rank][metric]`` (by rank)."""
    ranks: set[str] = set()
    for record in records:
        if isinstance(record.get("eval_by_rank"), Mapping):
            ranks.update(record["eval_by_rank"])

    def value_of(rank: str) -> Callable[[Mapping[str, Any]], float | None]:
        def read(record: Mapping[str, Any]) -> float | None:
            by_rank = record.get("eval_by_rank")
            if not isinstance(by_rank, Mapping) or not isinstance(by_rank.get(rank), Mapping):
                return None
            return as_number(by_rank[rank].get(metric))

        return read

    return {r: series(records, value_of(r)) for r in sorted(ranks, key=_rank_key)}


def _rank_key(rank: str) -> tuple[int, str]:
    return (int(rank), rank) if rank.isdigit() else (1 << 30, rank)
