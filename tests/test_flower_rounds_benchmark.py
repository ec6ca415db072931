"""benchmarks/flower_rounds.py: the per-round overhead it reports (no deployment started)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

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
