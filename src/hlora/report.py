"""Run reporting: the per-round metrics log, run summaries, plots, tables and live progress.

A federated run writes one folder. After each finished round the server appends one JSON object
(one line) to ``metrics.jsonl`` through :class:`MetricsLog`; a round record looks like::

    {"round": 3, "strategy": "hlora", "wall_time_s": 41.2, "round_time_s": 12.9,
     "train_loss": 0.61,
     "clients": [{"client_id": "client03", "rank": 8, "num_examples": 355, "loss": 0.58,
                  "bytes_sent": 120000, "bytes_received": 118000, "seconds": 1.2}],
     "dropped": [{"client_id": "client07", "reason": "..."}],
     "eval": {"accuracy": 0.71, "f1": 0.80, "loss": 0.55},
     "eval_by_rank": {"2": {"accuracy": 0.69, "f1": 0.79}, "16": {"accuracy": 0.71, "f1": 0.80}},
     "bytes_sent": 1200000, "bytes_received": 1180000}

Any key but ``round`` may be missing (``eval`` only on evaluation rounds) and any value may be
null. ``bytes_sent`` counts server-to-client traffic, ``bytes_received`` client-to-server.

The rest of the module reads such records back: :func:`summarize` reduces one run to final and
best metrics, rounds to a target and traffic; :func:`plot_convergence` draws runs side by side;
:func:`format_table` renders rows as aligned plain text; :class:`RoundProgress` shows progress on
the terminal while a run trains.

Files are written so that a crash or ``SIGKILL`` never leaves a half-written file behind: records
are appended with one write and ``fsync``; whole files are written to a temporary file in the same
folder and moved into place with :func:`os.replace`.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import math
import os
import textwrap
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any

import rich.console
import rich.progress

from hlora.errors import CheckpointError
from hlora.io import write_bytes_atomic

if TYPE_CHECKING:
    from matplotlib.figure import Figure

logger = logging.getLogger(__name__)

METRICS_FILE = "metrics.jsonl"
"""Name of the per-round metrics log inside a run folder."""

FLOAT_SIGNIFICANT_DIGITS = 4
"""Significant digits of floats in :func:`format_table`."""

_TABLE_GAP = "  "


# --------------------------------------------------------------------------------------------------
# Writing files safely
# --------------------------------------------------------------------------------------------------


def _to_jsonable(value: Any) -> Any:
    """A copy of ``value`` that :func:`json.dumps` writes as strict JSON.

    Mappings become dicts with string keys, tuples and lists become lists, non-finite floats
    (NaN, inf, which strict JSON cannot hold) become ``None``, numpy and torch scalars become
    Python numbers (through ``.item()``), paths become strings.

    Args:
        value: Any nesting of JSON-like values.

    Returns:
        A value made only of dict, list, str, int, float, bool and None.

    Raises:
        TypeError: If a value has no JSON form.
    """
    if value is None or isinstance(value, (str, bool, int)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, Mapping):
        return {str(key): _to_jsonable(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_to_jsonable(item) for item in value]
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    item = getattr(value, "item", None)
    if callable(item):  # numpy / torch scalars and one-element arrays
        with contextlib.suppress(TypeError, ValueError, RuntimeError):
            return _to_jsonable(item())
    tolist = getattr(value, "tolist", None)
    if callable(tolist):  # numpy arrays, torch tensors
        return _to_jsonable(tolist())
    raise TypeError(f"value of type {type(value).__name__} cannot be written as JSON: {value!r}")


def write_json(path: str | Path, data: Any) -> None:
    """Write ``data`` as a JSON file atomically (temporary file, then :func:`os.replace`).

    The file is indented by 2 spaces, has sorted keys and ends with a newline. Non-finite floats
    are written as ``null`` (strict JSON has no NaN); numpy/torch scalars are written as numbers.

    Args:
        path: The file to write; its parent folders are created.
        data: Any nesting of dicts, lists, strings, numbers, booleans and None.

    Raises:
        TypeError: If ``data`` holds a value with no JSON form (nothing is written then).
    """
    text = json.dumps(_to_jsonable(data), indent=2, sort_keys=True, allow_nan=False)
    write_bytes_atomic(Path(path), (text + "\n").encode("utf-8"))


# --------------------------------------------------------------------------------------------------
# The metrics log
# --------------------------------------------------------------------------------------------------


def _parse_record(line: bytes) -> dict[str, Any]:
    """Parse one line of a metrics log as a JSON object.

    Raises:
        ValueError: If the line is not valid UTF-8 JSON or not an object.
    """
    record = json.loads(line.decode("utf-8"))
    if not isinstance(record, dict):
        raise ValueError(f"expected a JSON object, got {type(record).__name__}")
    return record


def _round_of(record: Mapping[str, Any]) -> int | None:
    """The ``round`` of a record as an int, or None when it is missing or not an integer."""
    value = record.get("round")
    if isinstance(value, bool) or not isinstance(value, int):
        return None
    return value


class MetricsLog:
    """Append-only ``metrics.jsonl`` writer/reader of one run folder.

    Each record is one JSON object on one line. :meth:`append` writes a record with a single
    write followed by ``fsync``, so a killed process leaves at most the last line incomplete;
    :meth:`read` skips such a line and the next :meth:`append` cuts it off before writing.

    Args:
        path: The ``metrics.jsonl`` file (it need not exist yet).

    Example:
        >>> log = MetricsLog(run_dir / "metrics.jsonl")  # doctest: +SKIP
        >>> log.append({"round": 1, "train_loss": 0.69})  # doctest: +SKIP
        >>> log.read()  # doctest: +SKIP
        [{'round': 1, 'train_loss': 0.69}]
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({str(self.path)!r})"

    def append(self, record: Mapping[str, Any]) -> None:
        """Append one record as one line, flushed and ``fsync``-ed before returning.

        An incomplete last line left by a killed writer is cut off first (with a warning), so the
        new record never glues onto it. Non-finite floats are written as ``null``.

        Args:
            record: The round record; it must hold an integer ``round``.

        Raises:
            ValueError: If ``record`` has no integer ``round``.
            TypeError: If ``record`` holds a value with no JSON form (nothing is written then).
        """
        if _round_of(record) is None:
            raise ValueError(
                f"a metrics record needs an integer 'round', got {record.get('round')!r}"
            )
        line = json.dumps(_to_jsonable(record), allow_nan=False, separators=(", ", ": "))
        data = (line + "\n").encode("utf-8")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a+b", buffering=0) as f:
            self._repair_tail(f)
            view = memoryview(data)
            while view:  # a raw write may be partial; O_APPEND puts every part at the end
                written = f.write(view)
                view = view[written or 0 :]
            os.fsync(f.fileno())

    def _repair_tail(self, f: Any) -> None:
        """Make the file end with a newline before appending to it.

        A last line without its newline is either complete (it parses; the newline is added) or
        cut off by a killed writer (it is removed, with a warning).
        """
        size = f.seek(0, os.SEEK_END)
        if size == 0:
            return
        f.seek(size - 1)
        if f.read(1) == b"\n":
            return
        f.seek(0)
        content = f.read()
        start = content.rfind(b"\n") + 1
        tail = content[start:]
        try:
            _parse_record(tail)
        except ValueError:
            logger.warning(
                "%s: dropping incomplete last line %d (%d bytes) before appending",
                self.path,
                content.count(b"\n") + 1,
                len(tail),
            )
            f.truncate(start)
        else:
            f.write(b"\n")

    def read(self) -> list[dict[str, Any]]:
        """Read all records, in file order.

        Blank lines are ignored. An incomplete last line (a writer killed mid-write) is skipped
        with a logged warning; a corrupt line anywhere else is an error.

        Returns:
            The records; an empty list when the file does not exist yet.

        Raises:
            CheckpointError: If a line other than the last one is not a JSON object; the message
                names the file and the line number (1-based).
        """
        try:
            content = self.path.read_bytes()
        except FileNotFoundError:
            return []
        except OSError as err:
            raise CheckpointError(f"cannot read metrics log {self.path}: {err}") from err
        lines = content.split(b"\n")
        last = max((i for i, line in enumerate(lines) if line.strip()), default=-1)
        records: list[dict[str, Any]] = []
        for index, line in enumerate(lines[: last + 1]):
            if not line.strip():
                continue
            try:
                records.append(_parse_record(line))
            except ValueError as err:
                if index == last:
                    logger.warning(
                        "%s:%d: skipping incomplete last line (%s)", self.path, index + 1, err
                    )
                    continue
                raise CheckpointError(
                    f"{self.path}:{index + 1}: corrupt metrics record: {err}"
                ) from err
        return records

    def truncate_to_round(self, last_round: int) -> None:
        """Keep only the records with ``round <= last_round``, rewriting the file atomically.

        A run resuming from the checkpoint of ``last_round`` calls this so that rounds it will
        train again are not logged twice. An incomplete last line is dropped as well. Nothing
        happens when the file does not exist.

        Args:
            last_round: The last round to keep.

        Raises:
            CheckpointError: If the log has a corrupt line or a record without an integer
                ``round``.
        """
        if not self.path.exists():
            return
        kept: list[dict[str, Any]] = []
        for number, record in enumerate(self.read(), start=1):
            round_num = _round_of(record)
            if round_num is None:
                raise CheckpointError(
                    f"{self.path}: record {number} has no integer 'round' "
                    f"(got {record.get('round')!r}); cannot truncate to round {last_round}"
                )
            if round_num <= last_round:
                kept.append(record)
        text = "".join(
            json.dumps(_to_jsonable(record), allow_nan=False, separators=(", ", ": ")) + "\n"
            for record in kept
        )
        write_bytes_atomic(self.path, text.encode("utf-8"))


def load_run_records(run_dir: str | Path) -> list[dict[str, Any]]:
    """Read the round records of a run folder (its ``metrics.jsonl``).

    Args:
        run_dir: The run folder.

    Returns:
        The records in file order.

    Raises:
        CheckpointError: If the folder or its ``metrics.jsonl`` does not exist (the message names
            the path), or the log is corrupt.
    """
    folder = Path(run_dir)
    if not folder.is_dir():
        raise CheckpointError(f"run folder not found: {folder}")
    path = folder / METRICS_FILE
    if not path.is_file():
        raise CheckpointError(f"no {METRICS_FILE} in run folder {folder} (expected {path})")
    return MetricsLog(path).read()


# --------------------------------------------------------------------------------------------------
# Summaries
# --------------------------------------------------------------------------------------------------


def _number(value: Any) -> float | None:
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


def _eval_value(record: Mapping[str, Any], metric: str) -> float | None:
    """The finite value of ``eval[metric]`` in a record, or None."""
    evaluation = record.get("eval")
    if not isinstance(evaluation, Mapping):
        return None
    return _number(evaluation.get(metric))


def _round_train_loss(record: Mapping[str, Any]) -> float | None:
    """A record's ``train_loss``; else the example-weighted mean of its clients' losses; or None."""
    loss = _number(record.get("train_loss"))
    if loss is not None:
        return loss
    clients = record.get("clients")
    if not isinstance(clients, Sequence) or isinstance(clients, (str, bytes)):
        return None
    total = weight_sum = 0.0
    for client in clients:
        if not isinstance(client, Mapping):
            continue
        client_loss = _number(client.get("loss"))
        weight = _number(client.get("num_examples"))
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
            value = _eval_value(record, metric)
            if value is None:
                continue
            final[metric] = value
            current = best[metric]
            if current is None or (value < current if minimize else value > current):
                best[metric] = value
                best_round[metric] = _round_of(record)

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
                value = _eval_value(record, metric)
                if value is not None and (value <= target if minimize else value >= target):
                    reached[metric] = _round_of(record)
                    break
        summary["rounds_to_target"] = reached

    sent = math.fsum(_number(record.get("bytes_sent")) or 0.0 for record in records)
    received = math.fsum(_number(record.get("bytes_received")) or 0.0 for record in records)
    summary["total_bytes_sent"] = int(sent) if sent.is_integer() else sent
    summary["total_bytes_received"] = int(received) if received.is_integer() else received
    summary["mean_bytes_per_round"] = (sent + received) / len(records) if records else None
    last = records[-1] if records else None
    summary["wall_time_s"] = _number(last.get("wall_time_s")) if last is not None else None
    summary["mean_train_loss_last_round"] = _round_train_loss(last) if last is not None else None
    by_rank: dict[str, Any] = {}
    for record in records:
        if isinstance(record.get("eval_by_rank"), Mapping) and record["eval_by_rank"]:
            by_rank = dict(record["eval_by_rank"])
    summary["final_by_rank"] = by_rank
    return summary


# --------------------------------------------------------------------------------------------------
# Plots
# --------------------------------------------------------------------------------------------------


def _series(
    records: Sequence[Mapping[str, Any]], value_of: Callable[[Mapping[str, Any]], float | None]
) -> tuple[list[int], list[float]]:
    """The (round, value) points of the records where ``value_of(record)`` is a finite number."""
    points: list[tuple[int, float]] = []
    for record in records:
        round_num = _round_of(record)
        value = value_of(record) if round_num is not None else None
        if round_num is not None and value is not None:
            points.append((round_num, value))
    points.sort()
    return [p[0] for p in points], [p[1] for p in points]


def eval_series(records: Sequence[Mapping[str, Any]], metric: str) -> tuple[list[int], list[float]]:
    """The rounds at which ``eval[metric]`` was a finite number, and those values, by round."""
    return _series(records, lambda r: _eval_value(r, metric))


# The figure is 8 inches wide; a suptitle line of this many characters still fits it.
_TITLE_CHARS = 80


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
            return _number(by_rank[rank].get(metric))

        return read

    return {r: _series(records, value_of(r)) for r in sorted(ranks, key=_rank_key)}


def _rank_key(rank: str) -> tuple[int, str]:
    return (int(rank), rank) if rank.isdigit() else (1 << 30, rank)


def convergence_figure(
    runs: Mapping[str, Sequence[Mapping[str, Any]]],
    metric: str,
    *,
    title: str = "",
    reference_lines: Mapping[str, float] | None = None,
) -> Figure:
    """The convergence figure of one or more runs (see :func:`plot_convergence`).

    The figure is drawn on an Agg canvas created here, without :mod:`matplotlib.pyplot`: no
    global backend is switched, no window opens and no figure is registered. A long ``title`` is
    wrapped onto several lines so that it stays inside the figure.

    Raises:
        ValueError: If ``runs`` is empty.
    """
    if not runs:
        raise ValueError("plot_convergence needs at least one run")
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    fig = Figure(figsize=(8.0, 6.5), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    ax_metric, ax_loss = fig.subplots(2, 1, sharex=True, height_ratios=(3, 2))
    any_metric = any_loss = False
    for index, (label, records) in enumerate(runs.items()):
        color = f"C{index % 10}"
        rounds, values = eval_series(records, metric)
        if rounds:
            any_metric = True
            ax_metric.plot(rounds, values, "-o", color=color, label=label, markersize=3.5)
        else:
            logger.warning("run %r has no evaluation of %r to plot", label, metric)
        if len(runs) == 1:  # one run: each client rank's truncation beside the global model
            styles = ("--", ":", "-.", (0, (1, 3)))
            for k, (rank, (r_rounds, r_values)) in enumerate(rank_series(records, metric).items()):
                if r_rounds:
                    any_metric = True
                    ax_metric.plot(
                        r_rounds,
                        r_values,
                        linestyle=styles[k % len(styles)],
                        color=f"C{(k + 1) % 10}",
                        linewidth=1.1,
                        label=f"rank-{rank} truncation",
                    )
        rounds, values = _series(records, _round_train_loss)
        if rounds:
            any_loss = True
            ax_loss.plot(rounds, values, "-", color=color, label=label, linewidth=1.2)
    for k, (name, value) in enumerate((reference_lines or {}).items()):
        if math.isfinite(value):
            ax_metric.axhline(
                value, color="0.35" if k == 0 else "0.6", linestyle=":", linewidth=1.2, label=name
            )
    for ax, has_data, what in ((ax_metric, any_metric, metric), (ax_loss, any_loss, "train loss")):
        ax.grid(True, alpha=0.3)
        if has_data:
            ax.legend(loc="best", fontsize="small")
        else:
            ax.text(0.5, 0.5, f"no {what} values", ha="center", va="center", transform=ax.transAxes)
    ax_metric.set_ylabel(metric)
    ax_loss.set_ylabel("train loss")
    ax_loss.set_xlabel("round")
    ax_loss.xaxis.set_major_locator(MaxNLocator(integer=True))
    fig.suptitle(textwrap.fill(title or f"{metric} by round", _TITLE_CHARS))
    return fig


def plot_convergence(
    runs: Mapping[str, Sequence[Mapping[str, Any]]],
    metric: str,
    out_path: str | Path,
    *,
    title: str = "",
    reference_lines: Mapping[str, float] | None = None,
) -> Path:
    """Plot the convergence of one or more runs to a PNG file.

    The top panel shows ``eval[metric]`` against the round, one solid line (with point markers,
    so sparse or single evaluations stay visible) per run (for a single run, also one dashed
    line per client rank's truncation, from ``eval_by_rank``) and a dotted horizontal line per
    entry of ``reference_lines`` (e.g. the majority class, the centralized model); the bottom
    panel shows ``train_loss`` (or the clients' mean loss when it is missing) with the same
    colours. Rounds without a value
    are skipped, so runs that evaluate every few rounds connect their evaluations. The figure is
    :func:`convergence_figure`'s; the PNG is written atomically.

    Args:
        runs: Run label -> that run's round records.
        metric: The ``eval`` metric to plot, e.g. ``"accuracy"``.
        out_path: The PNG file to write; its parent folders are created.
        title: Figure title; defaults to the metric's name.
        reference_lines: Label -> value of horizontal reference lines.

    Returns:
        ``out_path`` as a :class:`~pathlib.Path`.

    Raises:
        ValueError: If ``runs`` is empty.
    """
    fig = convergence_figure(runs, metric, title=title, reference_lines=reference_lines)
    path = Path(out_path)
    buffer = io.BytesIO()
    try:
        fig.savefig(buffer, format="png")
    finally:
        fig.clear()
    write_bytes_atomic(path, buffer.getvalue())
    return path


# --------------------------------------------------------------------------------------------------
# Tables
# --------------------------------------------------------------------------------------------------


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def format_cell(value: Any) -> str:
    """Format one table cell: None as ``-``, floats to 4 significant digits, the rest as text.

    Args:
        value: The cell value.

    Returns:
        The text of the cell, on one line.
    """
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{FLOAT_SIGNIFICANT_DIGITS}g}"
    return " ".join(str(value).splitlines())


def format_table(rows: Sequence[Mapping[str, Any]], columns: Sequence[str]) -> str:
    """Render rows as a plain-text table with aligned columns.

    The first line holds the column names, the second dashes; one line per row follows. Columns
    are separated by two spaces; a column whose values are all numbers (or missing) is
    right-aligned, any other column left-aligned. Floats show 4 significant digits (``0.7107``,
    ``12.9``, ``1.2e+06``), None and missing keys show ``-``. Lines carry no trailing spaces and
    the text has no final newline.

    Args:
        rows: One mapping per row; keys not in ``columns`` are ignored.
        columns: The keys to show, in order (also the header).

    Returns:
        The table as text.
    """
    cells = [[format_cell(row.get(column)) for column in columns] for row in rows]
    right = [
        all(row.get(column) is None or _is_number(row.get(column)) for row in rows)
        and any(row.get(column) is not None for row in rows)
        for column in columns
    ]
    widths = [
        max([len(column)] + [len(line[i]) for line in cells]) for i, column in enumerate(columns)
    ]

    def render(texts: Sequence[str]) -> str:
        parts = [
            text.rjust(width) if align_right else text.ljust(width)
            for text, width, align_right in zip(texts, widths, right, strict=True)
        ]
        return _TABLE_GAP.join(parts).rstrip()

    lines = [render(list(columns)), render(["-" * width for width in widths])]
    lines.extend(render(line) for line in cells)
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------------
# Live progress
# --------------------------------------------------------------------------------------------------


def format_round_line(record: Mapping[str, Any], total_rounds: int, seconds: float | None) -> str:
    """The one-line report of a finished round.

    For example ``round 3/10  loss 0.6123  accuracy 0.7107  f1 0.8021  [12.9 s]``: the training
    loss, then every numeric ``eval`` metric except the evaluation loss, in record order, then
    the round's duration. Missing parts are left out (a missing training loss shows ``-``).

    Args:
        record: The round record.
        total_rounds: The number of rounds of the run.
        seconds: The round's duration, used when the record has no ``round_time_s``.

    Returns:
        The line, without a newline.
    """
    round_num = _round_of(record)
    parts = [f"round {'?' if round_num is None else round_num}/{total_rounds}"]
    loss = _round_train_loss(record)
    parts.append("loss -" if loss is None else f"loss {loss:.4f}")
    evaluation = record.get("eval")
    if isinstance(evaluation, Mapping):
        for name, raw in evaluation.items():
            value = _number(raw)
            if value is not None and name != "loss":
                parts.append(f"{name} {value:.4f}")
    duration = _number(record.get("round_time_s"))
    if duration is None:
        duration = seconds
    if duration is not None:
        parts.append(f"[{duration:.1f} s]")
    return "  ".join(parts)


class RoundProgress:
    """Live progress of a federated run on the terminal, with :mod:`rich`.

    On a terminal it shows a bar over rounds and, inside a round, a bar over clients described
    as ``round 3/10 · client07 (r=8) · loss 0.612``. After each round it prints one line, e.g.
    ``round 3/10  loss 0.6123  accuracy 0.7107  f1 0.8021  [12.9 s]`` (see
    :func:`format_round_line`), and :meth:`log` prints free lines such as dropped clients. When
    the console is not a terminal (a log file, CI) there are no bars, but the round and log lines
    are still printed. With ``enabled=False`` nothing is printed at all.

    Lines are printed verbatim: no rich markup or highlighting, no wrapping.

    Args:
        total_rounds: The number of rounds of the run.
        enabled: Whether to show anything.
        console: The console to print to; by default a new console on standard error.

    Raises:
        ValueError: If ``total_rounds`` is not positive.

    Example:
        >>> with RoundProgress(10) as progress:  # doctest: +SKIP
        ...     progress.start_round(1, num_clients=4)
        ...     progress.client_done("client00", rank=8, loss=0.61)
        ...     progress.end_round(record)
    """

    def __init__(
        self,
        total_rounds: int,
        *,
        enabled: bool = True,
        console: rich.console.Console | None = None,
    ) -> None:
        if total_rounds < 1:
            raise ValueError(f"total_rounds must be positive, got {total_rounds}")
        self.total_rounds = total_rounds
        self.enabled = enabled
        self.console: rich.console.Console | None = None
        self._progress: rich.progress.Progress | None = None
        self._rounds_task: rich.progress.TaskID | None = None
        self._clients_task: rich.progress.TaskID | None = None
        self._round = 0
        self._round_started: float | None = None
        if not enabled:
            return
        self.console = console if console is not None else rich.console.Console(stderr=True)
        if self.console.is_terminal and not self.console.is_dumb_terminal:
            self._progress = rich.progress.Progress(
                rich.progress.TextColumn("{task.description}", markup=False),
                rich.progress.BarColumn(),
                rich.progress.MofNCompleteColumn(),
                rich.progress.TimeElapsedColumn(),
                console=self.console,
                transient=True,
            )
            self._rounds_task = self._progress.add_task("rounds", total=total_rounds)
            self._clients_task = self._progress.add_task("clients", total=None, visible=False)

    def __enter__(self) -> RoundProgress:
        if self._progress is not None:
            self._progress.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        if self._progress is not None:
            self._progress.stop()

    def _bars(self) -> Iterator[tuple[rich.progress.Progress, rich.progress.TaskID]]:
        """Yield the progress and the clients task when live bars are shown."""
        if self._progress is not None and self._clients_task is not None:
            yield self._progress, self._clients_task

    def _round_label(self) -> str:
        return f"round {self._round}/{self.total_rounds}"

    def start_round(self, round_num: int, num_clients: int) -> None:
        """Start a round: the round bar shows the rounds before it, the client bar restarts.

        Args:
            round_num: The round about to train (1-based).
            num_clients: The number of clients selected for it.
        """
        self._round = round_num
        self._round_started = time.monotonic()
        for progress, clients_task in self._bars():
            if self._rounds_task is not None:
                progress.update(
                    self._rounds_task, completed=min(max(round_num - 1, 0), self.total_rounds)
                )
            progress.reset(
                clients_task,
                total=max(num_clients, 0),
                description=self._round_label(),
                visible=True,
            )

    def client_done(self, client_id: str, rank: int, loss: float | None) -> None:
        """Advance the client bar by one finished client.

        Args:
            client_id: The client's id.
            rank: The client's LoRA rank.
            loss: The client's training loss, if it reported one.
        """
        value = _number(loss)
        loss_text = "-" if value is None else f"{value:.3f}"
        for progress, clients_task in self._bars():
            progress.update(
                clients_task,
                advance=1,
                description=f"{self._round_label()} · {client_id} (r={rank}) · loss {loss_text}",
            )

    def end_round(self, record: Mapping[str, Any]) -> None:
        """Finish a round: advance the round bar and print the round's line.

        Args:
            record: The round record (as appended to ``metrics.jsonl``).
        """
        round_num = _round_of(record)
        if round_num is None:
            round_num = self._round
            record = {**record, "round": round_num}
        seconds = None
        if self._round_started is not None:
            seconds = time.monotonic() - self._round_started
            self._round_started = None
        for progress, clients_task in self._bars():
            progress.update(clients_task, visible=False)
            if self._rounds_task is not None:
                progress.update(self._rounds_task, completed=min(round_num, self.total_rounds))
        self.log(format_round_line(record, self.total_rounds, seconds))

    def log(self, message: str) -> None:
        """Print one line above the bars (verbatim; nothing when disabled).

        Args:
            message: The line, e.g. ``"dropped client07: timeout"``.
        """
        if self.console is None:
            return
        self.console.print(message, markup=False, highlight=False, emoji=False, soft_wrap=True)
