"""The run folder's files: the per-round metrics log and whole JSON files.

After each finished round the server appends one JSON object (one line) to ``metrics.jsonl``
through :class:`MetricsLog`; a round record looks like::

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

Files are written so that a crash or ``SIGKILL`` never leaves a half-written file behind: records
are appended with one write and ``fsync``; whole files are written to a temporary file in the same
folder and moved into place with :func:`os.replace`.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from hlora.errors import CheckpointError
from hlora.io import write_bytes_atomic
from hlora.report.summary import round_of

logger = logging.getLogger(__name__)

METRICS_FILE = "metrics.jsonl"
"""Name of the per-round metrics log inside a run folder."""


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


def _parse_record(line: bytes) -> dict[str, Any]:
    """Parse one line of a metrics log as a JSON object.

    Raises:
        ValueError: If the line is not valid UTF-8 JSON or not an object.
    """
    record = json.loads(line.decode("utf-8"))
    if not isinstance(record, dict):
        raise ValueError(f"expected a JSON object, got {type(record).__name__}")
    return record


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
        if round_of(record) is None:
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
            round_num = round_of(record)
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
