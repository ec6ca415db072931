"""Random client updates and an independent dense fp64 reference for aggregation tests."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from hlora.aggregation import ClientUpdate, LoraFactors

SHAPES = {"enc.0.query": (12, 10), "enc.0.value": (12, 10), "enc.1.query": (12, 10), "out": (7, 9)}


def make_update(
    client_id: str,
    rank: int,
    *,
    num_examples: int = 10,
    scaling: float = 2.0,
    shapes: dict[str, tuple[int, int]] | None = None,
    dtype: torch.dtype = torch.float64,
    seed: int = 0,
    extras: bool = True,
) -> ClientUpdate:
    """A client update with Gaussian factors (B non-zero, as after training)."""
    gen = torch.Generator().manual_seed(seed)
    factors = {
        name: LoraFactors(
            A=torch.randn(rank, n_in, generator=gen, dtype=dtype),
            B=torch.randn(n_out, rank, generator=gen, dtype=dtype),
        )
        for name, (n_out, n_in) in (shapes or SHAPES).items()
    }
    head = {"classifier.weight": torch.randn(2, 4, generator=gen, dtype=dtype)} if extras else {}
    return ClientUpdate(client_id, num_examples, rank, scaling, factors, head)


def make_round(
    ranks: Sequence[int],
    *,
    sizes: Sequence[int] | None = None,
    scalings: Sequence[float] | None = None,
    shapes: dict[str, tuple[int, int]] | None = None,
    dtype: torch.dtype = torch.float64,
    seed: int = 0,
) -> list[ClientUpdate]:
    """One update per rank, with distinct seeds, sizes and scalings."""
    return [
        make_update(
            f"c{i}",
            r,
            num_examples=(sizes[i] if sizes else 5 + 7 * i),
            scaling=(scalings[i] if scalings else 16.0 / r),
            shapes=shapes,
            dtype=dtype,
            seed=seed * 1000 + i,
        )
        for i, r in enumerate(ranks)
    ]


def reference_delta(updates: Sequence[ClientUpdate], layer: str) -> Tensor:
    """Dense fp64 ``sum_k w_k s_k B_k @ A_k``, computed independently of hlora."""
    total = sum(u.num_examples for u in updates)
    result = None
    for u in updates:
        f = u.factors[layer]
        term = (u.num_examples / total) * u.scaling * (f.B.double() @ f.A.double())
        result = term if result is None else result + term
    assert result is not None
    return result


def optimal_error(dense: Tensor, rank: int) -> float:
    """Eckart-Young: Frobenius error of the best rank-``rank`` approximation."""
    s = torch.linalg.svdvals(dense.double())
    return float(s[rank:].pow(2).sum().sqrt())


def rel(a: Tensor, b: Tensor) -> float:
    """Relative Frobenius error of ``a`` against ``b``."""
    return float((a.double() - b.double()).norm() / b.double().norm())
