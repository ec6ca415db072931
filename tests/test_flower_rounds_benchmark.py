"""benchmarks/flower_rounds.py: the per-round overhead it reports (no deployment started)."""

from __future__ import annotations

import importlib.util
import logging
import sys
from pathlib import Path
from types import ModuleType

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _load() -> ModuleType:
    path = ROOT / "benchmarks" / "flower_rounds.py"
    spec = importlib.util.spec_from_file_location("flower_rounds_under_test", path)
    if spec is None or spec.loader is None:
        raise ImportError(path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def test_flower_rounds_overhead_is_round_time_minus_the_slowest_client() -> None:
    rounds = _load()
    records = [
        {
            "round": 1,
            "round_time_s": 10.0,
            "clients": [{"seconds": 1.5}, {"seconds": 2.5}],
            "dropped": [],
        },
        {
            "round": 2,
            "round_time_s": 30.0,
            "clients": [{"seconds": 2.0}, {"seconds": None}],
            "dropped": [{"client_id": "client01", "reason": "no reply"}],
        },
    ]
    assert rounds.round_overheads(records) == [
        {"round": 1, "round_s": 10.0, "train_s": 2.5, "overhead_s": 7.5, "dropped": 0},
        {"round": 2, "round_s": 30.0, "train_s": 2.0, "overhead_s": 28.0, "dropped": 1},
    ]


def test_the_nodes_timing_lines_split_the_overhead() -> None:
    """The split comes from the line each ClientApp logs; the node that finished last counts."""
    rounds = _load()
    logs = [
        "INFO :      hlora: query round - handled in 0.50 s by a ClientApp process up 3.00 s "
        "before it\n"
        "INFO :      hlora: train round 1 handled in 3.00 s by a ClientApp process up 4.00 s "
        "before it\n"
        "INFO :      hlora: evaluate round 1 handled in 9.00 s by a ClientApp process up 1.00 s "
        "before it\n",
        "INFO :      hlora: train round 1 handled in 2.50 s by a ClientApp process up 5.00 s "
        "before it\n",
    ]
    timings = rounds.node_timings(logs)
    assert timings == {1: [(4.0, 3.0), (5.0, 2.5)]}  # TRAIN only, numbered rounds only
    record = {"round": 1, "round_time_s": 10.0, "clients": [{"seconds": 2.0}], "dropped": []}
    (row,) = rounds.round_overheads([record], timings)
    # The second node ends last (5.0 + 2.5 s): 0.5 s of its handling is not training.
    assert row == {
        "round": 1,
        "round_s": 10.0,
        "train_s": 2.0,
        "overhead_s": 8.0,
        "dropped": 0,
        "startup_s": 5.0,
        "hlora_s": 0.5,
        "flower_s": 2.5,
    }
    assert row["startup_s"] + row["hlora_s"] + row["flower_s"] == row["overhead_s"]


def test_the_client_app_logs_the_line_the_benchmark_reads(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    from flwr.app import ConfigRecord, Message, RecordDict
    from flwr.supercore.task_identity import TaskIdentity

    from hlora.engines.flower import client_app

    for name in ("_run_id", "_node_id", "_task_id"):  # what Flower sets before messages exist
        monkeypatch.setattr(TaskIdentity, name, 0 if name == "_node_id" else 1)
    rounds = _load()
    message = Message(RecordDict(), dst_node_id=1, message_type="train", group_id="3")
    content = RecordDict({"x": ConfigRecord({"y": 1})})
    with caplog.at_level(logging.INFO, logger="flwr"):
        reply = client_app._timed(message, lambda: content)
    assert reply.content is content
    (found,) = [
        rounds.node_timings([r.getMessage()]) for r in caplog.records if "hlora:" in r.getMessage()
    ]
    ((startup, handled),) = found[3]
    assert startup >= 0 and 0 <= handled < startup + 60
