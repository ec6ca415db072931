"""A data owner's own examples: a GLUE-layout folder, or one TSV, CSV or JSONL file.

A node that trains on its own data (``own-data`` in the Flower engine) reads them here, and
trains on all of them. What each form must hold, for a task's sentence pairs:

* **a GLUE-layout folder** (``<dir>/MRPC/train.tsv``, ``<dir>/RTE/train.tsv``, ...): the
  task's ``train.tsv`` is the training set; its ``dev.tsv``, when present, is the held-out set;
* **a ``.tsv`` file**: the task's GLUE TSV format, header row included (MRPC: ``Quality``,
  ``#1 ID``, ``#2 ID``, ``#1 String``, ``#2 String``; RTE: ``index``, ``sentence1``,
  ``sentence2``, ``label``; QQP: ``id``, ``qid1``, ``qid2``, ``question1``, ``question2``,
  ``is_duplicate``);
* **a ``.csv`` file** (comma-separated, a header row) or **a ``.jsonl`` file** (one JSON
  object a line): the columns of the task on the Hugging Face hub, ``sentence1``,
  ``sentence2``, ``label`` (MRPC, RTE) or ``question1``, ``question2``, ``label`` (QQP,
  ``qqp-sample``). ``label`` is the class id (``0`` / ``1``) or, for RTE, also its name
  (``entailment`` = 0, ``not_entailment`` = 1). Other columns are ignored.

A file is all training data (no held-out split). Every row is checked: a missing column, a bad
label, an empty text or an empty file raises :class:`~hlora.errors.DataError` naming the file
and the line.
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType

from hlora.data.glue import Example, get_task, read_task_tsv, task_tsv_path
from hlora.errors import DataError

FILE_SUFFIXES: tuple[str, ...] = (".tsv", ".csv", ".jsonl")
"""The single-file forms :func:`read_own_data` accepts."""

_TEXT_COLUMNS: Mapping[str, tuple[str, str]] = MappingProxyType(
    {
        "mrpc": ("sentence1", "sentence2"),
        "rte": ("sentence1", "sentence2"),
        "qqp": ("question1", "question2"),
        "qqp-sample": ("question1", "question2"),
    }
)
_LABEL_NAMES: Mapping[str, Mapping[str, int]] = MappingProxyType(
    {"rte": MappingProxyType({"entailment": 0, "not_entailment": 1})}
)
LABEL_COLUMN = "label"


@dataclass(frozen=True)
class OwnData:
    """One data owner's examples.

    Attributes:
        train: The training examples, in file order (all of them).
        held_out: The held-out examples (a GLUE folder's ``dev.tsv``; empty for a file).
        files: The files read, training file first.
    """

    train: tuple[Example, ...]
    held_out: tuple[Example, ...]
    files: tuple[Path, ...]


def columns(task: str) -> tuple[str, str, str]:
    """The CSV / JSONL columns of ``task``: first text, second text, label.

    Raises:
        DataError: An unknown task.
    """
    get_task(task)
    text_a, text_b = _TEXT_COLUMNS[task]
    return text_a, text_b, LABEL_COLUMN


def read_own_data(path: str | Path, task: str) -> OwnData:
    """Read a data owner's examples of ``task`` (see the module docstring for the forms).

    Args:
        path: A GLUE-layout folder, or a ``.tsv``, ``.csv`` or ``.jsonl`` file.
        task: The run's task name.

    Returns:
        The training examples (all rows) and, for a folder with ``dev.tsv``, the held-out ones.

    Raises:
        DataError: A missing path, an unsupported suffix, or a malformed file (naming the file
            and the line).
    """
    get_task(task)
    where = Path(path).expanduser()
    if where.is_dir():
        train_file = task_tsv_path(where, task, "train")
        if not train_file.is_file():
            raise DataError(
                f"'{where}' is a folder without '{train_file.relative_to(where)}': give a "
                f"GLUE-layout folder or one {', '.join(FILE_SUFFIXES)} file"
            )
        dev_file = task_tsv_path(where, task, "dev")
        held = read_task_tsv(dev_file, task) if dev_file.is_file() else ()
        files = (train_file, dev_file) if held else (train_file,)
        return OwnData(read_task_tsv(train_file, task), held, files)
    if not where.is_file():
        raise DataError(f"own data '{where}' does not exist")
    suffix = where.suffix.lower()
    if suffix == ".tsv":
        return OwnData(read_task_tsv(where, task), (), (where,))
    if suffix == ".csv":
        return OwnData(tuple(_examples(where, task, _csv_rows(where, columns(task)))), (), (where,))
    if suffix == ".jsonl":
        return OwnData(tuple(_examples(where, task, _jsonl_rows(where))), (), (where,))
    raise DataError(
        f"own data '{where}' has suffix {where.suffix!r}: expected a GLUE-layout folder or one "
        f"of {', '.join(FILE_SUFFIXES)}"
    )


def _read_text(path: Path) -> str:
    try:
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"cannot read '{path}': {type(exc).__name__}: {exc}") from exc
    if not text.strip():
        raise DataError(f"'{path}' line 1: the file is empty")
    return text


def _csv_rows(path: Path, required: tuple[str, ...]) -> Iterator[tuple[int, Mapping[str, object]]]:
    """(line number, row) of a CSV file whose header row names the ``required`` columns."""
    # newline="": a quoted cell keeps its line breaks, and only \n, \r, \r\n end a line
    reader = csv.DictReader(io.StringIO(_read_text(path), newline=""))
    header = list(reader.fieldnames or [])
    if len(set(header)) != len(header):
        raise DataError(f"'{path}' line 1: duplicate column names in {header!r}")
    missing = [c for c in required if c not in header]
    if missing:
        raise DataError(
            f"'{path}' line 1: no {', '.join(repr(c) for c in missing)} column in the header "
            f"{header!r}; expected the columns {', '.join(repr(c) for c in required)}"
        )
    for row in reader:
        if None in row:
            raise DataError(
                f"'{path}' line {reader.line_num}: more fields than the header's {len(header)}"
            )
        yield reader.line_num, row


def _jsonl_rows(path: Path) -> Iterator[tuple[int, Mapping[str, object]]]:
    """(line number, object) of a JSON Lines file; blank lines are skipped."""
    for number, line in enumerate(_read_text(path).splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DataError(f"'{path}' line {number}: not JSON ({exc.msg})") from exc
        if not isinstance(row, dict):
            raise DataError(f"'{path}' line {number}: a {type(row).__name__}, not a JSON object")
        yield number, row


def _label(value: object, task: str, where: str) -> int:
    names = _LABEL_NAMES.get(task, {})
    num_labels = get_task(task).num_labels
    number: object = value
    if isinstance(value, str) and value.strip() in names:
        return names[value.strip()]
    if isinstance(value, str) and value.strip().isdigit():
        number = int(value.strip())
    if isinstance(number, int) and not isinstance(number, bool) and 0 <= number < num_labels:
        return number
    allowed = [str(i) for i in range(num_labels)] + list(names)
    raise DataError(f"{where}: label {value!r} is not one of {', '.join(allowed)}")


def _examples(
    path: Path, task: str, rows: Iterator[tuple[int, Mapping[str, object]]]
) -> Iterator[Example]:
    col_a, col_b, col_label = columns(task)
    count = 0
    for number, row in rows:
        where = f"'{path}' line {number}"
        missing = [c for c in (col_a, col_b, col_label) if c not in row or row[c] is None]
        if missing:
            raise DataError(
                f"{where}: no {', '.join(repr(c) for c in missing)} column; expected the "
                f"columns {col_a!r}, {col_b!r}, {col_label!r}"
            )
        texts = []
        for column in (col_a, col_b):
            text = row[column]
            if not isinstance(text, str) or not text.strip():
                raise DataError(f"{where}: column {column!r} is {text!r}, expected a text")
            texts.append(text)
        count += 1
        yield Example(texts[0], texts[1], _label(row[col_label], task, where))
    if count == 0:
        raise DataError(f"'{path}' line 1: the file has no data rows")
