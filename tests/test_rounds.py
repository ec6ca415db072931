"""Round-loop behaviour: invalid updates are dropped, min_clients, rank assignment."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch

from hlora.aggregation import LoraFactors
from hlora.config import load_config
from hlora.errors import ConfigError
from hlora.federation import assign_ranks, run
from hlora.memory import Footprint
from hlora.runtime import ModelRuntime
from hlora.server import FederationError
from tiny_models import tiny_overrides


def _poison(monkeypatch: pytest.MonkeyPatch, victim: str) -> None:
    original = ModelRuntime.train_client

    def poisoned(self, instruction, features):  # type: ignore[no-untyped-def]
        reply = original(self, instruction, features)
        if instruction.client_id != victim:
            return reply
        factors = dict(reply.update.factors)
        name = next(iter(factors))
        nan_a = torch.full_like(factors[name].A, float("nan"))
        factors[name] = LoraFactors(A=nan_a, B=factors[name].B)
        return dataclasses.replace(reply, update=dataclasses.replace(reply.update, factors=factors))

    monkeypatch.setattr(ModelRuntime, "train_client", poisoned)


def test_invalid_update_is_dropped_and_the_round_goes_on(
    tiny_bert_dir: Path, glue_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _poison(monkeypatch, "client01")
    overrides = tiny_overrides(tiny_bert_dir, glue_dir, tmp_path, **{"federation.rounds": 1})
    result = run(load_config(None, tuple(overrides)), progress=False)
    (record,) = [json.loads(x) for x in (result.run_dir / "metrics.jsonl").read_text().splitlines()]
    (dropped,) = record["dropped"]
    assert dropped["client_id"] == "client01"
    assert "contains non-finite values" in dropped["reason"]
    accepted = {c["client_id"]: c["accepted"] for c in record["clients"]}
    assert accepted == {"client00": True, "client01": False, "client02": True}
    assert "eval" in record


def test_too_few_valid_updates_stop_the_run(
    tiny_bert_dir: Path, glue_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _poison(monkeypatch, "client02")
    overrides = tiny_overrides(
        tiny_bert_dir, glue_dir, tmp_path, **{"federation.rounds": 1, "federation.min_clients": 3}
    )
    with pytest.raises(
        FederationError,
        match=r"only 2 valid client updates in this round, fewer than federation\.min_clients = 3",
    ):
        run(load_config(None, tuple(overrides)), progress=False)


def _footprint(rank: int) -> Footprint:
    """100 MiB of weights, 50 of activations, 1 MiB of training state per rank unit."""
    return Footprint(100 * 2**20, 50 * 2**20, rank * 2**20)


def test_rank_rules() -> None:
    cycle = load_config(None, ("federation.num_clients=5", "federation.ranks=[2, 8]"))
    assert assign_ranks(cycle, _footprint) == [2, 8, 2, 8, 2]
    listed = load_config(
        None,
        ("federation.num_clients=3", "federation.rank_rule=list", "federation.ranks=[1, 5, 3]"),
    )
    assert assign_ranks(listed, _footprint) == [1, 5, 3]
    # 152, 154, 158 and 166 MiB for ranks 2, 4, 8 and 16.
    memory = load_config(
        None,
        (
            "federation.num_clients=3",
            "federation.rank_rule=memory",
            "federation.ranks=[2, 4, 8, 16]",
            "federation.memory_budgets_mb=[155, 165.9, 1000]",
        ),
    )
    assert assign_ranks(memory, _footprint) == [4, 8, 16]
    tiny = load_config(
        None,
        (
            "federation.num_clients=1",
            "federation.rank_rule=memory",
            "federation.memory_budgets_mb=[151.9]",
        ),
    )
    with pytest.raises(
        ConfigError,
        match=r"client 0 has 151.9 MiB, the smallest rank 2 needs 152.0 MiB = base 100.0 \+ "
        r"activations 50.0 \+ training state 2.0",
    ):
        assign_ranks(tiny, _footprint)


def test_flora_cumulative_update_stays_exact_and_bounded() -> None:
    from hlora.aggregation import LowRankDelta
    from hlora.server import _accumulate

    gen = torch.Generator().manual_seed(0)
    total = torch.zeros(6, 5, dtype=torch.float64)
    base = None
    for _ in range(4):
        inc = LowRankDelta(
            left=torch.randn(6, 3, generator=gen, dtype=torch.float64),
            right=torch.randn(3, 5, generator=gen, dtype=torch.float64),
            scale=0.5,
        )
        total = total + inc.dense()
        base = _accumulate(base, {"w": inc})
        assert base["w"].rank <= 5
        torch.testing.assert_close(base["w"].dense(), total)


def _clients_per_round(run_dir: Path) -> list[list[str]]:
    records = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [[c["client_id"] for c in r["clients"]] for r in records]


def test_client_sampling_takes_k_seeded_clients_per_round(
    tiny_bert_dir: Path, glue_dir: Path, tmp_path: Path
) -> None:
    settings = {
        "federation.num_clients": 6,
        "federation.clients_per_round": 2,
        "federation.rounds": 4,
        "data.partition": '"iid"',
        "server.eval_every": 4,
    }
    taken = []
    for name in ("a", "b"):
        overrides = tiny_overrides(
            tiny_bert_dir, glue_dir, tmp_path, **settings, **{"output.name": f'"{name}"'}
        )
        taken.append(
            _clients_per_round(run(load_config(None, tuple(overrides)), progress=False).run_dir)
        )
    first, again = taken
    assert first == again  # the same seed draws the same clients
    assert all(len(ids) == 2 and len(set(ids)) == 2 for ids in first)
    assert all(set(ids) <= {f"client0{i}" for i in range(6)} for ids in first)
    assert len({tuple(ids) for ids in first}) > 1  # a new draw each round
