"""Run reporting, one job a module:

- :mod:`~hlora.report.records`: the run folder's ``metrics.jsonl`` (:class:`MetricsLog`, one
  JSON line a round, appended with one write and ``fsync``) and whole JSON files, written
  atomically;
- :mod:`~hlora.report.summary`: reading the records back, and :func:`summarize`;
- :mod:`~hlora.report.plots`: :func:`plot_convergence`;
- :mod:`~hlora.report.tables`: :func:`format_table`;
- :mod:`~hlora.report.progress`: :class:`RoundProgress` on the terminal.
"""

from hlora.report.plots import convergence_figure, plot_convergence
from hlora.report.progress import RoundProgress, format_round_line
from hlora.report.records import METRICS_FILE, MetricsLog, load_run_records, write_json
from hlora.report.summary import eval_series, lower_is_better, rank_series, summarize
from hlora.report.tables import format_cell, format_table

__all__ = [
    "METRICS_FILE",
    "MetricsLog",
    "RoundProgress",
    "convergence_figure",
    "eval_series",
    "format_cell",
    "format_round_line",
    "format_table",
    "load_run_records",
    "lower_is_better",
    "plot_convergence",
    "rank_series",
    "summarize",
    "write_json",
]
