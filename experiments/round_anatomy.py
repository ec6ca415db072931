"""Who moves the aggregate: one round, client by client (docs/RESULTS.md, section 0.7.1).

Every client trains round 1 from the same start, as the round loop would; for each it prints its
size, positive share and loss, the size of its update ``||s B A||`` over all adapted layers
(flattened), the cosine of that update to the weighted mean update, and its share of the mean's
squared norm, ``w_k <d_k, mean> / ||mean||^2`` (the shares sum to 1).

    python experiments/round_anatomy.py --set federation.seed=1 \\
        --set data.validation_fraction=0.1 --set federation.strategy=fedavg \\
        --set "federation.ranks=[8]" [--set train.optimizer=sgd ...]

Loads the data and model like ``hlora run`` (``HLORA_DATA_DIR`` or ``data.data_dir``); writes
nothing. Each client's update is formed densely (one fp64 copy of every adapted weight per
client): sized for small backbones such as MiniLM, not for LLM shapes.
"""

from __future__ import annotations

import argparse
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from hlora.config import RunConfig, load_config
from hlora.federation import build_federation, make_loop
from hlora.report import RoundProgress


@dataclass(frozen=True)
class ClientRow:
    """One client's round-1 update and its part in the weighted mean."""

    client_id: str
    examples: int
    positive_share: float
    loss: float
    norm: float
    cosine: float
    share: float


def anatomy(config: RunConfig) -> list[ClientRow]:
    """Train round 1 of every client of ``config`` from the same start; rows by update size."""
    federation = build_federation(config)
    objective = federation.runtime.objective
    trained = []
    with tempfile.TemporaryDirectory() as folder, RoundProgress(1, enabled=False) as bar:
        loop = make_loop(federation, Path(folder), bar)
        state = loop.initial_state()
        for slot in federation.clients:
            features = federation.train_features[slot.client_id]
            reply = federation.runtime.train_client(
                loop.instruction(state, slot.client_id, 1), features
            )
            update = reply.update
            flat = torch.cat(
                [
                    (update.scaling * f.B.double() @ f.A.double()).flatten()
                    for f in update.factors.values()
                ]
            )  # (sum over layers of out * in,)
            labels = [objective.label(f) for f in features]
            positive = sum(1 for y in labels if y == 1) / len(labels)
            trained.append((slot.client_id, len(features), positive, reply.loss, flat))
    total = sum(n for _, n, _, _, _ in trained)
    mean = torch.stack([(n / total) * d for _, n, _, _, d in trained]).sum(dim=0)
    rows = [
        ClientRow(
            cid,
            n,
            positive,
            loss,
            float(d.norm()),
            float(d @ mean / (d.norm() * mean.norm())),
            float((n / total) * (d @ mean) / (mean @ mean)),
        )
        for cid, n, positive, loss, d in trained
    ]
    return sorted(rows, key=lambda r: -r.norm)


def add_config_arguments(parser: argparse.ArgumentParser) -> None:
    """A script's optional TOML file and its ``--set KEY=VALUE`` overrides."""
    parser.add_argument("config", nargs="?", default=None, help="a TOML file (default: none)")
    parser.add_argument("--set", action="append", default=[], dest="overrides")


def config_from(args: argparse.Namespace) -> RunConfig:
    """The configuration of :func:`add_config_arguments`' arguments, with the data folder from
    ``HLORA_DATA_DIR`` unless an override names one, as ``hlora run`` does."""
    overrides = list(args.overrides)
    data_dir = os.environ.get("HLORA_DATA_DIR")
    if data_dir and not any(o.startswith("data.data_dir") for o in overrides):
        overrides.append(f"data.data_dir={data_dir}")
    return load_config(args.config, tuple(overrides))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_config_arguments(parser)
    rows = anatomy(config_from(parser.parse_args()))
    print(
        "| client | examples | positive share | round-1 loss | ||s B A|| | cosine to the mean "
        "| share of the mean |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(
            f"| {r.client_id} | {r.examples} | {r.positive_share:.3f} | {r.loss:.3f} "
            f"| {r.norm:.3f} | {r.cosine:.3f} | {r.share:.3f} |"
        )


if __name__ == "__main__":
    main()
