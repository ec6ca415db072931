"""Tests of hlora.data.instructions: the row formats, every malformed input, the hub path."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest

from hlora.data import instructions
from hlora.data.hub import OFFLINE_VARIABLES
from hlora.data.instructions import (
    InstructionExample,
    Message,
    category_labels,
    load_hub_instructions,
    read_instructions,
)
from hlora.errors import DataError


def _jsonl(path: Path, *rows: object) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


def _user(text: str) -> tuple[Message, ...]:
    return (Message("user", text),)


# --- the formats --------------------------------------------------------------------------------


def test_alpaca_jsonl(tmp_path: Path) -> None:
    path = _jsonl(
        tmp_path / "alpaca.jsonl",
        {"instruction": "Add the numbers.", "input": "2 and 3", "output": "5", "text": "x"},
        {"instruction": "Say hi.", "input": "", "output": "Hi!"},
        {"instruction": "Say bye.", "output": "Bye.", "category": "chat"},
        {"instruction": "Sum.", "input": "  ", "output": " 4", "category": 7},
    )
    assert read_instructions(path) == (
        InstructionExample(_user("Add the numbers.\n\n2 and 3"), "5"),
        InstructionExample(_user("Say hi."), "Hi!"),
        InstructionExample(_user("Say bye."), "Bye.", "chat"),
        InstructionExample(_user("Sum."), " 4", "7"),  # the response is kept as written
    )


def test_dolly_names_and_category_field(tmp_path: Path) -> None:
    path = _jsonl(
        tmp_path / "dolly.jsonl",
        {"instruction": "Who?", "context": "Ada wrote it.", "response": "Ada", "kind": "qa"},
        {"instruction": "Name a color.", "context": "", "response": "Red", "kind": ""},
    )
    assert read_instructions(path, category_field="kind") == (
        InstructionExample(_user("Who?\n\nAda wrote it."), "Ada", "qa"),
        InstructionExample(_user("Name a color."), "Red", None),
    )
    assert [ex.category for ex in read_instructions(path)] == [None, None]


def test_chat_jsonl(tmp_path: Path) -> None:
    conversation = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello."},
        {"role": "user", "content": "2+2?"},
        {"role": "assistant", "content": "4", "name": "bot"},
    ]
    path = _jsonl(
        tmp_path / "chat.jsonl",
        {"messages": conversation, "category": "math", "prompt": "2+2?"},
        {"messages": [{"role": "system", "content": ""}, *conversation[3:]]},
    )
    assert read_instructions(path) == (
        InstructionExample(
            (
                Message("system", "Be brief."),
                Message("user", "Hi"),
                Message("assistant", "Hello."),
                Message("user", "2+2?"),
            ),
            "4",
            "math",
        ),
        InstructionExample((Message("system", ""), Message("user", "2+2?")), "4"),
    )


def test_prompt_pairs_jsonl(tmp_path: Path) -> None:
    pairs = _jsonl(tmp_path / "pairs.jsonl", {"prompt": "Q1", "response": "A1"})
    completions = tmp_path / "completions.jsonl"
    completions.write_text(
        '\n{"prompt": "Q1", "completion": "A1"}\n\n{"prompt": "Q2", "completion": "A2"}\n',
        encoding="utf-8",
    )
    assert read_instructions(pairs) == (InstructionExample(_user("Q1"), "A1"),)
    assert read_instructions(completions) == (
        InstructionExample(_user("Q1"), "A1"),
        InstructionExample(_user("Q2"), "A2"),
    )


def test_csv_formats(tmp_path: Path) -> None:
    alpaca = tmp_path / "alpaca.csv"
    alpaca.write_text(
        "\ufeffinstruction,input,output,category\n"
        'Translate.,"Hallo, Welt",Hello world,lang\n'
        'Write two lines.,,"one\ntwo",\n',
        encoding="utf-8",
    )
    assert read_instructions(alpaca) == (
        InstructionExample(_user("Translate.\n\nHallo, Welt"), "Hello world", "lang"),
        InstructionExample(_user("Write two lines."), "one\ntwo", None),
    )
    pairs = tmp_path / "pairs.CSV"
    pairs.write_text("prompt,completion\nQ,A\n", encoding="utf-8")
    assert read_instructions(pairs) == (InstructionExample(_user("Q"), "A"),)


# --- malformed input ----------------------------------------------------------------------------

_CHAT_OK = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]
_ALPACA_OK = {"instruction": "Do.", "output": "Done."}

# (file name, content, line, what the message says after "'<file>' line <line>: ")
_BAD_INPUTS: list[tuple[str, str, int, str]] = [
    ("bad.jsonl", json.dumps(_ALPACA_OK) + '\n{"instruction": "x",\n', 2, "not JSON"),
    ("list.jsonl", "[1, 2]\n", 1, "a list, not a JSON object"),
    ("empty.jsonl", "\n  \n", 1, "the file is empty"),
    ("empty.csv", "", 1, "the file is empty"),
    ("header.csv", "instruction,output\n", 1, "the file has no data rows"),
    ("data.txt", "instruction\tinput\n", 1, "instruction data with suffix '.txt'; expected one of"),
    ("data.json", "[]", 1, r"instruction data with suffix '\.json'.*write one object a line"),
    (
        "missing.jsonl",
        json.dumps(_ALPACA_OK) + "\n" + json.dumps({"instruction": "Do."}) + "\n",
        2,
        "no 'output' or 'response' field",
    ),
    ("nomarker.jsonl", json.dumps({"question": "Q", "answer": "A"}), 1, "no 'messages', 'in"),
    ("noresp.jsonl", json.dumps({"prompt": "Q", "answer": "A"}), 1, "no 'response' or 'compl"),
    ("emptyresp.jsonl", json.dumps({"prompt": "Q", "response": " \n"}), 1, "'response' is empty"),
    ("nullprompt.jsonl", json.dumps({"prompt": None, "response": "A"}), 1, "no 'prompt' field"),
    ("numresp.jsonl", json.dumps({"prompt": "Q", "response": 4}), 1, "'response' is a int"),
    (
        "both.jsonl",
        json.dumps({**_ALPACA_OK, "response": "R"}),
        1,
        "both 'output' and 'response'; give one",
    ),
    (
        "mixed.jsonl",
        json.dumps(_ALPACA_OK) + "\n\n" + json.dumps({"messages": _CHAT_OK}) + "\n",
        3,
        r"a chat row, but the first row \('.*mixed\.jsonl' line 1\) is Alpaca-style",
    ),
    (
        "role.jsonl",
        json.dumps({"messages": [{"role": "tool", "content": "x"}, _CHAT_OK[1]]}),
        1,
        "message 1 of 2 has role 'tool'; expected one of system, user, assistant",
    ),
    (
        "last.jsonl",
        json.dumps({"messages": _CHAT_OK[::-1]}),
        1,
        "the last message is the user's; a conversation must end with the assistant's",
    ),
    (
        "nouser.jsonl",
        json.dumps({"messages": [{"role": "system", "content": "S"}, _CHAT_OK[1]]}),
        1,
        "no user message before the assistant's answer",
    ),
    (
        "emptyanswer.jsonl",
        json.dumps({"messages": [_CHAT_OK[0], {"role": "assistant", "content": ""}]}),
        1,
        r"message 2 of 2 \(assistant\) is empty",
    ),
    (
        "content.jsonl",
        json.dumps({"messages": [{"role": "user"}, _CHAT_OK[1]]}),
        1,
        r"message 1 of 2 \(user\) has content None, expected a text",
    ),
    ("notlist.jsonl", json.dumps({"messages": "Hi"}), 1, "'messages' is a str, expected a list"),
    ("nomsg.jsonl", json.dumps({"messages": []}), 1, "'messages' is an empty list"),
    ("msgitem.jsonl", json.dumps({"messages": ["Hi"]}), 1, "message 1 of 1 is a str"),
    (
        "category.jsonl",
        json.dumps({**_ALPACA_OK, "category": ["a"]}),
        1,
        "category 'category' is a list, expected a text or an integer",
    ),
    ("chat.csv", "messages,category\n[],x\n", 1, "a 'messages' column; chat messages are read"),
    ("nocol.csv", "instruction,input\nDo.,x\n", 1, "no 'output' or 'response' column"),
    ("nomark.csv", "question,answer\nQ,A\n", 1, "no 'messages', 'instruction' or 'prompt' column"),
    ("emptycell.csv", "prompt,response\nQ,A\nQ2,\n", 3, "'response' is empty"),
    ("extra.csv", "prompt,response\nQ,A,B\n", 2, "more fields than the header's 2"),
]


@pytest.mark.parametrize(("name", "content", "line", "says"), _BAD_INPUTS)
def test_malformed_input_names_file_and_line(
    tmp_path: Path, name: str, content: str, line: int, says: str
) -> None:
    path = tmp_path / name
    path.write_text(content, encoding="utf-8")
    with pytest.raises(DataError, match=rf"^'{re.escape(str(path))}' line {line}: {says}"):
        read_instructions(path)


def test_missing_file_or_folder(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"instruction data '.*nowhere\.jsonl' does not exist"):
        read_instructions(tmp_path / "nowhere.jsonl")
    with pytest.raises(DataError, match=r"is a folder, not a file"):
        read_instructions(tmp_path)


def test_message_role_is_checked() -> None:
    with pytest.raises(ValueError, match="role must be one of system, user, assistant, got 'bot'"):
        Message("bot", "x")


# --- categories ---------------------------------------------------------------------------------


def test_category_labels() -> None:
    examples = [
        InstructionExample(_user(str(i)), "r", category)
        for i, category in enumerate(["qa", "brainstorm", "qa", "7", "summarize", "brainstorm"])
    ]
    labels, names = category_labels(examples)
    assert names == ("7", "brainstorm", "qa", "summarize")
    assert labels == [2, 1, 2, 0, 3, 1]
    assert [names[i] for i in labels] == [ex.category for ex in examples]
    assert category_labels([]) == ([], ())


def test_category_labels_need_every_category() -> None:
    examples = [InstructionExample(_user("q"), "r", c) for c in ["a", None, "b", None]]
    with pytest.raises(DataError, match=r"2 of 4 examples have no category \(examples 2, 4,"):
        category_labels(examples)
    many = [InstructionExample(_user("q"), "r")] * 7
    with pytest.raises(DataError, match=r"\(examples 1, 2, 3, 4, 5, \.\.\., counting from 1\)"):
        category_labels(many)


def test_categories_feed_the_partitioner(tmp_path: Path) -> None:
    from hlora.data.partition import partition_indices

    kinds = ["qa", "qa", "summary", "qa", "summary", "poem"]
    path = _jsonl(
        tmp_path / "d.jsonl",
        *({"prompt": f"Q{i}", "response": "A", "category": k} for i, k in enumerate(kinds)),
    )
    labels, names = category_labels(read_instructions(path))
    parts = partition_indices(labels, 3, "category", seed=0)
    assert [{kinds[i] for i in part} for part in parts] == [{"poem"}, {"qa"}, {"summary"}]
    assert names == ("poem", "qa", "summary")


# --- the hub ------------------------------------------------------------------------------------


@pytest.fixture
def hub_rows(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, str | None, str, str | None]]:
    """Calls of the (patched) hub loader; it returns two Dolly-style rows. Offline switches off."""
    calls: list[tuple[str, str | None, str, str | None]] = []

    def fake(name: str, config: str | None, split: str, revision: str | None) -> Any:
        calls.append((name, config, split, revision))
        return [
            {"instruction": "Who?", "context": "Ada.", "response": "Ada", "category": "qa"},
            {"instruction": "Why?", "context": "", "response": "", "category": "qa"},
        ]

    monkeypatch.setattr(instructions, "_hub_load_dataset", fake)
    for variable in OFFLINE_VARIABLES:
        monkeypatch.delenv(variable, raising=False)
    return calls


def test_hub_rows_follow_the_file_rules(
    hub_rows: list[tuple[str, str | None, str, str | None]],
) -> None:
    with pytest.raises(DataError, match=r"^hub dataset 'org/d' split 'train' row 2: 'response' is"):
        load_hub_instructions("org/d")
    assert hub_rows == [("org/d", None, "train", None)]


def test_hub_loads_rows(
    hub_rows: list[tuple[str, str | None, str, str | None]], monkeypatch: pytest.MonkeyPatch
) -> None:
    def one_row(name: str, config: str | None, split: str, revision: str | None) -> Any:
        hub_rows.append((name, config, split, revision))
        return [{"messages": _CHAT_OK, "category": None}]

    monkeypatch.setattr(instructions, "_hub_load_dataset", one_row)
    got = load_hub_instructions("org/chat", "test", config="en", revision="v1")
    assert got == (InstructionExample(_user("Hi"), "Hello"),)
    assert hub_rows == [("org/chat", "en", "test", "v1")]


def test_hub_failure_is_a_data_error(monkeypatch: pytest.MonkeyPatch) -> None:
    def unreachable(name: str, config: str | None, split: str, revision: str | None) -> Any:
        raise ConnectionError("Couldn't reach 'org/d' on the Hub\nsecond line")

    monkeypatch.setattr(instructions, "_hub_load_dataset", unreachable)
    for variable in OFFLINE_VARIABLES:
        monkeypatch.delenv(variable, raising=False)
    with pytest.raises(DataError) as info:
        load_hub_instructions("org/d", "train")
    message = str(info.value)
    assert message.startswith("cannot load hub dataset 'org/d' split 'train' from the Hugging")
    assert "ConnectionError: Couldn't reach 'org/d' on the Hub" in message
    assert "second line" not in message


@pytest.mark.parametrize("variable", OFFLINE_VARIABLES)
def test_hub_offline_fails_before_any_load(monkeypatch: pytest.MonkeyPatch, variable: str) -> None:
    def never(name: str, config: str | None, split: str, revision: str | None) -> Any:
        pytest.fail("the hub loader was called although the hub is switched off")

    monkeypatch.setattr(instructions, "_hub_load_dataset", never)
    for other in OFFLINE_VARIABLES:
        monkeypatch.delenv(other, raising=False)
    monkeypatch.setenv(variable, "YES")
    with pytest.raises(DataError, match=rf"switched off \({variable}=YES is set\); give a local"):
        load_hub_instructions("databricks/databricks-dolly-15k")
