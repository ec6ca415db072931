"""Rows rendered as aligned plain-text tables (``hlora compare``, the benchmarks)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

FLOAT_SIGNIFICANT_DIGITS = 4
"""Significant digits of floats in :func:`format_table`."""

_TABLE_GAP = "  "


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
