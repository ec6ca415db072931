"""Tests of hlora.report: metrics log, summaries, plots, tables, JSON files and progress."""

from __future__ import annotations

import io
import json
import logging
import math
from pathlib import Path
from typing import Any

import pytest
import rich.console

from hlora.errors import CheckpointError
from hlora.report import (
    MetricsLog,
    RoundProgress,
    convergence_figure,
    format_table,
    load_run_records,
    plot_convergence,
    rank_series,
    summarize,
    write_json,
)

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _record(round_num: int, **fields: Any) -> dict[str, Any]:
    return {"round": round_num, **fields}


# ------------------------------------------------------------------------------------------------
# MetricsLog
# ------------------------------------------------------------------------------------------------


def test_append_read_round_trip(tmp_path: Path) -> None:
    log = MetricsLog(tmp_path / "run" / "metrics.jsonl")
    assert log.read() == []  # no file yet
    records = [
        _record(
            1,
            strategy="hlora",
            train_loss=0.61,
            clients=[{"client_id": "client03", "rank": 8, "loss": 0.58}],
            eval=None,
        ),
        _record(2, eval={"accuracy": 0.71, "f1": 0.8}, eval_by_rank={"2": {"accuracy": 0.69}}),
    ]
    for record in records:
        log.append(record)
    assert log.read() == records
    lines = log.path.read_text().splitlines()
    assert len(lines) == 2
    assert json.loads(lines[0])["round"] == 1
    assert MetricsLog(str(log.path)).read() == records  # str paths work too


def test_append_writes_strict_json(tmp_path: Path) -> None:
    log = MetricsLog(tmp_path / "metrics.jsonl")
    log.append(_record(1, train_loss=math.nan, eval={"loss": math.inf}, ranks=(2, 8)))
    assert "NaN" not in log.path.read_text() and "Infinity" not in log.path.read_text()
    assert log.read() == [_record(1, train_loss=None, eval={"loss": None}, ranks=[2, 8])]
    with pytest.raises(ValueError, match="round"):
        log.append({"train_loss": 0.5})
    with pytest.raises(TypeError, match="object"):
        log.append(_record(2, bad=object()))
    assert len(log.read()) == 1  # failed appends wrote nothing


def test_truncated_last_line_is_skipped(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    log = MetricsLog(tmp_path / "metrics.jsonl")
    log.append(_record(1, train_loss=0.7))
    log.append(_record(2, train_loss=0.6))
    with open(log.path, "ab") as f:  # a writer killed in the middle of round 3's line
        f.write(b'{"round": 3, "train_lo')
    with caplog.at_level(logging.WARNING, logger="hlora.report"):
        assert [r["round"] for r in log.read()] == [1, 2]
    assert "metrics.jsonl:3" in caplog.text

    # The next append cuts the broken tail off instead of gluing onto it.
    log.append(_record(3, train_loss=0.5))
    assert [r["round"] for r in log.read()] == [1, 2, 3]
    assert log.path.read_text().count("\n") == 3


def test_complete_last_line_without_newline_is_kept(tmp_path: Path) -> None:
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"round": 1}\n{"round": 2}')
    log = MetricsLog(path)
    assert [r["round"] for r in log.read()] == [1, 2]
    log.append(_record(3))
    assert [r["round"] for r in log.read()] == [1, 2, 3]


def test_corrupt_middle_line_raises_with_file_and_line(tmp_path: Path) -> None:
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"round": 1}\n{"round": 2, oops}\n{"round": 3}\n')
    with pytest.raises(CheckpointError, match=r"metrics\.jsonl:2") as info:
        MetricsLog(path).read()
    assert str(path) in str(info.value)

    path.write_text('{"round": 1}\n[1, 2]\n{"round": 3}\n')  # valid JSON, not an object
    with pytest.raises(CheckpointError, match=r"metrics\.jsonl:2: .*JSON object"):
        MetricsLog(path).read()


def test_truncate_to_round(tmp_path: Path) -> None:
    log = MetricsLog(tmp_path / "metrics.jsonl")
    MetricsLog(tmp_path / "missing.jsonl").truncate_to_round(3)  # no file: nothing to do
    assert not (tmp_path / "missing.jsonl").exists()
    for round_num in range(1, 6):
        log.append(_record(round_num, train_loss=1.0 / round_num))
    with open(log.path, "ab") as f:
        f.write(b'{"round": 6, "tr')
    log.truncate_to_round(3)
    assert log.read() == [_record(r, train_loss=1.0 / r) for r in (1, 2, 3)]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.jsonl"]  # no temp file left
    log.append(_record(4, train_loss=0.2))  # the resumed run goes on
    assert [r["round"] for r in log.read()] == [1, 2, 3, 4]
    log.truncate_to_round(0)
    assert log.read() == []
    assert log.path.read_bytes() == b""


def test_truncate_to_round_needs_round_numbers(tmp_path: Path) -> None:
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"round": 1}\n{"step": 2}\n')
    with pytest.raises(CheckpointError, match="record 2 has no integer 'round'"):
        MetricsLog(path).truncate_to_round(1)


def test_load_run_records(tmp_path: Path) -> None:
    missing = tmp_path / "no-such-run"
    with pytest.raises(CheckpointError, match="run folder not found") as info:
        load_run_records(missing)
    assert str(missing) in str(info.value)

    run = tmp_path / "run"
    run.mkdir()
    with pytest.raises(CheckpointError, match=r"no metrics\.jsonl") as info:
        load_run_records(run)
    assert str(run / "metrics.jsonl") in str(info.value)

    MetricsLog(run / "metrics.jsonl").append(_record(1, train_loss=0.5))
    assert load_run_records(str(run)) == [_record(1, train_loss=0.5)]


# ------------------------------------------------------------------------------------------------
# summarize
# ------------------------------------------------------------------------------------------------

RECORDS: list[dict[str, Any]] = [
    _record(1, wall_time_s=10.0, train_loss=0.69, bytes_sent=1000, bytes_received=900),
    _record(
        2,
        wall_time_s=20.5,
        train_loss=0.62,
        bytes_sent=1000,
        bytes_received=800,
        eval={"accuracy": 0.70, "f1": 0.75, "loss": 0.60},
    ),
    _record(3, wall_time_s=30.0, train_loss=None, bytes_sent=None, bytes_received=700),
    _record(
        4,
        wall_time_s=40.0,
        train_loss=0.50,
        bytes_sent=1000,
        eval={"accuracy": 0.80, "f1": 0.74, "loss": 0.50},
        eval_by_rank={"2": {"accuracy": 0.79}, "16": {"accuracy": 0.80}},
    ),
    _record(
        5,
        wall_time_s=51.25,
        train_loss=0.45,
        bytes_sent=2000,
        bytes_received=1600,
        eval={"accuracy": 0.78, "f1": None, "loss": 0.55},
    ),
]


def test_summarize() -> None:
    summary = summarize(RECORDS, ["accuracy", "f1", "loss"], targets={"accuracy": 0.75, "f1": 0.9})
    assert summary == {
        "rounds": 5,
        "final": {"accuracy": 0.78, "f1": 0.74, "loss": 0.55},  # f1's last value is round 4's
        "best": {"accuracy": 0.80, "f1": 0.75, "loss": 0.50},  # loss is minimized
        "best_round": {"accuracy": 4, "f1": 2, "loss": 4},
        "rounds_to_target": {"accuracy": 4, "f1": None},
        "total_bytes_sent": 5000,
        "total_bytes_received": 4000,
        "mean_bytes_per_round": 1800.0,
        "wall_time_s": 51.25,
        "mean_train_loss_last_round": 0.45,
        # the last evaluation of the truncations (round 4), though round 5 evaluated the global
        "final_by_rank": {"2": {"accuracy": 0.79}, "16": {"accuracy": 0.80}},
    }
    assert "rounds_to_target" not in summarize(RECORDS, ["accuracy"])


def test_summarize_edge_cases() -> None:
    assert summarize([], ["accuracy"], targets={"accuracy": 0.5}) == {
        "rounds": 0,
        "final": {"accuracy": None},
        "best": {"accuracy": None},
        "best_round": {"accuracy": None},
        "rounds_to_target": {"accuracy": None},
        "total_bytes_sent": 0,
        "total_bytes_received": 0,
        "mean_bytes_per_round": None,
        "wall_time_s": None,
        "mean_train_loss_last_round": None,
        "final_by_rank": {},
    }
    # No train_loss in the last round: the clients' losses weighted by their examples.
    clients = [
        {"client_id": "a", "num_examples": 300, "loss": 0.5},
        {"client_id": "b", "num_examples": 100, "loss": 0.9},
        {"client_id": "c", "num_examples": 50, "loss": None},
    ]
    records = [
        _record(1, eval={"accuracy": 0.6}),
        _record(2, eval={"accuracy": 0.6}, clients=clients),  # ties keep the first round
    ]
    summary = summarize(records, ["accuracy"], targets={"loss": 0.1})
    assert summary["mean_train_loss_last_round"] == pytest.approx(0.6)
    assert summary["best_round"] == {"accuracy": 1}
    assert summary["rounds_to_target"] == {"loss": None}


# ------------------------------------------------------------------------------------------------
# plot_convergence
# ------------------------------------------------------------------------------------------------


def _sparse_run(seed: float, rounds: int, every: int) -> list[dict[str, Any]]:
    return [
        _record(
            r,
            train_loss=0.7 * seed / r,
            **({"eval": {"accuracy": 0.5 + 0.04 * r * seed}} if r % every == 0 else {}),
        )
        for r in range(1, rounds + 1)
    ]


def test_plot_convergence_two_sparse_runs(tmp_path: Path) -> None:
    import matplotlib

    backend = matplotlib.get_backend()
    runs = {"hlora": _sparse_run(1.0, 10, 3), "fedavg": _sparse_run(0.9, 8, 2)}
    out = plot_convergence(runs, "accuracy", tmp_path / "plots" / "accuracy.png", title="MRPC")
    assert out == tmp_path / "plots" / "accuracy.png"
    data = out.read_bytes()
    assert data.startswith(PNG_SIGNATURE)
    assert len(data) > 5_000
    assert [p.name for p in out.parent.iterdir()] == ["accuracy.png"]  # no temp file left
    assert matplotlib.get_backend() == backend  # no global backend switch


def test_convergence_figure_wraps_a_long_title_inside_the_figure() -> None:
    runs = {"hlora": _sparse_run(1.0, 10, 3)}
    title = "E1: naive LoRA averaging vs hlora, every client at rank 8 " * 2
    fig = convergence_figure(runs, "accuracy", title=title)
    renderer = fig.canvas.get_renderer()
    fig.draw(renderer)
    suptitle = fig.get_suptitle()
    assert suptitle.replace("\n", " ") == title.strip()
    assert suptitle.count("\n") == 1
    box = fig._suptitle.get_window_extent(renderer)
    assert box.x0 >= 0 and box.x1 <= fig.bbox.width
    short = convergence_figure(runs, "accuracy")
    assert short.get_suptitle() == "accuracy by round"


def test_one_run_shows_each_rank_and_the_reference_lines() -> None:
    records = [
        _record(1, eval={"accuracy": 0.6}, eval_by_rank={"2": {"accuracy": 0.5}}),
        _record(2, eval={"accuracy": 0.7}),
        _record(3, eval={"accuracy": 0.8}, eval_by_rank={"16": {"accuracy": 0.79}, "2": {}}),
    ]
    assert rank_series(records, "accuracy") == {"2": ([1], [0.5]), "16": ([3], [0.79])}
    fig = convergence_figure(
        {"hlora": records}, "accuracy", reference_lines={"majority class": 0.684}
    )
    ax = fig.axes[0]
    labels = [line.get_label() for line in ax.get_lines()]
    assert labels == ["hlora", "rank-2 truncation", "rank-16 truncation", "majority class"]
    assert list(ax.get_lines()[-1].get_ydata()) == [0.684, 0.684]
    # several runs: the global models and the lines only
    two = convergence_figure({"a": records, "b": records}, "accuracy")
    assert [line.get_label() for line in two.axes[0].get_lines()] == ["a", "b"]


def test_plot_convergence_single_run_and_errors(tmp_path: Path) -> None:
    # One run, one evaluation only, and a metric no round reports.
    runs = {"only": [_record(1, train_loss=0.7), _record(2, eval={"accuracy": 0.6})]}
    for metric in ("accuracy", "f1"):
        out = plot_convergence(runs, metric, str(tmp_path / f"{metric}.png"))
        assert out.read_bytes().startswith(PNG_SIGNATURE)
    with pytest.raises(ValueError, match="at least one run"):
        plot_convergence({}, "accuracy", tmp_path / "empty.png")


# ------------------------------------------------------------------------------------------------
# format_table
# ------------------------------------------------------------------------------------------------


def test_format_table() -> None:
    rows: list[dict[str, Any]] = [
        {"strategy": "hlora", "accuracy": 0.710712, "rounds": 10, "bytes": 1234567.0, "note": None},
        {"strategy": "zeropad", "accuracy": None, "rounds": 8, "bytes": 12.9},
    ]
    table = format_table(rows, ["strategy", "accuracy", "rounds", "bytes", "note"])
    assert table.splitlines() == [
        "strategy  accuracy  rounds      bytes  note",
        "--------  --------  ------  ---------  ----",
        "hlora       0.7107      10  1.235e+06  -",
        "zeropad          -       8       12.9  -",
    ]
    assert not table.endswith("\n")
    assert format_table([], ["a", "bb"]).splitlines() == ["a  bb", "-  --"]


# ------------------------------------------------------------------------------------------------
# write_json
# ------------------------------------------------------------------------------------------------


def test_write_json_atomic(tmp_path: Path) -> None:
    path = tmp_path / "out" / "summary.json"
    write_json(path, {"b": 1, "a": [1.5, None, math.nan], "c": {"z": True, "y": "x"}})
    text = path.read_text()
    assert text == (
        '{\n  "a": [\n    1.5,\n    null,\n    null\n  ],\n  "b": 1,\n'
        '  "c": {\n    "y": "x",\n    "z": true\n  }\n}\n'
    )
    write_json(str(path), [1, 2])  # replaces the old file
    assert json.loads(path.read_text()) == [1, 2]
    with pytest.raises(TypeError):
        write_json(path, {"bad": object()})
    assert json.loads(path.read_text()) == [1, 2]  # a failed write keeps the old file
    assert [p.name for p in path.parent.iterdir()] == ["summary.json"]  # no temp files left


# ------------------------------------------------------------------------------------------------
# RoundProgress
# ------------------------------------------------------------------------------------------------


def _console() -> tuple[rich.console.Console, io.StringIO]:
    buffer = io.StringIO()
    return rich.console.Console(file=buffer, force_terminal=False, width=60), buffer


def test_round_progress_prints_round_and_log_lines() -> None:
    console, buffer = _console()
    with RoundProgress(10, console=console) as progress:
        progress.start_round(3, num_clients=2)
        progress.client_done("client03", rank=8, loss=0.58)
        progress.log("dropped client07: [timeout] after 30 s")
        progress.client_done("client05", rank=2, loss=None)
        progress.end_round(
            {
                "round": 3,
                "round_time_s": 12.94,
                "train_loss": 0.61234,
                "eval": {"accuracy": 0.71071, "f1": 0.80214, "loss": 0.55},
            }
        )
        progress.start_round(4, num_clients=2)
        progress.end_round({"round": 4, "train_loss": None})
    lines = buffer.getvalue().splitlines()
    assert lines[0] == "dropped client07: [timeout] after 30 s"  # verbatim, no markup
    assert lines[1] == "round 3/10  loss 0.6123  accuracy 0.7107  f1 0.8021  [12.9 s]"
    assert lines[2].startswith("round 4/10  loss -  [") and lines[2].endswith(" s]")
    assert len(lines) == 3  # no bars and no client lines off a terminal


def test_round_progress_long_line_is_not_wrapped() -> None:
    console, buffer = _console()
    evaluation = {f"metric_{i}": 0.5 for i in range(8)}
    RoundProgress(2, console=console).end_round({"round": 1, "train_loss": 0.5, "eval": evaluation})
    assert len(buffer.getvalue().splitlines()) == 1


def test_round_progress_disabled_is_silent() -> None:
    console, buffer = _console()
    with RoundProgress(5, enabled=False, console=console) as progress:
        progress.start_round(1, num_clients=3)
        progress.client_done("client00", rank=4, loss=0.7)
        progress.end_round({"round": 1, "train_loss": 0.7})
        progress.log("dropped client01: timeout")
    assert buffer.getvalue() == ""
    with pytest.raises(ValueError, match="total_rounds"):
        RoundProgress(0)


def test_round_progress_on_a_terminal() -> None:
    buffer = io.StringIO()
    console = rich.console.Console(file=buffer, force_terminal=True, width=100)
    with RoundProgress(2, console=console) as progress:
        for round_num in (1, 2):
            progress.start_round(round_num, num_clients=2)
            progress.client_done("client00", rank=4, loss=0.7)
            progress.client_done("client01", rank=8, loss=0.6)
            progress.end_round({"round": round_num, "train_loss": 0.65, "round_time_s": 1.0})
    output = buffer.getvalue()
    assert "round 1/2  loss 0.6500  [1.0 s]" in output
    assert "round 2/2  loss 0.6500  [1.0 s]" in output
