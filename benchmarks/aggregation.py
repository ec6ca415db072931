"""Aggregation benchmark: hlora's factored SVD against the published dense method.

The published method (the HLoRA paper's authors, FlexLoRA) forms every layer's dense update
``dW = sum_k w_k s_k B_k A_k`` and runs a full SVD of it; hlora never forms ``dW`` (see
``hlora.aggregation.factored``). Both run on the same inputs in one process.

Prints a table, then as its last line one JSON object with at least ``speedup_vs_dense``
(dense time / hlora time, default case) and ``max_rel_error`` (hlora's global update against
a dense fp64 reference, worst layer).

Examples:
    python benchmarks/aggregation.py                         # RoBERTa-large, 10 clients, CPU
    python benchmarks/aggregation.py --clients 10 100        # also 100 clients (randomized)
    python benchmarks/aggregation.py --case llama-7b --device cuda
    python benchmarks/aggregation.py --case llama-7b --dense-sample 2   # extrapolate dense
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from floors import matmul_rate, sync
from hlora.aggregation import AggregationOptions, ClientUpdate, LoraFactors, aggregate_hlora

RANK_SET = (4, 8, 16, 32, 64)


@dataclass(frozen=True)
class Case:
    """A model's adapted layers: shape -> number of matrices of that shape."""

    name: str
    shapes: dict[tuple[int, int], int]


CASES = {
    # 24 layers x {query, value}, hidden 1024.
    "roberta-large": Case("roberta-large", {(1024, 1024): 48}),
    # 32 layers x {q, k, v, o} 4096x4096, {gate, up} 11008x4096 (out x in), down 4096x11008.
    "llama-7b": Case("llama-7b", {(4096, 4096): 128, (11008, 4096): 64, (4096, 11008): 32}),
}


def make_updates(
    case: Case, num_clients: int, device: torch.device, dtype: torch.dtype, seed: int
) -> list[ClientUpdate]:
    """Clients with ranks cycled over {4, 8, 16, 32, 64}, LoRA scaling 2 (alpha = 2r)."""
    gen = torch.Generator(device=device).manual_seed(seed)
    updates = []
    for k in range(num_clients):
        rank = RANK_SET[k % len(RANK_SET)]
        factors = {}
        for (out_f, in_f), count in case.shapes.items():
            for i in range(count):
                a = torch.randn(rank, in_f, generator=gen, device=device, dtype=dtype)
                b = torch.randn(out_f, rank, generator=gen, device=device, dtype=dtype)
                factors[f"{out_f}x{in_f}.{i}"] = LoraFactors(A=a / math.sqrt(in_f), B=b * 0.01)
        updates.append(ClientUpdate(f"client{k:03d}", 100 + 37 * k, rank, 2.0, factors))
    return updates


def timed(fn: Callable[[], object], device: torch.device, repeats: int) -> tuple[float, object]:
    """Best wall time of ``repeats`` runs after one warm-up run, and the last result."""
    result = fn()
    sync(device)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn()
        sync(device)
        times.append(time.perf_counter() - start)
    return min(times), result


def dense_method(
    updates: list[ClientUpdate], names: list[str], max_rank: int
) -> dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """The published method: dense weighted sum, then a full SVD of each layer, truncated.

    Same-shape layers are batched, as a fair baseline should be.
    """
    total = sum(u.num_examples for u in updates)
    groups: dict[tuple[int, ...], list[str]] = {}
    for name in names:
        f = updates[0].factors[name]
        groups.setdefault((f.B.shape[0], f.A.shape[1]), []).append(name)
    out = {}
    for group in groups.values():
        dense = None
        for u in updates:
            a = torch.stack([u.factors[n].A for n in group])
            b = torch.stack([u.factors[n].B for n in group])
            term = (u.num_examples / total * u.scaling) * (b @ a)  # (L, out, in)
            dense = term if dense is None else dense + term
        assert dense is not None
        uu, s, vh = torch.linalg.svd(dense, full_matrices=False)
        for i, n in enumerate(group):
            out[n] = (uu[i, :, :max_rank], s[i, :max_rank], vh[i, :max_rank])
    return out


def reference(updates: list[ClientUpdate], name: str) -> torch.Tensor:
    """Dense fp64 ``sum_k w_k s_k B_k A_k`` of one layer."""
    total = sum(u.num_examples for u in updates)
    acc = None
    for u in updates:
        f = u.factors[name]
        term = (u.num_examples / total * u.scaling) * (f.B.double() @ f.A.double())
        acc = term if acc is None else acc + term
    assert acc is not None
    return acc


def exact_flops(out_f: int, in_f: int, total_rank: int) -> float:
    """FLOPs of the exact factored path for one layer (Householder QR with explicit Q of each
    stacked side ``4 m R^2 - 4/3 R^3``, core product ``2 R^3``, core SVD with vectors ``21 R^3``,
    outputs ``2 (m + n) R^2``)."""
    r = total_rank
    return 6.0 * (out_f + in_f) * r * r - 8.0 / 3.0 * r**3 + 23.0 * r**3


def dense_flops(out_f: int, in_f: int, total_rank: int) -> float:
    """FLOPs of the dense method for one layer: form ``dW`` (``2 m n R``), then a thin SVD with
    vectors (``4 m^2 n + 8 m n^2 + 9 n^3``, ``m >= n``)."""
    m, n = max(out_f, in_f), min(out_f, in_f)
    return 2.0 * out_f * in_f * total_rank + 4.0 * m * m * n + 8.0 * m * n * n + 9.0 * n**3


def run_case(args: argparse.Namespace, case: Case, num_clients: int) -> dict[str, object]:
    """Time both methods on one case and measure hlora's error; returns one table row."""
    device = torch.device(args.device)
    dtype = torch.float32
    updates = make_updates(case, num_clients, device, dtype, args.seed)
    names = list(updates[0].factors)
    total_rank = sum(u.rank for u in updates)
    max_rank = max(u.rank for u in updates)
    min_dim = min(min(s) for s in case.shapes)
    many = 2 * total_rank > min_dim
    options = (
        AggregationOptions(
            svd_method="randomized",
            global_rank=max_rank,
            power_iterations=args.power_iterations,
            oversampling=args.oversampling,
        )
        if many
        else AggregationOptions(svd_method=args.method)
    )
    ours_time, result = timed(lambda: aggregate_hlora(updates, options), device, args.repeats)

    # Dense baseline, per shape, on every matrix or on a sample (then scaled by the count).
    dense_time = 0.0
    extrapolated = False
    for (out_f, in_f), count in case.shapes.items():
        take = count if not args.dense_sample else min(count, args.dense_sample)
        extrapolated |= take < count
        sample = [f"{out_f}x{in_f}.{i}" for i in range(take)]
        seconds, _ = timed(
            lambda s=sample: dense_method(updates, s, max_rank), device, args.repeats
        )
        dense_time += seconds * count / take

    # Accuracy against the fp64 reference.
    check = names if args.check_layers is None else names[: args.check_layers]
    max_rel, max_trunc_gap = 0.0, 0.0
    for name in check:
        ref = reference(updates, name)
        ours = result.layers[name].dense().double()
        if many:
            s_ref = torch.linalg.svdvals(ref)
            optimal = float(s_ref[max_rank:].pow(2).sum().sqrt())
            gap = float((ref - ours).norm()) / optimal - 1.0
            max_trunc_gap = max(max_trunc_gap, gap)
        else:
            max_rel = max(max_rel, float((ours - ref).norm() / ref.norm()))
    # Floors: each method's FLOP count at the measured matrix rate.
    biggest = max(case.shapes, key=lambda s: s[0] * s[1])
    rate = matmul_rate(device, biggest[0], total_rank, biggest[1])
    dense_floor = sum(c * dense_flops(o, i, total_rank) for (o, i), c in case.shapes.items()) / rate
    ours_floor = (
        None
        if many
        else sum(c * exact_flops(o, i, total_rank) for (o, i), c in case.shapes.items()) / rate
    )
    return {
        "case": case.name,
        "clients": num_clients,
        "matrices": len(names),
        "total_rank": total_rank,
        "method": "randomized" if many else args.method,
        "ours_s": ours_time,
        "dense_s": dense_time,
        "dense_extrapolated": extrapolated,
        "speedup_vs_dense": dense_time / ours_time,
        "max_rel_error": max_rel if not many else None,
        "trunc_error_gap": max_trunc_gap if many else None,
        "checked_layers": len(check),
        "matmul_gflops": rate / 1e9,
        "ours_floor_s": ours_floor,
        "dense_floor_s": dense_floor,
    }


def main() -> None:
    """Parse arguments, run the selected cases, print the table and the JSON line."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--case", choices=sorted(CASES), default="roberta-large")
    parser.add_argument("--clients", type=int, nargs="+", default=[10])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--method", default="auto", choices=["auto", "qr", "gram"])
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--power-iterations", type=int, default=4)
    parser.add_argument("--oversampling", type=int, default=None)
    parser.add_argument(
        "--dense-sample",
        type=int,
        default=None,
        help="time dense on this many matrices per shape, scale by the count (default: all)",
    )
    parser.add_argument(
        "--check-layers",
        type=int,
        default=None,
        help="check accuracy on the first N layers only (default: all)",
    )
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    rows = [run_case(args, CASES[args.case], k) for k in args.clients]
    header = (
        f"{'case':14} {'clients':>7} {'R':>5} {'method':>10} {'ours s':>8} {'dense s':>9} "
        f"{'speedup':>8} {'rel err':>9} {'trunc gap':>9}"
    )
    print(header)
    for r in rows:
        dense = f"{r['dense_s']:.3f}" + ("*" if r["dense_extrapolated"] else "")
        rel = "-" if r["max_rel_error"] is None else f"{r['max_rel_error']:.1e}"
        gap = "-" if r["trunc_error_gap"] is None else f"{r['trunc_error_gap']:.1e}"
        print(
            f"{r['case']:14} {r['clients']:>7} {r['total_rank']:>5} {r['method']:>10} "
            f"{r['ours_s']:>8.3f} {dense:>9} {r['speedup_vs_dense']:>7.1f}x {rel:>9} {gap:>9}"
        )
    for r in rows:
        ours_floor = r["ours_floor_s"]
        ours = "-" if ours_floor is None else f"{ours_floor:.3f} s ({ours_floor / r['ours_s']:.0%})"
        print(
            f"floors at {r['matmul_gflops']:.1f} GFLOP/s (K={r['clients']}): hlora {ours}, "
            f"dense {r['dense_floor_s']:.3f} s ({r['dense_floor_s'] / r['dense_s']:.0%}) "
            "(floor / measured in brackets)"
        )
    if any(r["dense_extrapolated"] for r in rows):
        print("* dense time extrapolated from a sample of matrices per shape")
    first = rows[0]
    summary = {
        "benchmark": "aggregation",
        "case": first["case"],
        "clients": first["clients"],
        "device": args.device if args.device != "cuda" else torch.cuda.get_device_name(),
        "threads": torch.get_num_threads(),
        "machine": platform.processor() or platform.machine(),
        "speedup_vs_dense": round(float(first["speedup_vs_dense"]), 3),
        "max_rel_error": first["max_rel_error"],
        "rows": rows,
        "median_speedup": statistics.median(float(r["speedup_vs_dense"]) for r in rows),
    }
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
