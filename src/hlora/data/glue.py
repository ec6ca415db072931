"""GLUE sentence-pair tasks (MRPC, RTE, QQP) and a local QQP sample.

Data comes from a local folder in the standard GLUE layout first (``MRPC/train.tsv``,
``MRPC/dev.tsv``, ``RTE/...``, ``QQP/...``) and, when that is missing, from the Hugging Face
hub dataset ``nyu-mll/glue``. Labels follow the GLUE/Hugging Face convention: MRPC 1 =
paraphrase; RTE 0 = entailment, 1 = not_entailment; QQP 1 = duplicate.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Any

from hlora.data.hub import hub_offline_reason
from hlora.errors import DataError

logger = logging.getLogger(__name__)

HUB_DATASET = "nyu-mll/glue"
DATA_DIR_ENV = "HLORA_DATA_DIR"

QQP_SAMPLE_FILE = "QQP/sample/new_dev.tsv"
QQP_SAMPLE_DEV_ROWS = 2_350
"""Rows of ``qqp-sample`` held out as dev: 10% of the 23,497-row file (the rest, 21,147, train)."""
_QQP_SAMPLE_SPLIT_SALT = b"hlora-qqp-sample-split-v1"


@dataclass(frozen=True)
class TaskInfo:
    """Static description of a task.

    Attributes:
        name: Task name accepted by :func:`load_task`.
        hub_config: Config name of ``nyu-mll/glue`` on the hub, or None when there is no hub copy.
        metrics: Metric names understood by :func:`hlora.metrics.compute_metrics`.
        num_labels: Number of classes.
        comparable_to_glue: False when scores are not comparable to published GLUE dev scores.
    """

    name: str
    hub_config: str | None
    metrics: tuple[str, ...]
    num_labels: int = 2
    comparable_to_glue: bool = True


@dataclass(frozen=True, slots=True)
class Example:
    """One labelled sentence pair.

    Attributes:
        text_a: First sentence (MRPC ``#1 String``, RTE ``sentence1``, QQP ``question1``).
        text_b: Second sentence.
        label: Class id in the GLUE/Hugging Face convention.
    """

    text_a: str
    text_b: str
    label: int


@dataclass(frozen=True)
class TaskData:
    """The train and dev examples of a task.

    Attributes:
        task: The task's description.
        train: Training examples, in file (or hub) order: GLUE :class:`Example` pairs, or
            :class:`~hlora.data.instructions.InstructionExample` for ``"instructions"``; both
            carry an int ``label`` (the class, or the category's index).
        dev: Development examples, in file (or hub) order.
        source: Human-readable origin: a folder, or ``hub:nyu-mll/glue/<config>``.
    """

    task: TaskInfo
    train: tuple[Any, ...]
    dev: tuple[Any, ...]
    source: str


INSTRUCTIONS = "instructions"
"""A user's own instruction data (causal-LM only; :mod:`hlora.data.instructions`)."""
TASK_NAMES: tuple[str, ...] = ("mrpc", "rte", "qqp", "qqp-sample", INSTRUCTIONS)

_TASKS: Mapping[str, TaskInfo] = MappingProxyType(
    {
        "mrpc": TaskInfo("mrpc", "mrpc", ("accuracy", "f1")),
        "rte": TaskInfo("rte", "rte", ("accuracy",)),
        "qqp": TaskInfo("qqp", "qqp", ("accuracy", "f1")),
        "qqp-sample": TaskInfo("qqp-sample", None, ("accuracy", "f1"), comparable_to_glue=False),
        # Free-form answers: scored by the perplexity of the held-out answers.
        INSTRUCTIONS: TaskInfo(INSTRUCTIONS, None, ("perplexity",), comparable_to_glue=False),
    }
)


@dataclass(frozen=True)
class _TsvFormat:
    """How to read one task's TSV files."""

    folder: str
    header: tuple[str, ...] | None
    text_a: int
    text_b: int
    label: int
    labels: Mapping[str, int]
    encoding: str = "utf-8"
    repair_first_row: bool = False  # QQP: label glued to question2 by a space on the first row


_BINARY = MappingProxyType({"0": 0, "1": 1})
_QQP_HEADER = ("id", "qid1", "qid2", "question1", "question2", "is_duplicate")
_FORMATS: Mapping[str, _TsvFormat] = MappingProxyType(
    {
        "mrpc": _TsvFormat(
            "MRPC",
            ("Quality", "#1 ID", "#2 ID", "#1 String", "#2 String"),
            text_a=3,
            text_b=4,
            label=0,
            labels=_BINARY,
            encoding="utf-8-sig",  # train.tsv and dev.tsv start with a BOM
        ),
        "rte": _TsvFormat(
            "RTE",
            ("index", "sentence1", "sentence2", "label"),
            text_a=1,
            text_b=2,
            label=3,
            labels=MappingProxyType({"entailment": 0, "not_entailment": 1}),
        ),
        "qqp": _TsvFormat(
            "QQP", _QQP_HEADER, text_a=3, text_b=4, label=5, labels=_BINARY, repair_first_row=True
        ),
        "qqp-sample": _TsvFormat(
            "QQP/sample", None, text_a=3, text_b=4, label=5, labels=_BINARY, repair_first_row=True
        ),
    }
)
_HUB_COLUMNS: Mapping[str, tuple[str, str]] = MappingProxyType(
    {
        "mrpc": ("sentence1", "sentence2"),
        "rte": ("sentence1", "sentence2"),
        "qqp": ("question1", "question2"),
    }
)
_GLUED_LABEL = re.compile(r"^(.*\S) ([01])$", re.DOTALL)


def get_task(name: str) -> TaskInfo:
    """Return the description of a task.

    Args:
        name: One of :data:`TASK_NAMES`.

    Returns:
        The task's :class:`TaskInfo`.

    Raises:
        DataError: If ``name`` is not a known task.
    """
    try:
        return _TASKS[name]
    except KeyError:
        allowed = ", ".join(repr(n) for n in TASK_NAMES)
        raise DataError(f"unknown task {name!r}; allowed tasks: {allowed}") from None


def resolve_data_dir(data_dir: str | Path | None) -> Path | None:
    """Choose the local GLUE folder.

    Args:
        data_dir: Explicit folder (for example from ``--data-dir``), or None.

    Returns:
        ``data_dir`` if given, else the folder named by the environment variable
        ``HLORA_DATA_DIR`` if set and non-empty, else None. The folder is not checked.
    """
    if data_dir is not None and str(data_dir) != "":
        return Path(data_dir).expanduser()
    env = os.environ.get(DATA_DIR_ENV, "").strip()
    return Path(env).expanduser() if env else None


def load_task(
    name: str,
    data_dir: str | Path | None = None,
    *,
    allow_hub: bool = True,
    train_limit: int | None = None,
    dev_limit: int | None = None,
    seed: int = 0,
) -> TaskData:
    """Load the train and dev examples of a task.

    The local folder (``data_dir``, else ``HLORA_DATA_DIR``) is tried first, in the GLUE layout
    ``<dir>/MRPC/{train,dev}.tsv``, ``<dir>/RTE/{train,dev}.tsv``, ``<dir>/QQP/{train,dev}.tsv``.
    If it is not given or lacks the files and ``allow_hub`` is True, the ``train`` and
    ``validation`` splits of ``nyu-mll/glue`` are loaded with :func:`datasets.load_dataset`,
    unless an offline switch is set (``HF_HUB_OFFLINE``, ``HF_DATASETS_OFFLINE``: see
    :func:`hlora.data.hub.hub_offline_reason`); then the hub is not tried and the error comes
    at once instead of after the libraries' connection retries.

    ``qqp-sample`` exists only locally: ``<dir>/QQP/sample/new_dev.tsv``, 23,497 labelled pairs
    drawn from the (old) GLUE QQP *train* split, with no header. Its malformed first line (label
    glued to question2 by a space) is repaired in memory. It is split into train and dev by a
    fixed salted hash of each row's QQP id: the :data:`QQP_SAMPLE_DEV_ROWS` = 2,350 rows (10%)
    with the smallest hashes form dev, the other 21,147 train. The split depends neither on
    ``seed`` nor on numpy's random streams, so it never changes between runs or versions.
    Scores on it are not comparable to GLUE QQP dev scores.

    Args:
        name: One of :data:`TASK_NAMES`.
        data_dir: Local GLUE folder; None to use ``HLORA_DATA_DIR``.
        allow_hub: Whether to fall back to the Hugging Face hub.
        train_limit: Keep only the first ``train_limit`` training examples (in file order).
        dev_limit: Keep only the first ``dev_limit`` dev examples (in file order).
        seed: Accepted for interface stability; loading is fully deterministic and does not
            use it.

    Returns:
        The task's examples and where they came from.

    Raises:
        DataError: If the task is unknown, a limit is not a positive integer, a local file is
            malformed (the message names file and line), or neither the local folder nor the
            hub can provide the task.
    """
    del seed  # documented as unused: the data never depends on it
    task = get_task(name)
    if name == INSTRUCTIONS:
        raise DataError(
            "task 'instructions' reads data.train_file "
            "(hlora.data.instructions.load_instruction_task), not a GLUE folder"
        )
    _check_limit("train_limit", train_limit)
    _check_limit("dev_limit", dev_limit)

    folder = resolve_data_dir(data_dir)
    data = _load_local(task, folder) or _load_fallback(task, folder, allow_hub)

    train = data.train[:train_limit] if train_limit is not None else data.train
    dev = data.dev[:dev_limit] if dev_limit is not None else data.dev
    logger.info(
        "loaded task %s from %s: %d train, %d dev examples",
        task.name,
        data.source,
        len(train),
        len(dev),
    )
    return TaskData(task=task, train=train, dev=dev, source=data.source)


def _hub_load_dataset(path: str, config: str) -> Any:
    """Call :func:`datasets.load_dataset`: the only network access, patched in tests.

    Args:
        path: Hub dataset id, ``nyu-mll/glue``.
        config: Config name, for example ``mrpc``.

    Returns:
        The :class:`datasets.DatasetDict` of all splits.
    """
    import datasets  # slow to import; only needed for the hub path

    return datasets.load_dataset(path, config)


def _load_fallback(task: TaskInfo, folder: Path | None, allow_hub: bool) -> TaskData:
    """Load from the hub after the local folder failed, or raise one error naming both ways."""
    local_reason = _describe_missing_local(task, folder)
    if task.hub_config is None:
        hub_reason = f"task {task.name!r} has no copy on the Hugging Face hub ({HUB_DATASET})"
    elif not allow_hub:
        hub_reason = f"the Hugging Face hub fallback ({HUB_DATASET}) is disabled"
    elif (offline := hub_offline_reason()) is not None:
        hub_reason = f"the Hugging Face hub fallback ({HUB_DATASET}) is switched off ({offline})"
    else:
        if folder is not None:
            logger.warning("%s; trying the Hugging Face hub (%s)", local_reason, HUB_DATASET)
        try:
            return _load_hub(task)
        except Exception as exc:  # any failure of the hub path is reported, not raised
            hub_reason = (
                f"the Hugging Face hub is unreachable ({HUB_DATASET}: {_short_reason(exc)})"
            )
    raise DataError(
        f"cannot load task {task.name!r}: {local_reason} and {hub_reason}"
        + _qqp_fragment_hint(task, folder)
    )


def _check_limit(option: str, value: int | None) -> None:
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise DataError(f"{option} must be a positive integer or None, got {value!r}")


def _split_files(task: TaskInfo, folder: Path) -> list[Path]:
    fmt = _FORMATS[task.name]
    if task.name == "qqp-sample":
        return [folder / QQP_SAMPLE_FILE]
    return [folder / fmt.folder / "train.tsv", folder / fmt.folder / "dev.tsv"]


def _load_local(task: TaskInfo, folder: Path | None) -> TaskData | None:
    if folder is None:
        return None
    files = _split_files(task, folder)
    if not all(f.is_file() for f in files):
        return None
    fmt = _FORMATS[task.name]
    if task.name == "qqp-sample":
        rows = _read_tsv(files[0], fmt)
        train, dev = _split_qqp_sample(rows, files[0])
    else:
        train = tuple(ex for _, ex in _read_tsv(files[0], fmt))
        dev = tuple(ex for _, ex in _read_tsv(files[1], fmt))
    return TaskData(task=task, train=train, dev=dev, source=str(files[0].parent))


def _describe_missing_local(task: TaskInfo, folder: Path | None) -> str:
    if folder is None:
        return f"no local data folder is set (set --data-dir or {DATA_DIR_ENV})"
    if not folder.is_dir():
        return f"the data folder '{folder}' does not exist (set --data-dir or {DATA_DIR_ENV})"
    expected = " and ".join(str(f.relative_to(folder)) for f in _split_files(task, folder))
    return f"no GLUE files under '{folder}' (expected {expected}; set --data-dir or {DATA_DIR_ENV})"


def _qqp_fragment_hint(task: TaskInfo, folder: Path | None) -> str:
    if task.name != "qqp" or folder is None or not (folder / "QQP" / "train.first9.tsv").is_file():
        return ""
    return (
        ". Only the 9-row fragments QQP/train.first9.tsv and QQP/dev.first9.tsv exist there; "
        "use task 'qqp-sample' for the local 23,497-row QQP sample (its scores are not "
        "comparable to GLUE QQP dev)"
    )


def task_tsv_path(folder: Path, task: str, split: str) -> Path:
    """Where a GLUE-layout ``folder`` keeps ``task``'s ``split`` (``train`` or ``dev``) TSV.

    Raises:
        DataError: An unknown task, or ``qqp-sample`` (one file, no train / dev files).
    """
    info = get_task(task)
    if info.name == "qqp-sample":
        raise DataError("task 'qqp-sample' has no train / dev files: give its rows as one file")
    return folder / _FORMATS[info.name].folder / f"{split}.tsv"


def read_task_tsv(path: Path, task: str) -> tuple[Example, ...]:
    """Every example of one TSV file in ``task``'s GLUE format (header row as GLUE's).

    Raises:
        DataError: An unknown task, or a malformed file (naming the file and the line).
    """
    return tuple(ex for _, ex in _read_tsv(Path(path), _FORMATS[get_task(task).name]))


def _read_tsv(path: Path, fmt: _TsvFormat) -> list[tuple[str, Example]]:
    """Parse a task TSV into (first field, example) pairs; blank lines are skipped."""
    try:
        text = path.read_text(encoding=fmt.encoding)
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"cannot read '{path}': {_short_reason(exc)}") from exc
    lines = text.split("\n")
    if not text.strip():
        raise DataError(f"'{path}' line 1: the file is empty")
    start = 0
    if fmt.header is not None:
        header = tuple(lines[0].rstrip("\r").lstrip("\ufeff").split("\t"))
        if header != fmt.header:
            raise DataError(
                f"'{path}' line 1: unexpected header {header!r}; expected the tab-separated "
                f"columns {fmt.header!r}"
            )
        start = 1
    n_fields = max(fmt.text_a, fmt.text_b, fmt.label) + 1
    allowed = ", ".join(repr(k) for k in fmt.labels)
    rows: list[tuple[str, Example]] = []
    for i in range(start, len(lines)):
        line = lines[i].rstrip("\r")
        if not line:
            continue
        fields = line.split("\t")
        if fmt.repair_first_row and not rows and len(fields) == n_fields - 1:
            fields = _repair_glued_label(fields, path, i + 1)
        if len(fields) != n_fields:
            raise DataError(
                f"'{path}' line {i + 1}: expected {n_fields} tab-separated fields, "
                f"got {len(fields)}"
            )
        label = fmt.labels.get(fields[fmt.label])
        if label is None:
            raise DataError(
                f"'{path}' line {i + 1}: label {fields[fmt.label]!r} is not one of {allowed}"
            )
        rows.append((fields[0], Example(fields[fmt.text_a], fields[fmt.text_b], label)))
    if not rows:
        raise DataError(f"'{path}' line {len(lines)}: the file has no data rows")
    return rows


def _repair_glued_label(fields: list[str], path: Path, line_no: int) -> list[str]:
    """Split ``'...question2 0'`` into question2 and the label (old QQP release, first row)."""
    match = _GLUED_LABEL.match(fields[-1])
    if match is None:
        return fields
    logger.info("'%s' line %d: label glued to question2 by a space, repaired", path, line_no)
    return [*fields[:-1], match.group(1), match.group(2)]


def _split_qqp_sample(
    rows: Sequence[tuple[str, Example]], path: Path
) -> tuple[tuple[Example, ...], tuple[Example, ...]]:
    if len(rows) <= QQP_SAMPLE_DEV_ROWS:
        raise DataError(
            f"'{path}' has {len(rows)} rows; the qqp-sample split needs more than "
            f"{QQP_SAMPLE_DEV_ROWS} (the documented file has 23,497)"
        )

    def key(i: int) -> tuple[bytes, int]:
        digest = hashlib.blake2b(rows[i][0].encode(), key=_QQP_SAMPLE_SPLIT_SALT, digest_size=8)
        return digest.digest(), i

    dev_ids = set(sorted(range(len(rows)), key=key)[:QQP_SAMPLE_DEV_ROWS])
    train = tuple(ex for i, (_, ex) in enumerate(rows) if i not in dev_ids)
    dev = tuple(ex for i, (_, ex) in enumerate(rows) if i in dev_ids)
    return train, dev


def _load_hub(task: TaskInfo) -> TaskData:
    assert task.hub_config is not None
    dataset = _hub_load_dataset(HUB_DATASET, task.hub_config)
    col_a, col_b = _HUB_COLUMNS[task.name]
    splits: list[tuple[Example, ...]] = []
    for split in ("train", "validation"):
        if split not in dataset:
            raise KeyError(f"split {split!r} missing")
        part = dataset[split]
        labels = [int(v) for v in part["label"]]
        bad = sorted({v for v in labels if v not in (0, 1)})
        if bad:
            raise ValueError(f"split {split!r} has labels {bad}, expected 0 and 1")
        pairs = zip(part[col_a], part[col_b], labels, strict=True)
        splits.append(tuple(Example(str(a), str(b), y) for a, b, y in pairs))
    return TaskData(
        task=task, train=splits[0], dev=splits[1], source=f"hub:{HUB_DATASET}/{task.hub_config}"
    )


def _short_reason(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    text = lines[0] if lines else ""
    if len(text) > 200:
        text = text[:197] + "..."
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__
