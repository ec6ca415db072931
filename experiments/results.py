"""Tables and convergence plots of the experiments (``docs/RESULTS.md``).

Reads run folders named ``<experiment>-<strategy>-s<seed>`` (as ``experiments/cpu_protocol.sh``
writes them), groups them over seeds and prints Markdown tables: mean and standard deviation
(over seeds, ``n - 1`` denominator) of the final dev accuracy, F1 and cross-entropy, of the
dev accuracy averaged over each run's last evaluations (``--last``, default 4), and of the
dev accuracy averaged over the evaluated rounds (the area under the accuracy curve over its
length: a convergence-speed summary that, unlike the final value, credits reaching it early),
the round at which each seed first reached the target accuracy, the median seconds per round
and the bytes per round. Writes one PNG per experiment and metric (dev accuracy, dev loss) with
the curves averaged over seeds, named ``<experiment>_<cell>[_loss].png``. With ``--bias``, prints
instead the table of one or more ``aggregation_bias.py`` JSON files (one column per strategy or
truncation, one row per round).

    python experiments/results.py runs/cpu-protocol/mrpc-dirichlet --cell mrpc --target 0.70
    python experiments/results.py --bias runs/cpu-protocol/bias/e1-mrpc-iid.json
"""

from __future__ import annotations

import argparse
import json
import math
import re
import statistics
from collections import defaultdict
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from hlora.config import CONFIG_FILE, load_config
from hlora.report import eval_series, load_run_records, plot_convergence, summarize

RUN_NAME = re.compile(r"^(?P<group>.+)-s(?P<seed>\d+)$")


def experiments(ranks: Sequence[int]) -> dict[str, tuple[str, list[tuple[str, str]]]]:
    """Experiment -> (title, groups in plot order, with their labels).

    Args:
        ranks: The cell's heterogeneous ranks, ascending (see ``cell_ranks``). The centralized
            reference is labelled with the largest: its rank when ``federation.centralized_rank``
            is 0, the default every protocol script keeps.
    """
    shown = "{" + ",".join(str(r) for r in ranks) + "}"
    return {
        "e1": (
            "E1: naive LoRA averaging vs hlora, every client at rank 8",
            [("e1-fedavg", "fedavg (r=8)"), ("e1-hlora", "hlora (r=8)")],
        ),
        "e2": (
            "E2: hlora, homogeneous vs heterogeneous ranks",
            [("e1-hlora", "hlora, all r=8"), ("e3-hlora", f"hlora, r in {shown}")],
        ),
        "e3": (
            f"E3: every strategy, ranks {shown}",
            [
                ("e3-hlora", "hlora"),
                ("e3-zeropad", "zeropad"),
                ("e3-flora", "flora"),
                ("e3-centralized", f"centralized (r={ranks[-1]})"),
                ("e3-local", "local"),
            ],
        ),
    }


def cell_ranks(root: Path) -> tuple[int, ...]:
    """The heterogeneous ranks of the E3 runs under ``root``, ascending.

    Read from the run configuration every run folder holds; the first E3 run (sorted by name)
    decides. The ranks of ``experiments/e3_mrpc.toml`` when no E3 run folder holds one.
    """
    configs = sorted(root.glob(f"e3-*/{CONFIG_FILE}")) or [Path(__file__).with_name("e3_mrpc.toml")]
    return tuple(sorted(load_config(configs[0]).federation.ranks))


def majority_class(root: Path) -> dict[str, float]:
    """The majority class's dev metrics (``summary.json``'s ``majority_class``) of the first
    finished run under ``root`` that records them; empty when none does. Every run of a cell
    evaluates on the same dev set, so any run's figure is the cell's."""
    for summary in sorted(root.glob("*/summary.json")):
        majority = json.loads(summary.read_text()).get("majority_class") or {}
        if majority:
            return {k: float(v) for k, v in majority.items()}
    return {}


def collect(root: Path) -> dict[str, dict[int, list[dict[str, Any]]]]:
    """Group -> seed -> round records, for every finished run folder under ``root``."""
    groups: dict[str, dict[int, list[dict[str, Any]]]] = defaultdict(dict)
    for folder in sorted(root.iterdir()):
        match = RUN_NAME.match(folder.name)
        if not match or not (folder / "summary.json").is_file():
            continue
        groups[match["group"]][int(match["seed"])] = load_run_records(folder)
    return groups


def _mean_std(values: Sequence[float]) -> str:
    if not values:
        return "-"
    mean = statistics.fmean(values)
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{mean:.3f} ± {std:.3f}"


def group_row(
    label: str, runs: Mapping[int, Sequence[Mapping[str, Any]]], target: float, last: int = 4
) -> dict[str, str]:
    """One table row: a strategy over its seeds.

    Besides the final evaluation, the row gives the mean of each seed's last ``last``
    evaluations (all of them when it has fewer): where the accuracy swings from one evaluation
    to the next, the final one alone is a lucky or unlucky point.
    """
    summaries = {
        s: summarize(r, ("accuracy", "f1", "loss"), targets={"accuracy": target})
        for s, r in runs.items()
    }
    acc = [x["final"]["accuracy"] for x in summaries.values() if x["final"]["accuracy"] is not None]
    f1 = [x["final"]["f1"] for x in summaries.values() if x["final"]["f1"] is not None]
    loss = [x["final"]["loss"] for x in summaries.values() if x["final"]["loss"] is not None]
    accuracies = [eval_series(records, "accuracy")[1] for records in runs.values()]
    curve = [statistics.fmean(a) for a in accuracies if a]
    tail = [statistics.fmean(a[-last:]) for a in accuracies if a]
    reached = [summaries[s]["rounds_to_target"]["accuracy"] for s in sorted(summaries)]
    train_s = [r["round_time_s"] for records in runs.values() for r in records]
    bytes_round = [
        (r.get("bytes_sent", 0) + r.get("bytes_received", 0)) for rs in runs.values() for r in rs
    ]
    return {
        "strategy": label,
        "seeds": str(len(runs)),
        "final accuracy": _mean_std(acc),
        "final F1": _mean_std(f1),
        "final dev loss": _mean_std(loss),
        f"acc over the last {last} evals": _mean_std(tail),
        "acc averaged over rounds": _mean_std(curve),
        f"round reaching acc >= {target:.2f} (per seed)": ", ".join(
            "-" if r is None else str(r) for r in reached
        ),
        "train s / round (median)": f"{statistics.median(train_s):.1f}",
        "MB / round (both ways)": f"{statistics.fmean(bytes_round) / 1e6:.2f}",
    }


def _seed_note(seeds: int, most: int) -> str:
    """A curve label's note when its group has fewer seeds than the cell's fullest group."""
    if seeds >= most:
        return ""
    return f" ({seeds} seed{'s' if seeds > 1 else ''})"


def markdown(rows: Sequence[Mapping[str, str]]) -> str:
    """A Markdown table of ``rows`` (all with the same keys)."""
    keys = list(rows[0])
    lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    lines += ["| " + " | ".join(row[k] for k in keys) + " |" for row in rows]
    return "\n".join(lines)


def seed_mean_records(runs: Mapping[int, Sequence[Mapping[str, Any]]]) -> list[dict[str, Any]]:
    """Round records whose ``eval`` metrics and ``train_loss`` are the mean over seeds."""
    by_round: dict[int, list[Mapping[str, Any]]] = defaultdict(list)
    for records in runs.values():
        for record in records:
            by_round[int(record["round"])].append(record)
    out = []
    for round_num in sorted(by_round):
        records = by_round[round_num]
        mean: dict[str, Any] = {"round": round_num}
        losses = [r["train_loss"] for r in records if r.get("train_loss") is not None]
        if losses:
            mean["train_loss"] = statistics.fmean(losses)
        evals = [r["eval"] for r in records if "eval" in r]
        if evals:
            mean["eval"] = {
                k: statistics.fmean(e[k] for e in evals)
                for k in evals[0]
                if all(isinstance(e.get(k), float) and math.isfinite(e[k]) for e in evals)
            }
        out.append(mean)
    return out


def truncation_rows(runs: Mapping[int, Sequence[Mapping[str, Any]]]) -> list[dict[str, str]]:
    """Final accuracy of each client rank's truncation of the global update, over seeds."""
    per_rank: dict[str, list[float]] = defaultdict(list)
    for records in runs.values():
        by_rank = records[-1].get("eval_by_rank", {})
        for rank, metrics in by_rank.items():
            per_rank[rank].append(metrics["accuracy"])
    return [
        {"rank": rank, "final accuracy": _mean_std(values)}
        for rank, values in sorted(per_rank.items(), key=lambda kv: int(kv[0]))
    ]


def bias_rows(rows: Sequence[Mapping[str, Any]]) -> list[dict[str, str]]:
    """One table row per round of ``aggregation_bias.py`` rows: ``error (norm ratio)`` per update.

    Args:
        rows: Its JSON ``rows``: ``{"round", "update", "error", "norm_ratio"}`` each.

    Returns:
        Rows keyed ``round`` and then each update's name, in the order they first appear.
    """
    by_round: dict[int, dict[str, str]] = {}
    for r in rows:
        cell = f"{r['error']:.2g} ({r['norm_ratio']:.3f})"
        by_round.setdefault(int(r["round"]), {"round": str(r["round"])})[str(r["update"])] = cell
    columns: dict[str, None] = {}
    for row in by_round.values():
        columns.update(dict.fromkeys(row))
    return [{c: row.get(c, "-") for c in columns} for _, row in sorted(by_round.items())]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", type=Path, nargs="?", help="folder holding the run folders")
    parser.add_argument("--plots", type=Path, default=Path("docs/results"))
    parser.add_argument("--cell", default="mrpc", help="name of the grid cell, for plot names")
    parser.add_argument("--target", type=float, default=0.70, help="target dev accuracy")
    parser.add_argument(
        "--last", type=int, default=4, help="evaluations averaged at the end of each run"
    )
    parser.add_argument("--bias", type=Path, nargs="+", help="aggregation_bias.py JSON files")
    args = parser.parse_args()
    if args.bias:
        for file in args.bias:
            print(f"### {file.stem}: error (norm ratio) against the exact update\n")
            print(markdown(bias_rows(json.loads(file.read_text())["rows"])))
            print()
        return
    if args.runs is None:
        parser.error("give a folder of runs, or --bias FILE...")
    if args.last < 1:
        parser.error(f"--last must be at least 1, got {args.last}")
    groups = collect(args.runs)
    majority = majority_class(args.runs)
    most_seeds = max((len(runs) for runs in groups.values()), default=0)
    for key, (title, members) in experiments(cell_ranks(args.runs)).items():
        present = [(g, label) for g, label in members if g in groups]
        if not present:
            continue
        print(f"### {title}\n")
        print(
            markdown([group_row(label, groups[g], args.target, args.last) for g, label in present])
        )
        print()
        curves = {
            label + _seed_note(len(groups[g]), most_seeds): seed_mean_records(groups[g])
            for g, label in present
        }
        for metric, suffix in (("accuracy", ""), ("loss", "_loss")):
            path = plot_convergence(
                curves,
                metric,
                args.plots / f"{key}_{args.cell}{suffix}.png",
                title=f"{title} ({args.cell} dev {metric}, mean of seeds)",
                reference_lines={"majority class": majority[metric]}
                if metric in majority
                else None,
            )
            print(f"![{key} {metric}](results/{path.name})\n")
    for group in ("e3-hlora", "e3-zeropad"):
        if group in groups:
            print(f"### {group}: each client rank's truncation of the final global update\n")
            print(markdown(truncation_rows(groups[group])))
            print()


if __name__ == "__main__":
    main()
