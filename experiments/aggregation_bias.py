"""How far each strategy's global update is from the exact weighted update, on real client updates.

Runs a few ``hlora`` rounds of a real federation (all-MiniLM-L6-v2 on MRPC by default) and, in
every round, hands the same client updates to every strategy. Each strategy's global update is
compared with the exact ``dW = sum_k (n_k / n) s_k B_k A_k`` computed here in fp64, over all
adapted layers at once:

- ``error`` = ``||dW_strategy - dW||_F / ||dW||_F``;
- ``norm ratio`` = ``||dW_strategy||_F / ||dW||_F`` (below 1: the update shrinks);
- for ``hlora``, the same for every client rank's truncation (what that client starts from).

Naive averaging (``fedavg``) only takes equal ranks; run it on a homogeneous federation.

    python experiments/aggregation_bias.py experiments/e1_mrpc.toml --rounds 3
    python experiments/aggregation_bias.py experiments/e3_mrpc.toml --rounds 3
"""

from __future__ import annotations

import argparse
import json
import math
import os
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from hlora.aggregation import AggregationOptions, ClientUpdate, get_strategy
from hlora.config import load_config
from hlora.engines.inprocess import InProcessTransport
from hlora.federation import build_federation, make_loop
from hlora.protocol import RoundResult, TrainInstruction
from hlora.report import RoundProgress


class RecordingTransport(InProcessTransport):
    """The in-process engine, keeping the last round's client updates."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.last_updates: list[ClientUpdate] = []

    def run_round(self, instructions: Sequence[TrainInstruction]) -> RoundResult:
        result = super().run_round(instructions)
        self.last_updates = [r.update for r in result.replies]
        return result


def exact_update(updates: Sequence[ClientUpdate]) -> dict[str, Tensor]:
    """``sum_k (n_k / n) s_k B_k A_k`` per layer, in fp64."""
    total = sum(u.num_examples for u in updates)
    out: dict[str, Tensor] = {}
    for u in updates:
        weight = u.num_examples / total * u.scaling
        for name, f in u.factors.items():
            term = weight * (f.B.double() @ f.A.double())
            out[name] = term if name not in out else out[name] + term
    return out


def compare(candidate: Mapping[str, Tensor], exact: Mapping[str, Tensor]) -> tuple[float, float]:
    """(relative error, norm ratio) of ``candidate`` against ``exact``, over all layers."""
    err = sum(float((candidate[n].double() - exact[n]).pow(2).sum()) for n in exact)
    ref = sum(float(exact[n].pow(2).sum()) for n in exact)
    size = sum(float(candidate[n].double().pow(2).sum()) for n in exact)
    return math.sqrt(err / ref), math.sqrt(size / ref)


def round_rows(updates: list[ClientUpdate], scaling: float, round_num: int) -> list[dict[str, Any]]:
    """Every applicable strategy (and hlora's truncations) against the exact update."""
    exact = exact_update(updates)
    options = AggregationOptions()
    ranks = sorted({u.rank for u in updates})
    strategies = ["hlora", "zeropad", "flora"] + (["fedavg"] if len(ranks) == 1 else [])
    rows = []
    results = {name: get_strategy(name).aggregate(updates, options) for name in strategies}
    for name, g in results.items():
        error, ratio = compare(g.dense_layers(), exact)
        rows.append({"round": round_num, "update": name, "error": error, "norm_ratio": ratio})
    for rank in ranks:
        factors = results["hlora"].client_factors(rank, scaling)
        dense = {n: f.delta(scaling) for n, f in factors.items()}
        error, ratio = compare(dense, exact)
        label = f"hlora, rank-{rank} truncation"
        rows.append({"round": round_num, "update": label, "error": error, "norm_ratio": ratio})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("config", help="a TOML configuration (e.g. experiments/e1_mrpc.toml)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    parser.add_argument("--data-dir", default=os.environ.get("HLORA_DATA_DIR"))
    args = parser.parse_args()
    overrides = [
        f"federation.rounds={args.rounds}",
        "federation.strategy=hlora",
        "train.local_epochs=0.25",
        f"server.eval_every={args.rounds}",
        "server.eval_truncations=never",
        *([f"data.data_dir={json.dumps(args.data_dir)}"] if args.data_dir else []),
        *args.overrides,
    ]
    config = load_config(args.config, tuple(overrides))
    federation = build_federation(config)
    transport = RecordingTransport(federation.runtime, federation.train_features)
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as tmp:
        loop = make_loop(
            federation, Path(tmp), RoundProgress(args.rounds, enabled=False), transport
        )
        state = loop.initial_state()
        for round_num in range(1, args.rounds + 1):
            state, _ = loop.run_round(state, round_num)
            with torch.no_grad():
                rows += round_rows(transport.last_updates, config.model.lora_scaling, round_num)
    ranks = sorted(set(config.federation.ranks))
    print(f"{args.config}: ranks {ranks}, {config.federation.num_clients} clients")
    print(f"{'round':>5}  {'update':<28}{'error':>10}{'norm ratio':>12}")
    for r in rows:
        print(f"{r['round']:>5}  {r['update']:<28}{r['error']:>10.2e}{r['norm_ratio']:>12.4f}")
    print(json.dumps({"experiment": "aggregation_bias", "config": args.config, "rows": rows}))


if __name__ == "__main__":
    main()
