"""The ``hlora`` command: run, resume, compare and export federated fine-tuning runs."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from hlora.config import ALL_MODES, RunConfig, load_config, load_run_config, replace
from hlora.errors import HloraError

logger = logging.getLogger("hlora")


def _config(args: argparse.Namespace) -> RunConfig:
    overrides = list(args.set or [])
    if getattr(args, "data_dir", None):
        overrides.append(f'data.data_dir="{args.data_dir}"')
    if getattr(args, "output", None):
        overrides.append(f'output.dir="{args.output}"')
    return load_config(args.config, tuple(overrides))


def cmd_run(args: argparse.Namespace) -> int:
    """``hlora run``: a whole federation in one process or in Flower's simulation (``--engine``),
    new or going on from a run folder's last finished round (``--resume RUN_DIR``)."""
    from hlora.federation import resume, run

    progress = False if args.no_progress else None
    flower_sim = getattr(args, "engine", "inprocess") == "flower-sim"
    node_cpus, node_gpus = getattr(args, "node_cpus", None), getattr(args, "node_gpus", None)
    if not flower_sim and (node_cpus is not None or node_gpus is not None):
        raise HloraError(
            "--node-cpus and --node-gpus size Flower's virtual nodes: add --engine flower-sim"
        )
    if args.resume:
        if args.config or args.set:
            raise HloraError("--resume takes the run folder's own config.toml: drop CONFIG/--set")
        run_dir = Path(args.resume)
        if flower_sim:  # the simulation goes on from the folder's checkpoint (check_runnable)
            config = load_run_config(run_dir)
            result = _run_flower_sim(config, progress, node_cpus, node_gpus, run_dir)
        else:
            result = resume(run_dir, progress=progress)
    elif flower_sim:
        result = _run_flower_sim(_config(args), progress, node_cpus, node_gpus)
    else:
        result = run(_config(args), progress=progress)
    _print_result(result.summary, result.run_dir)
    return 0


def _run_flower_sim(
    config: RunConfig,
    progress: bool | None,
    node_cpus: float | None,
    node_gpus: float | None,
    run_dir: Path | None = None,
) -> Any:
    """``hlora run --engine flower-sim``: the federation in Flower's simulation runtime, in a new
    run folder or, with ``run_dir``, going on from that folder's checkpoint."""
    from hlora.engines.flower.simulation import run_flower_simulation
    from hlora.federation import new_run_dir

    show = config.output.progress if progress is None else progress
    return run_flower_simulation(
        config,
        run_dir or new_run_dir(config),
        progress=show,
        node_cpus=node_cpus,
        node_gpus=node_gpus,
    )


def _print_result(summary: dict[str, Any], run_dir: Path) -> None:
    final: dict[str, Any] = summary.get("final") or {}
    metrics = "  ".join(f"{k} {v:.4f}" for k, v in final.items() if isinstance(v, float))
    print(f"final dev metrics (global model): {metrics}")
    for rank, values in (summary.get("final_by_rank") or {}).items():
        shown = "  ".join(f"{k} {v:.4f}" for k, v in values.items() if k != "loss")
        print(f"  rank-{rank} clients' truncation: {shown}")
    before = (summary.get("head_calibration") or {}).get("eval_uncalibrated") or {}
    if before:
        shown = "  ".join(f"{k} {v:.4f}" for k, v in before.items() if k != "loss")
        print(f"  before the head's calibration: {shown}")
    majority = summary.get("majority_class") or {}
    if majority:
        shown = "  ".join(f"{k} {v:.4f}" for k, v in majority.items())
        print(f"  majority class: {shown}")
    if summary.get("comparable_to_glue") is False:
        print("note: qqp-sample numbers are not comparable with GLUE QQP dev")
    print(f"outputs: {run_dir}  (metrics.jsonl, summary.json, convergence.png, adapters/)")


def cmd_compare(args: argparse.Namespace) -> int:
    """``hlora compare``: the same federation under several strategies, one plot, one table."""
    from hlora.federation import run
    from hlora.report import format_table, load_run_records, plot_convergence, write_json

    base = _config(args)
    strategies = [s.strip() for s in args.strategies.split(",") if s.strip()]
    unknown = [s for s in strategies if s not in ALL_MODES]
    if unknown or not strategies:
        raise HloraError(
            f"invalid --strategies {args.strategies!r}: allowed {', '.join(ALL_MODES)}"
        )
    name = base.output.name or "compare"
    folder = Path(base.output.dir) / name
    rows = []
    runs = {}
    for strategy in strategies:
        config = replace(
            base, federation={"strategy": strategy}, output={"name": f"{name}/{strategy}"}
        )
        result = run(config, progress=None if not args.no_progress else False)
        runs[strategy] = load_run_records(result.run_dir)
        row = {
            "strategy": strategy,
            **{k: v for k, v in (result.summary.get("final") or {}).items()},
        }
        row["best_accuracy"] = (result.summary.get("best") or {}).get("accuracy")
        for rank, values in (result.summary.get("final_by_rank") or {}).items():
            row[f"acc_r{rank}"] = values.get("accuracy")
        majority = result.summary.get("majority_class") or {}
        row["MB_per_round"] = (result.summary.get("mean_bytes_per_round") or 0) / 1e6
        row["wall_s"] = result.summary.get("wall_time_s")
        rows.append(row)
    metric = "f1" if "f1" in rows[0] else "accuracy"
    lines = {"majority class": majority[metric]} if metric in majority else {}
    central = [r for r in rows if r["strategy"] == "centralized" and r.get(metric) is not None]
    if central:
        lines["centralized (final)"] = central[0][metric]
    plot = plot_convergence(
        runs, metric, folder / "comparison.png", title=f"{base.data.task}", reference_lines=lines
    )
    ranks = sorted({c for r in rows for c in r if c.startswith("acc_r")}, key=lambda c: int(c[5:]))
    columns = ["strategy", "accuracy", "f1", *ranks, "best_accuracy", "MB_per_round", "wall_s"]
    columns = [c for c in columns if any(c in r for r in rows)]
    table = format_table(rows, columns)
    (folder / "comparison.txt").write_text(table + "\n", encoding="utf-8")
    write_json(folder / "comparison.json", rows)
    print(table)
    print(f"plot: {plot}")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    """``hlora export``: a peft adapter at a rank, or the merged full model."""
    from hlora.export import export_run

    path = export_run(Path(args.run_dir), rank=args.rank, out=args.out, merged=args.merged)
    print(f"wrote {path}")
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    """``hlora generate``: answers of a causal-LM run's model to prompts."""
    from hlora.generation import generate_from_run

    answers = generate_from_run(
        Path(args.run_dir), args.prompt, rank=args.rank, max_new_tokens=args.max_new_tokens
    )
    for prompt, answer in zip(args.prompt, answers, strict=True):
        print(f">>> {prompt}\n{answer}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``hlora`` command."""
    parser = argparse.ArgumentParser(prog="hlora", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help="log at INFO level")
    sub = parser.add_subparsers(dest="command", required=True)

    def common(p: argparse.ArgumentParser) -> None:
        p.add_argument("config", nargs="?", help="TOML configuration (default: built-in)")
        p.add_argument(
            "--set",
            action="append",
            metavar="SECTION.KEY=VALUE",
            help="override one configuration value (repeatable)",
        )
        p.add_argument("--data-dir", help="GLUE folder (else $HLORA_DATA_DIR, then the hub)")
        p.add_argument("--output", help="parent folder of run folders (output.dir)")
        p.add_argument("--no-progress", action="store_true", help="no progress bars")

    p_run = sub.add_parser("run", help="run a federation (in process or in Flower's simulation)")
    common(p_run)
    p_run.add_argument(
        "--resume",
        metavar="RUN_DIR",
        help="continue an interrupted run (in the simulation with --engine flower-sim)",
    )
    p_run.add_argument(
        "--engine",
        choices=("inprocess", "flower-sim"),
        default="inprocess",
        help="inprocess: every client in this process; flower-sim: Flower's simulation (Ray)",
    )
    p_run.add_argument(
        "--node-cpus",
        type=float,
        help="flower-sim: CPUs per virtual node (default 1: one node per CPU at a time)",
    )
    p_run.add_argument(
        "--node-gpus",
        type=float,
        help="flower-sim: GPU share per virtual node, 0-1 (default: 1 if training on CUDA, else 0)",
    )
    p_run.set_defaults(func=cmd_run)

    p_cmp = sub.add_parser("compare", help="run several strategies on the same partitions")
    common(p_cmp)
    p_cmp.add_argument(
        "--strategies",
        default="hlora,zeropad,flora,centralized,local",
        help=f"comma-separated, from {', '.join(ALL_MODES)}",
    )
    p_cmp.set_defaults(func=cmd_compare)

    p_exp = sub.add_parser("export", help="export a finished run's adapter or merged model")
    p_exp.add_argument("run_dir")
    p_exp.add_argument("--rank", type=int, required=True, help="LoRA rank of the adapter")
    p_exp.add_argument("--out", help="adapter folder (default: RUN_DIR/export/rR)")
    p_exp.add_argument("--merged", metavar="OUT", help="save the merged full model here instead")
    p_exp.set_defaults(func=cmd_export)

    p_gen = sub.add_parser("generate", help="answer prompts with a causal-LM run's model")
    p_gen.add_argument("run_dir")
    p_gen.add_argument("--prompt", action="append", required=True, help="a user turn (repeatable)")
    p_gen.add_argument(
        "--rank",
        type=int,
        default=0,
        help="a client rank's adapter (best rank-R of the update); 0: the whole update",
    )
    p_gen.add_argument("--max-new-tokens", type=int, default=64, help="most tokens per answer")
    p_gen.set_defaults(func=cmd_generate)
    return parser


def _quiet_transformers(verbose: bool) -> None:
    """Keep transformers' load reports and weight-loading bars off the terminal."""
    import transformers

    if not verbose:
        transformers.logging.set_verbosity_error()
        transformers.logging.disable_progress_bar()


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point: one clear error line and a non-zero exit for bad input."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    args = build_parser().parse_args(argv)
    _quiet_transformers(args.verbose)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s",
    )
    try:
        code: int = args.func(args)
        return code
    except HloraError as err:
        print(f"hlora: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
