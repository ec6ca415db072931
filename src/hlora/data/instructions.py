"""A user's own instruction data (for causal-LM fine-tuning): JSONL or CSV files, or the hub.

Each example is a prompt (a tuple of chat :class:`Message` turns) and the response the loss is
on (the final assistant turn). Three row formats are read, the same in files and hub datasets:

* **chat**: a ``messages`` field, a list of ``{"role": ..., "content": ...}`` objects with roles
  ``system``, ``user``, ``assistant``. The last message must be the assistant's and becomes the
  response; the earlier ones (at least one ``user`` turn among them) are the prompt. JSONL files
  and hub datasets only (a CSV cell cannot hold a list).
* **Alpaca-style**: ``instruction``, an optional ``input``, and ``output`` (Dolly's names
  ``context`` and ``response`` are accepted for the last two). The prompt is one user turn: the
  instruction, followed by a blank line and the input when the input is not empty.
* **prompt / response**: ``prompt`` and ``response`` (or ``completion``). The prompt is one user
  turn.

A row's format is set by the first of ``messages``, ``instruction``, ``prompt`` it has (so a
chat row may also carry a ``prompt`` field, as some hub datasets do); every row of one file
must have the same format. Other fields are ignored, except an optional category field
(``category`` unless told otherwise: a text or an integer; missing, null or empty means none),
which :func:`category_labels` turns into labels for partitioning clients by category.

Files: ``.jsonl`` (one JSON object a line; blank lines skipped) or ``.csv`` (comma-separated,
a header row naming the fields; an empty cell is an empty text). Every malformed input raises
:class:`~hlora.errors.DataError` naming the file and the 1-based line (a hub dataset: its
1-based row).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from hlora.data.files import _csv_rows, _jsonl_rows
from hlora.data.glue import INSTRUCTIONS, TaskData, _short_reason, get_task
from hlora.data.hub import hub_offline_reason
from hlora.errors import DataError

ROLES: tuple[str, ...] = ("system", "user", "assistant")
"""The chat roles a :class:`Message` may have."""

INSTRUCTION_SUFFIXES: tuple[str, ...] = (".jsonl", ".csv")
"""The file forms :func:`read_instructions` accepts."""

DEFAULT_CATEGORY_FIELD = "category"

# The row formats, each marked by a field (the first present wins), and the names a field may
# have (at most one of them per row).
_CHAT, _ALPACA, _PAIR = "chat", "Alpaca-style", "prompt/response"
_MARKERS: tuple[tuple[str, str], ...] = (
    ("messages", _CHAT),
    ("instruction", _ALPACA),
    ("prompt", _PAIR),
)
_INPUT_FIELDS = ("input", "context")
_ALPACA_RESPONSE_FIELDS = ("output", "response")
_PAIR_RESPONSE_FIELDS = ("response", "completion")


@dataclass(frozen=True, slots=True)
class Message:
    """One chat turn.

    Attributes:
        role: One of :data:`ROLES`.
        content: The turn's text (a system turn's may be empty).
    """

    role: str
    content: str

    def __post_init__(self) -> None:
        if self.role not in ROLES:
            raise ValueError(f"role must be one of {', '.join(ROLES)}, got {self.role!r}")


@dataclass(frozen=True, slots=True)
class InstructionExample:
    """One instruction-tuning example.

    Attributes:
        prompt: Everything before the answer, in order: system and user turns, and earlier
            assistant turns of a conversation. At least one user turn.
        response: The final assistant turn, not empty: the tokens the loss is on.
        category: The example's category (its category field), or None when it has none.
        label: The category's index among the run's categories (:func:`load_instruction_task`),
            which partitions clients by category; 0 until then.
    """

    prompt: tuple[Message, ...]
    response: str
    category: str | None = None
    label: int = 0


def read_instructions(
    path: str | Path, *, category_field: str = DEFAULT_CATEGORY_FIELD
) -> tuple[InstructionExample, ...]:
    """Read a ``.jsonl`` or ``.csv`` file of instruction examples (forms: the module docstring).

    Args:
        path: The file.
        category_field: The name of the optional category field or column.

    Returns:
        The examples, in file order.

    Raises:
        DataError: A missing file, an unknown suffix, an empty file, or a malformed row (bad
            JSON, a missing field, an empty response, a wrong role, a conversation that does not
            end with the assistant, a row of another format than the file's first), naming the
            file and the 1-based line.
    """
    where = Path(path).expanduser()
    if not where.is_file():
        what = "is a folder, not a file" if where.is_dir() else "does not exist"
        raise DataError(f"instruction data '{where}' {what}")
    suffix = where.suffix.lower()
    rows: Iterable[tuple[str, Mapping[str, object]]]
    if suffix == ".jsonl":
        rows = ((f"'{where}' line {n}", row) for n, row in _jsonl_rows(where))
    elif suffix == ".csv":
        rows = _checked_csv_rows(where)
    else:
        raise DataError(
            f"'{where}' line 1: instruction data with suffix {where.suffix!r}; expected one of "
            f"{', '.join(INSTRUCTION_SUFFIXES)} (a .json array: write one object a line, .jsonl)"
        )
    examples = _parse_rows(rows, category_field)
    if not examples:
        raise DataError(f"'{where}' line 1: the file has no data rows")
    return examples


def load_hub_instructions(
    name: str,
    split: str = "train",
    *,
    config: str | None = None,
    revision: str | None = None,
    category_field: str = DEFAULT_CATEGORY_FIELD,
) -> tuple[InstructionExample, ...]:
    """Load a Hugging Face hub dataset of instruction examples (rows as in the module docstring).

    The offline switches (:func:`hlora.data.hub.hub_offline_reason`) are checked first: when one
    is set this fails at once, without importing ``datasets`` or touching the network. Without
    a switch, an unreachable hub fails only after ``huggingface_hub``'s own connection retries
    (five, about 25 s); the error then suggests setting ``HF_HUB_OFFLINE=1``.

    Args:
        name: The hub dataset id, for example ``databricks/databricks-dolly-15k``.
        split: The split to load.
        config: The dataset's configuration name, if it has several.
        revision: A branch, tag or commit of the dataset repository; None for the default.
        category_field: The name of the optional category column.

    Returns:
        The split's examples, in dataset order.

    Raises:
        DataError: The hub is switched off, the load fails (unreachable hub, unknown dataset
            or split), the split is empty, or a row is malformed (naming the 1-based row).
    """
    source = f"hub dataset '{name}'" + (f" ({config})" if config else "") + f" split '{split}'"
    offline = hub_offline_reason()
    if offline is not None:
        raise DataError(
            f"cannot load {source}: the Hugging Face hub is switched off ({offline}); give a "
            f"local {' or '.join(INSTRUCTION_SUFFIXES)} file instead"
        )
    try:
        dataset = _hub_load_dataset(name, config, split, revision)
    except Exception as exc:  # any failure of the hub path is reported, not raised
        raise DataError(
            f"cannot load {source} from the Hugging Face hub (unreachable, or no such dataset "
            f"or split): {_short_reason(exc)}; on a machine without the hub, set "
            "HF_HUB_OFFLINE=1 to fail at once"
        ) from exc
    rows = ((f"{source} row {i}", row) for i, row in enumerate(dataset, start=1))
    examples = _parse_rows(rows, category_field)
    if not examples:
        raise DataError(f"{source} has no rows")
    return examples


def category_labels(
    examples: Sequence[InstructionExample],
) -> tuple[list[int], tuple[str, ...]]:
    """Integer labels of the examples' categories, for :func:`hlora.data.partition_indices`.

    Args:
        examples: Examples that all have a category.

    Returns:
        ``(labels, names)``: ``names`` are the distinct categories, sorted; ``labels[i]`` is the
        index in ``names`` of ``examples[i].category``.

    Raises:
        DataError: An example without a category (naming the first few, counting from 1).
    """
    missing = [i for i, ex in enumerate(examples, start=1) if ex.category is None]
    if missing:
        shown = ", ".join(str(i) for i in missing[:5]) + (", ..." if len(missing) > 5 else "")
        raise DataError(
            f"{len(missing)} of {len(examples)} examples have no category (examples {shown}, "
            "counting from 1): give every example a category to partition by category"
        )
    names = tuple(sorted({ex.category for ex in examples if ex.category is not None}))
    index = {name: i for i, name in enumerate(names)}
    return [index[ex.category] for ex in examples if ex.category is not None], names


def _hub_load_dataset(name: str, config: str | None, split: str, revision: str | None) -> Any:
    """Call :func:`datasets.load_dataset`: the only network access, patched in tests.

    Returns:
        The split, a :class:`datasets.Dataset` (an iterable of row dicts).
    """
    import datasets  # slow to import; only needed for the hub path

    return datasets.load_dataset(name, config, split=split, revision=revision)


def _checked_csv_rows(path: Path) -> Iterator[tuple[str, Mapping[str, object]]]:
    """(where, row) of a CSV file whose header names the columns of one row format."""
    for index, (number, row) in enumerate(_csv_rows(path, ())):
        if index == 0:  # every row has the header's columns as keys
            header = f"'{path}' line 1"
            if "messages" in row:
                raise DataError(
                    f"{header}: a 'messages' column; chat messages are read from .jsonl files "
                    "only (one JSON object a line with a 'messages' list)"
                )
            names = _response_fields(_format_of(row, header, "column"))
            if not any(name in row for name in names):
                raise DataError(f"{header}: no {' or '.join(map(repr, names))} column")
        yield f"'{path}' line {number}", row


def _parse_rows(
    rows: Iterable[tuple[str, Mapping[str, object]]], category_field: str
) -> tuple[InstructionExample, ...]:
    examples: list[InstructionExample] = []
    first: tuple[str, str] | None = None  # (format, where) of the first row
    for where, row in rows:
        fmt = _format_of(row, where, "field")
        if first is None:
            first = (fmt, where)
        elif fmt != first[0]:
            raise DataError(
                f"{where}: a {fmt} row, but the first row ({first[1]}) is {first[0]}; one file "
                "holds one format"
            )
        examples.append(_example(row, fmt, where, category_field))
    return tuple(examples)


def _format_of(row: Mapping[str, object], where: str, kind: str) -> str:
    """The row's format, set by the first marker field it has."""
    for marker, fmt in _MARKERS:
        if marker in row:
            return fmt
    raise DataError(
        f"{where}: no 'messages', 'instruction' or 'prompt' {kind}; expected a chat row "
        "('messages'), an Alpaca-style row ('instruction', 'output') or a prompt/response row "
        "('prompt', 'response')"
    )


def _response_fields(fmt: str) -> tuple[str, ...]:
    return _ALPACA_RESPONSE_FIELDS if fmt == _ALPACA else _PAIR_RESPONSE_FIELDS


def _example(
    row: Mapping[str, object], fmt: str, where: str, category_field: str
) -> InstructionExample:
    category = _category(row, category_field, where)
    if fmt == _CHAT:
        prompt, response = _conversation(row["messages"], where)
        return InstructionExample(prompt, response, category)
    if fmt == _ALPACA:
        content = _text(row, "instruction", where)
        input_field = _field_of(row, _INPUT_FIELDS, where)
        extra = _text(row, input_field, where, allow_empty=True) if input_field else ""
        if extra.strip():
            content = f"{content}\n\n{extra}"
    else:
        content = _text(row, "prompt", where)
    names = _response_fields(fmt)
    response_field = _field_of(row, names, where)
    if response_field is None:
        raise DataError(f"{where}: no {' or '.join(map(repr, names))} field (the response)")
    response = _text(row, response_field, where)
    return InstructionExample((Message("user", content),), response, category)


def _field_of(row: Mapping[str, object], names: tuple[str, ...], where: str) -> str | None:
    """The one of ``names`` the row has (a null value counts as absent), or None."""
    present = [n for n in names if row.get(n) is not None]
    if len(present) > 1:
        raise DataError(f"{where}: both {present[0]!r} and {present[1]!r}; give one of them")
    return present[0] if present else None


def _text(row: Mapping[str, object], field: str, where: str, *, allow_empty: bool = False) -> str:
    value = row.get(field)
    if value is None:
        raise DataError(f"{where}: no {field!r} field")
    if not isinstance(value, str):
        raise DataError(f"{where}: {field!r} is a {type(value).__name__}, expected a text")
    if not allow_empty and not value.strip():
        raise DataError(f"{where}: {field!r} is empty")
    return value


def _conversation(value: object, where: str) -> tuple[tuple[Message, ...], str]:
    """(prompt turns, response) of a ``messages`` list."""
    if not isinstance(value, list) or not value:
        kind = "an empty list" if isinstance(value, list) else f"a {type(value).__name__}"
        raise DataError(f"{where}: 'messages' is {kind}, expected a list of messages")
    turns: list[Message] = []
    for number, item in enumerate(value, start=1):
        at = f"{where}: message {number} of {len(value)}"
        if not isinstance(item, Mapping):
            raise DataError(f"{at} is a {type(item).__name__}, expected a 'role'/'content' object")
        role, content = item.get("role"), item.get("content")
        if role not in ROLES:
            raise DataError(f"{at} has role {role!r}; expected one of {', '.join(ROLES)}")
        if not isinstance(content, str):
            raise DataError(f"{at} ({role}) has content {content!r}, expected a text")
        if role != "system" and not content.strip():
            raise DataError(f"{at} ({role}) is empty")
        turns.append(Message(str(role), content))
    if turns[-1].role != "assistant":
        raise DataError(
            f"{where}: the last message is the {turns[-1].role}'s; a conversation must end with "
            "the assistant's answer (the response)"
        )
    prompt = tuple(turns[:-1])
    if not any(turn.role == "user" for turn in prompt):
        raise DataError(f"{where}: no user message before the assistant's answer")
    return prompt, turns[-1].content


def _category(row: Mapping[str, object], field: str, where: str) -> str | None:
    value = row.get(field)
    if value is None or (isinstance(value, str) and not value.strip()):
        return None
    if isinstance(value, str):
        return value.strip()
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    raise DataError(
        f"{where}: category {field!r} is a {type(value).__name__}, expected a text or an integer"
    )


HUB_PREFIX = "hub:"
"""Marks a Hugging Face hub dataset where a file is expected: ``hub:NAME[:SPLIT]``."""


def read_source(
    source: str | Path, *, category_field: str = DEFAULT_CATEGORY_FIELD
) -> tuple[InstructionExample, ...]:
    """Examples from a file (:func:`read_instructions`) or, for ``hub:NAME[:SPLIT]`` (split
    ``train`` when omitted), from the hub (:func:`load_hub_instructions`).

    Raises:
        DataError: A missing or malformed file; the hub switched off or unreachable.
    """
    text = str(source)
    if not text.startswith(HUB_PREFIX):
        return read_instructions(source, category_field=category_field)
    name, _, split = text.removeprefix(HUB_PREFIX).partition(":")
    if not name:
        raise DataError(f"'{text}': expected hub:NAME or hub:NAME:SPLIT")
    return load_hub_instructions(name, split or "train", category_field=category_field)


def load_instruction_task(
    train_file: str | Path,
    eval_file: str | Path | None = None,
    *,
    category_field: str = DEFAULT_CATEGORY_FIELD,
    train_limit: int | None = None,
    dev_limit: int | None = None,
) -> TaskData:
    """A run's instruction data: the training file and, when given, the evaluation file.

    Every example's ``label`` is its category's index among the sorted categories of both
    files; an example without a category gets the category ``""`` (first), so a file without
    categories is one class.

    Args:
        train_file: The training examples: a file, or ``hub:NAME[:SPLIT]`` (:func:`read_source`).
        eval_file: Held-out examples, or None (the caller then holds out a share of training).
        category_field: The category field's name.
        train_limit: Keep only the first ``train_limit`` training examples.
        dev_limit: Keep only the first ``dev_limit`` evaluation examples.

    Raises:
        DataError: A missing or malformed file.
    """
    train = read_source(train_file, category_field=category_field)[:train_limit]
    dev: tuple[InstructionExample, ...] = ()
    if eval_file:
        dev = read_source(eval_file, category_field=category_field)[:dev_limit]
    names = sorted({e.category or "" for e in (*train, *dev)})
    index = {name: i for i, name in enumerate(names)}

    def labelled(examples: tuple[InstructionExample, ...]) -> tuple[InstructionExample, ...]:
        return tuple(replace(e, label=index[e.category or ""]) for e in examples)

    task = replace(get_task(INSTRUCTIONS), num_labels=len(names))
    source = str(train_file) + (f" (evaluation: {eval_file})" if eval_file else "")
    return TaskData(task, labelled(train), labelled(dev), source)
