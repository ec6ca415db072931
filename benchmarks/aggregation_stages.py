"""Where hlora's exact aggregation spends its time: each stage of ``qr_svd``, timed alone.

For one case's layer shapes (batched over the layers of each shape, as ``aggregate_hlora`` does),
times the stages of the exact QR path and the alternatives for its slow parts, on one device:

- ``qr(P)``, ``qr(Q^T)``: the two thin QRs (``(L, out, R)`` and ``(L, in, R)``);
- ``core``: ``Rp @ Rq^T`` and the two products that map the core's vectors back;
- ``svd(core)`` with each cuSOLVER driver on CUDA (``gesvd``, ``gesvdj``, ``gesvda``) and on the
  CPU in fp64 (copies included);
- ``cholqr(P)``: a Cholesky QR of ``P`` in fp64 (Gram product, Cholesky, triangular solve), a
  matrix-product-bound alternative to Householder QR;
- the whole ``qr_svd`` and ``gram_svd`` per shape, for reference.

Each figure is the best of ``--repeats`` runs after one warm-up, with the device synchronized
(``aggregation.py``'s timer, on its cases' shapes).
Every stage is printed when measured, then a table of all of them.

    python benchmarks/aggregation_stages.py --case llama-7b --device cuda
"""

from __future__ import annotations

import argparse
import functools
import json
from collections.abc import Callable

import torch

from aggregation import CASES, timed
from hlora.aggregation.factored import gram_svd, qr_svd


def cholqr(left: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Cholesky QR of ``left: (..., m, R)`` in fp64: ``Q: (..., m, R)``, ``R: (..., R, R)``."""
    p64 = left.to(torch.float64)
    upper = torch.linalg.cholesky(p64.mT @ p64).mT
    q = torch.linalg.solve_triangular(upper, p64, upper=True, left=False)
    return q, upper


def stage_times(
    layers: int, out_f: int, in_f: int, rank: int, device: torch.device, repeats: int
) -> dict[str, float]:
    """Seconds per stage for one batch of ``layers`` matrices of shape ``(out_f, in_f)``."""
    gen = torch.Generator(device="cpu").manual_seed(0)
    left = (torch.randn(layers, out_f, rank, generator=gen) * 0.01).to(device)
    right = (torch.randn(layers, rank, in_f, generator=gen) / in_f**0.5).to(device)
    q_left, r_left = torch.linalg.qr(left)
    q_right, r_right = torch.linalg.qr(right.mT)
    core = r_left @ r_right.mT
    u_core, _, vh_core = torch.linalg.svd(core, full_matrices=False)
    rows: dict[str, Callable[[], object]] = {
        "qr(P)": lambda: torch.linalg.qr(left),
        "qr(Q^T)": lambda: torch.linalg.qr(right.mT),
        "core products": lambda: (r_left @ r_right.mT, q_left @ u_core, vh_core @ q_right.mT),
        "svd(core)": lambda: torch.linalg.svd(core, full_matrices=False),
        "svd(core) on CPU, fp64": lambda: torch.linalg.svd(
            core.to("cpu", torch.float64), full_matrices=False
        ),
        "cholqr(P), fp64": lambda: cholqr(left),
        "qr_svd (whole)": lambda: qr_svd(left, right),
        "gram_svd (whole)": lambda: gram_svd(left, right),
    }
    if device.type == "cuda":
        for driver in ("gesvd", "gesvdj", "gesvda"):
            rows[f"svd(core), {driver}"] = functools.partial(
                torch.linalg.svd, core, full_matrices=False, driver=driver
            )
    results = {}
    for name, fn in rows.items():
        results[name], _ = timed(fn, device, repeats)
        # Printed as it goes: a run cut short still shows the stages it reached.
        print(f"{layers} x {out_f}x{in_f}  {name:28s} {results[name]:.4f} s", flush=True)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--case", choices=sorted(CASES), default="llama-7b")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--rank", type=int, default=248, help="total rank R = sum of the r_k")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    device = torch.device(args.device)
    results = {}
    for (out_f, in_f), layers in CASES[args.case].shapes.items():
        shape = f"{layers} x {out_f}x{in_f}"
        results[shape] = stage_times(layers, out_f, in_f, args.rank, device, args.repeats)
    names = list(next(iter(results.values())))
    print(f"{'stage':28s}" + "".join(f"{s:>22s}" for s in results) + f"{'sum':>10s}")
    for name in names:
        values = [results[s][name] for s in results]
        print(f"{name:28s}" + "".join(f"{v:22.4f}" for v in values) + f"{sum(values):10.4f}")
    print(json.dumps({"case": args.case, "device": str(device), "rank": args.rank, **results}))


if __name__ == "__main__":
    main()
