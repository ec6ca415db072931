"""How skewed a run's client partition is, seed by seed, without training anything.

For each seed, the partition a run of the given configuration would make (the same
``client_partitions`` every engine uses) and, per client, its size and its share of each class.
The summary figure is the share of all training examples that sit on *nearly one-class clients*:
clients whose largest class holds more than ``--threshold`` (default 0.9) of their examples.
Such clients can only learn to predict their own class, and a federation dominated by them tends
to stay at the majority class.

    python experiments/label_skew.py experiments/e1_mrpc.toml --seeds 0 1 2
    python experiments/label_skew.py experiments/e1_mrpc.toml --seeds 0 1 2 \\
        --set data.task=qqp-sample
"""

from __future__ import annotations

import argparse
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass

from hlora.config import load_config, replace
from hlora.federation import client_partitions, load_run_task


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


if __name__ == "__main__":
    main()
