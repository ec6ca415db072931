"""Convergence plots: runs side by side, by round, with the majority-class line and each client
rank's truncation where the records hold them."""

from __future__ import annotations

import io
import logging
import math
import textwrap
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from hlora.io import write_bytes_atomic
from hlora.report.summary import eval_series, rank_series, round_train_loss, series

if TYPE_CHECKING:
    from matplotlib.figure import Figure

logger = logging.getLogger(__name__)

_TITLE_CHARS = 80


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
        rounds, values = series(records, round_train_loss)
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
