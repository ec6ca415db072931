"""How skewed a run's client partition is, seed by seed, without training anything.

For each seed, the partition a run of the given configuration would make (the same
``client_partitions`` every engine uses) and, per client, its size and its share of each class.
The summary figure is the share of all training examples that sit on *nearly one-class clients*:
clients whose largest class holds more than ``--threshold`` (default 0.9) of their examples.
Such clients can only learn to predict their own class, and a federation dominated by them tends
to stay at the majority class.

With clients of mixed ranks it also prints who trains each band of components of the global
update: a client of rank ``r_k`` trains its leading ``r_k`` components (``server.window =
"leading"``), so the band ``(r_{i-1}, r_i]`` is trained only by the clients of rank ``r_i`` or
more. Per band: those clients' share of the training examples and their class shares, which
under label skew need not be the federation's (docs/RESULTS.md, 0.8.10.8).

    python experiments/label_skew.py experiments/e1_mrpc.toml --seeds 0 1 2
    python experiments/label_skew.py experiments/e1_mrpc.toml --seeds 0 1 2 \\
        --set data.task=qqp-sample
    python experiments/label_skew.py experiments/e3_mrpc.toml --seeds 0 1 2 \\
        --set data.task=qqp-sample                          # and who trains each band
"""

from __future__ import annotations

import argparse
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass

from hlora.config import load_config, replace
from hlora.federation import assign_ranks, client_partitions, load_run_task
from hlora.memory import Footprint


@dataclass(frozen=True)
class ClientSkew:
    """One client's part of the training set."""

    size: int
    class_shares: tuple[float, ...]  # (num_classes,), summing to 1

    @property
    def largest_share(self) -> float:
        return max(self.class_shares)


def client_skews(
    labels: Sequence[int], parts: Sequence[Sequence[int]], num_classes: int
) -> list[ClientSkew]:
    """Size and class shares of every client.

    Args:
        labels: Class of every training example, in ``[0, num_classes)``.
        parts: Each client's indices into ``labels`` (non-empty).
        num_classes: Number of classes of the task.
    """
    skews = []
    for part in parts:
        counts = [0] * num_classes
        for i in part:
            counts[labels[i]] += 1
        skews.append(ClientSkew(len(part), tuple(c / len(part) for c in counts)))
    return skews


def share_on_one_class_clients(skews: Sequence[ClientSkew], threshold: float) -> float:
    """Share of all examples held by clients whose largest class exceeds ``threshold``."""
    total = sum(s.size for s in skews)
    return sum(s.size for s in skews if s.largest_share > threshold) / total


@dataclass(frozen=True)
class Band:
    """The clients that train components ``low + 1 .. high`` of the global update."""

    low: int
    high: int
    data_share: float  # their share of all training examples, in (0, 1]
    class_shares: tuple[float, ...]  # (num_classes,): the class shares of their pooled examples


def rank_bands(skews: Sequence[ClientSkew], ranks: Sequence[int]) -> list[Band]:
    """Who trains each band of components when client ``k`` trains its leading ``ranks[k]``.

    Args:
        skews: Every client's size and class shares (:func:`client_skews`).
        ranks: Every client's rank, in the same order.

    Returns:
        One band per distinct rank, lowest first: ``(previous rank, rank]``, held by the clients
        whose rank reaches it.

    Raises:
        ValueError: ``ranks`` and ``skews`` of different lengths.
    """
    if len(ranks) != len(skews):
        raise ValueError(f"{len(ranks)} ranks for {len(skews)} clients")
    total = sum(s.size for s in skews)
    bands, low = [], 0
    for high in sorted(set(ranks)):
        holders = [s for s, r in zip(skews, ranks, strict=True) if r >= high]
        size = sum(s.size for s in holders)
        pooled = tuple(
            sum(s.size * s.class_shares[c] for s in holders) / size
            for c in range(len(holders[0].class_shares))
        )
        bands.append(Band(low, high, size / total, pooled))
        low = high
    return bands


def _no_footprint(rank: int) -> Footprint:
    """Never asked: ``main`` refuses the ``memory`` rule, the one rule that needs a model."""
    raise AssertionError("the 'memory' rank rule needs the model")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("config", help="a TOML configuration (e.g. experiments/e1_mrpc.toml)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--threshold", type=float, default=0.9)
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    parser.add_argument("--data-dir", default=os.environ.get("HLORA_DATA_DIR"))
    args = parser.parse_args()
    if not 0.0 < args.threshold < 1.0:
        parser.error(f"--threshold must lie in (0, 1), got {args.threshold}")
    data_dir = [f"data.data_dir={json.dumps(args.data_dir)}"] if args.data_dir else []
    config = load_config(args.config, tuple(data_dir + args.overrides))
    task = load_run_task(config)
    mixed = len(set(config.federation.ranks)) > 1
    if mixed and config.federation.rank_rule == "memory":
        parser.error("the 'memory' rank rule needs the model: set federation.rank_rule=cycle")
    ranks = assign_ranks(config, _no_footprint) if mixed else []
    labels = [e.label for e in task.train]
    num_classes = task.task.num_labels
    partition = config.data.partition
    if partition == "dirichlet":
        partition += f" (alpha {config.data.alpha})"
    print(
        f"{config.data.task}, {partition}, "
        f"{config.federation.num_clients} clients, {len(labels)} training examples"
    )
    for seed in args.seeds:
        seeded = replace(config, federation={"seed": seed})
        skews = client_skews(
            labels, client_partitions(seeded, task, seeded.federation.num_clients), num_classes
        )
        share = share_on_one_class_clients(skews, args.threshold)
        print(
            f"seed {seed}: {share:.0%} of the examples on clients with over "
            f"{args.threshold:.0%} of one class"
        )
        print("  size      " + " ".join(f"{s.size:>6}" for s in skews))
        for c in range(num_classes):
            print(f"  class {c:<4}" + " ".join(f"{s.class_shares[c]:>6.2f}" for s in skews))
        if ranks:
            print("  rank      " + " ".join(f"{r:>6}" for r in ranks))
            for band in rank_bands(skews, ranks):
                shares = " ".join(f"{x:.2f}" for x in band.class_shares)
                print(
                    f"  components {band.low + 1}-{band.high}: {band.data_share:.3f} of the "
                    f"data, class shares {shares}"
                )


if __name__ == "__main__":
    main()
