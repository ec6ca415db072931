"""Tests of hlora.data.glue: real GLUE files, error messages and the hub fallback."""

from __future__ import annotations

import os
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from hlora.data import glue
from hlora.data.glue import (
    TASK_NAMES,
    Example,
    TaskInfo,
    get_task,
    load_task,
    resolve_data_dir,
)
from hlora.data.hub import OFFLINE_VARIABLES
from hlora.errors import DataError

MRPC_HEADER = "Quality\t#1 ID\t#2 ID\t#1 String\t#2 String\n"
RTE_HEADER = "index\tsentence1\tsentence2\tlabel\n"


def _glue_dir() -> Path:
    env = os.environ.get("HLORA_DATA_DIR")
    candidates = [Path(env)] if env else []
    candidates.append(Path(__file__).resolve().parents[2].parent / "shared" / "data" / "glue")
    for folder in candidates:
        if (folder / "MRPC" / "train.tsv").is_file():
            return folder
    pytest.skip(f"GLUE data not found (set HLORA_DATA_DIR); tried {[str(c) for c in candidates]}")


@pytest.fixture(scope="module")
def glue_dir() -> Path:
    return _glue_dir()


@pytest.fixture(autouse=True)
def _no_env_no_hub(monkeypatch: pytest.MonkeyPatch) -> None:
    """Tests never read the real HLORA_DATA_DIR implicitly and never reach the network.

    The offline switches are cleared so that the (patched, network-free) hub path is taken;
    :func:`test_offline_switch_skips_the_hub` sets them again.
    """
    monkeypatch.delenv("HLORA_DATA_DIR", raising=False)
    for name in OFFLINE_VARIABLES:
        monkeypatch.delenv(name, raising=False)

    def offline(path: str, config: str) -> Any:
        raise ConnectionError(f"no network in tests ({path}/{config})")

    monkeypatch.setattr(glue, "_hub_load_dataset", offline)


def _write(path: Path, text: str, encoding: str = "utf-8") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding=encoding)
    return path


def _mrpc_row(label: str = "1", a: str = "A b .", b: str = "A b c .") -> str:
    return f"{label}\t1\t2\t{a}\t{b}\n"


def _fake_glue(root: Path, train: str, dev: str | None = None) -> Path:
    _write(root / "MRPC" / "train.tsv", train, encoding="utf-8-sig")
    _write(root / "MRPC" / "dev.tsv", dev if dev is not None else MRPC_HEADER + _mrpc_row())
    return root


# --- task registry and data dir ----------------------------------------------------------------


def test_task_registry() -> None:
    assert TASK_NAMES == ("mrpc", "rte", "qqp", "qqp-sample", "instructions")
    assert get_task("mrpc") == TaskInfo("mrpc", "mrpc", ("accuracy", "f1"))
    assert get_task("rte").metrics == ("accuracy",)
    assert get_task("qqp").hub_config == "qqp"
    sample = get_task("qqp-sample")
    assert sample.hub_config is None
    assert not sample.comparable_to_glue
    assert sample.metrics == ("accuracy", "f1")
    own = get_task("instructions")
    assert own.metrics == ("perplexity",) and not own.comparable_to_glue
    with pytest.raises(DataError, match=r"reads data\.train_file"):
        load_task("instructions")


def test_unknown_task() -> None:
    with pytest.raises(DataError, match=r"unknown task 'sst2'.*'mrpc', 'rte', 'qqp', 'qqp-sample'"):
        get_task("sst2")
    with pytest.raises(DataError, match="unknown task"):
        load_task("sst2")


def test_resolve_data_dir(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    assert resolve_data_dir(None) is None
    monkeypatch.setenv("HLORA_DATA_DIR", str(tmp_path))
    assert resolve_data_dir(None) == tmp_path
    assert resolve_data_dir(tmp_path / "x") == tmp_path / "x"
    assert resolve_data_dir(str(tmp_path / "y")) == tmp_path / "y"


# --- real files ---------------------------------------------------------------------------------


def test_mrpc_real(glue_dir: Path) -> None:
    data = load_task("mrpc", glue_dir)
    assert (len(data.train), len(data.dev)) == (3668, 408)
    assert sum(ex.label for ex in data.dev) == 279
    assert sum(ex.label for ex in data.train) == 2474
    assert data.source == str(glue_dir / "MRPC")
    # dev.tsv rows 1 and 2: a paraphrase (1) and a non-paraphrase (0)
    assert data.dev[0].label == 1
    assert data.dev[0].text_a.startswith("He said the foodservice pie business doesn 't fit")
    assert data.dev[0].text_b.startswith('" The foodservice pie business does not fit')
    assert data.dev[1].label == 0
    assert data.dev[1].text_a.startswith("Magnarelli said Racicot")


def test_mrpc_env_var_and_limits(glue_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HLORA_DATA_DIR", str(glue_dir))
    full = load_task("mrpc")
    data = load_task("mrpc", train_limit=64, dev_limit=10)
    assert data.train == full.train[:64]
    assert data.dev == full.dev[:10]
    assert load_task("mrpc", dev_limit=10_000).dev == full.dev


def test_rte_real(glue_dir: Path) -> None:
    data = load_task("rte", glue_dir)
    assert (len(data.train), len(data.dev)) == (2490, 277)
    assert Counter(ex.label for ex in data.train) == {0: 1249, 1: 1241}
    assert Counter(ex.label for ex in data.dev) == {0: 146, 1: 131}
    # train.tsv index 0 is not_entailment (1), index 1 is entailment (0)
    assert data.train[0] == Example(
        "No Weapons of Mass Destruction Found in Iraq Yet.",
        "Weapons of Mass Destruction Found in Iraq.",
        1,
    )
    assert data.train[1].label == 0
    assert (
        data.train[1].text_b == "Pope Benedict XVI is the new leader of the Roman Catholic Church."
    )


def test_qqp_sample_real(glue_dir: Path) -> None:
    data = load_task("qqp-sample", glue_dir)
    assert not data.task.comparable_to_glue
    assert len(data.dev) == glue.QQP_SAMPLE_DEV_ROWS == 2350
    assert len(data.train) + len(data.dev) == 23_497
    everything = data.train + data.dev
    assert sum(ex.label for ex in everything) == 8747
    repaired = [ex for ex in everything if ex.text_b.endswith("for the exam jlpt5?")]
    assert repaired == [
        Example(
            "How is the life of a math student? Could you describe your own experiences?",
            "Which level of prepration is enough for the exam jlpt5?",
            0,
        )
    ]
    again = load_task("qqp-sample", glue_dir, seed=123)
    assert again.train == data.train
    assert again.dev == data.dev
    assert set(data.dev).isdisjoint(data.train)


def test_qqp_with_fragments_only(glue_dir: Path) -> None:
    with pytest.raises(DataError) as info:
        load_task("qqp", glue_dir, allow_hub=False)
    message = str(info.value)
    assert "QQP/train.tsv" in message
    assert "train.first9.tsv" in message
    assert "qqp-sample" in message
    assert "nyu-mll/glue" in message


# --- missing data and the hub -------------------------------------------------------------------


def test_missing_folder_names_both_ways(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere"
    with pytest.raises(DataError) as info:
        load_task("mrpc", missing)
    message = str(info.value)
    assert message.startswith("cannot load task 'mrpc'")
    assert str(missing) in message
    assert "HLORA_DATA_DIR" in message
    assert "nyu-mll/glue" in message
    assert "ConnectionError: no network in tests" in message


def test_no_folder_and_hub_disabled(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"HLORA_DATA_DIR.*nyu-mll/glue.*disabled"):
        load_task("rte", None, allow_hub=False)
    _write(tmp_path / "MRPC" / "train.tsv", MRPC_HEADER + _mrpc_row())
    with pytest.raises(DataError, match=r"expected MRPC/train\.tsv and MRPC/dev\.tsv"):
        load_task("mrpc", tmp_path, allow_hub=False)


def test_qqp_sample_has_no_hub_copy(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"QQP/sample/new_dev\.tsv.*no copy on the Hugging Face"):
        load_task("qqp-sample", tmp_path)


def _fake_hub_dict(config: str) -> Any:
    import datasets

    cols = ("question1", "question2") if config == "qqp" else ("sentence1", "sentence2")

    def split(n: int) -> datasets.Dataset:
        return datasets.Dataset.from_dict(
            {
                cols[0]: [f"a{i}" for i in range(n)],
                cols[1]: [f"b{i}" for i in range(n)],
                "label": [i % 2 for i in range(n)],
                "idx": list(range(n)),
            }
        )

    return datasets.DatasetDict({"train": split(6), "validation": split(3), "test": split(2)})


def test_hub_fallback(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    calls: list[tuple[str, str]] = []

    def fake(path: str, config: str) -> Any:
        calls.append((path, config))
        return _fake_hub_dict(config)

    monkeypatch.setattr(glue, "_hub_load_dataset", fake)
    data = load_task("qqp", tmp_path, train_limit=4)
    assert calls == [("nyu-mll/glue", "qqp")]
    assert data.source == "hub:nyu-mll/glue/qqp"
    assert data.train == tuple(Example(f"a{i}", f"b{i}", i % 2) for i in range(4))
    assert len(data.dev) == 3
    assert load_task("rte").dev[2] == Example("a2", "b2", 0)
    with pytest.raises(DataError, match="disabled"):
        load_task("mrpc", allow_hub=False)


@pytest.mark.parametrize(
    ("variable", "value"), [("HF_HUB_OFFLINE", "1"), ("HF_DATASETS_OFFLINE", "true")]
)
def test_offline_switch_skips_the_hub(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, variable: str, value: str
) -> None:
    def never(path: str, config: str) -> Any:
        pytest.fail(f"the hub was tried although {variable}={value}")

    monkeypatch.setattr(glue, "_hub_load_dataset", never)
    monkeypatch.setenv(variable, value)
    with pytest.raises(DataError) as info:
        load_task("mrpc", tmp_path / "nowhere")
    message = str(info.value)
    assert message.startswith("cannot load task 'mrpc': the data folder")
    assert "HLORA_DATA_DIR" in message
    assert f"hub fallback (nyu-mll/glue) is switched off ({variable}={value} is set)" in message
    monkeypatch.setenv(variable, "0")  # a false value: the hub is tried again
    with pytest.raises(pytest.fail.Exception, match="the hub was tried"):
        load_task("mrpc", tmp_path / "nowhere")


def test_hub_bad_content_is_a_hub_failure(monkeypatch: pytest.MonkeyPatch) -> None:
    def no_validation(path: str, config: str) -> Any:
        dd = _fake_hub_dict(config)
        del dd["validation"]
        return dd

    monkeypatch.setattr(glue, "_hub_load_dataset", no_validation)
    with pytest.raises(DataError, match=r"unreachable \(nyu-mll/glue: KeyError: .*validation"):
        load_task("mrpc")


def test_hub_failure_reason_is_short(monkeypatch: pytest.MonkeyPatch) -> None:
    def fail(path: str, config: str) -> Any:
        raise OSError("x" * 1000 + "\nsecond line")

    monkeypatch.setattr(glue, "_hub_load_dataset", fail)
    with pytest.raises(DataError) as info:
        load_task("mrpc")
    assert "second line" not in str(info.value)
    assert len(str(info.value)) < 600


# --- malformed local files ----------------------------------------------------------------------


def test_wrong_header(tmp_path: Path) -> None:
    _fake_glue(tmp_path, "label\ta\tb\tc\td\n" + _mrpc_row())
    with pytest.raises(DataError, match=r"MRPC/train\.tsv' line 1: unexpected header"):
        load_task("mrpc", tmp_path)


def test_bad_label(tmp_path: Path) -> None:
    _fake_glue(tmp_path, MRPC_HEADER + _mrpc_row() + _mrpc_row(label="2"))
    with pytest.raises(DataError, match=r"train\.tsv' line 3: label '2' is not one of '0', '1'"):
        load_task("mrpc", tmp_path)
    _write(tmp_path / "RTE" / "train.tsv", RTE_HEADER + "0\ta\tb\tentails\n")
    _write(tmp_path / "RTE" / "dev.tsv", RTE_HEADER + "0\ta\tb\tentailment\n")
    with pytest.raises(DataError, match=r"line 2: label 'entails'.*'not_entailment'"):
        load_task("rte", tmp_path)


def test_wrong_field_count(tmp_path: Path) -> None:
    _fake_glue(tmp_path, MRPC_HEADER + _mrpc_row(), dev=MRPC_HEADER + "1\t2\tonly three\n")
    with pytest.raises(
        DataError, match=r"dev\.tsv' line 2: expected 5 tab-separated fields, got 3"
    ):
        load_task("mrpc", tmp_path)


def test_empty_and_header_only_files(tmp_path: Path) -> None:
    _fake_glue(tmp_path, "")
    with pytest.raises(DataError, match=r"train\.tsv' line 1: the file is empty"):
        load_task("mrpc", tmp_path)
    _fake_glue(tmp_path, MRPC_HEADER)
    with pytest.raises(DataError, match=r"train\.tsv' .*no data rows"):
        load_task("mrpc", tmp_path)


def test_small_valid_files_with_bom_crlf_and_blank_lines(tmp_path: Path) -> None:
    _fake_glue(tmp_path, MRPC_HEADER + _mrpc_row("0").replace("\n", "\r\n") + "\n" + _mrpc_row())
    data = load_task("mrpc", tmp_path)
    assert [ex.label for ex in data.train] == [0, 1]
    assert data.train[0].text_b == "A b c ."


def test_qqp_repair_only_on_first_row(tmp_path: Path) -> None:
    header = "id\tqid1\tqid2\tquestion1\tquestion2\tis_duplicate\n"
    glued = "1\t2\t3\tWhy?\tWhy not? 1\n"
    ok = "4\t5\t6\tHow?\tHow so?\t0\n"
    _write(tmp_path / "QQP" / "train.tsv", header + glued + ok)
    _write(tmp_path / "QQP" / "dev.tsv", header + ok + glued)
    with pytest.raises(DataError, match=r"QQP/dev\.tsv' line 3: expected 6 .* got 5"):
        load_task("qqp", tmp_path)
    _write(tmp_path / "QQP" / "dev.tsv", header + ok)
    data = load_task("qqp", tmp_path)
    assert data.train[0] == Example("Why?", "Why not?", 1)
    assert data.source == str(tmp_path / "QQP")


def test_qqp_sample_too_small(tmp_path: Path) -> None:
    _write(tmp_path / "QQP" / "sample" / "new_dev.tsv", "1\t2\t3\ta\tb\t0\n")
    with pytest.raises(DataError, match=r"new_dev\.tsv' has 1 rows.*more than 2350"):
        load_task("qqp-sample", tmp_path)


@pytest.mark.parametrize("option", ["train_limit", "dev_limit"])
@pytest.mark.parametrize("value", [0, -3, 2.5, True])
def test_bad_limits(option: str, value: Any) -> None:
    with pytest.raises(DataError, match=rf"{option} must be a positive integer or None, got"):
        load_task("mrpc", **{option: value})
