"""How the energy of a global update spreads over its singular values.

SVD redistribution has been reported to collapse a federated LoRA update onto the smallest rank
the clients share; the share of energy beyond each client rank shows whether it does.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import torch

from hlora.aggregation.factored import qr_svd
from hlora.aggregation.types import LowRankDelta


def singular_values(delta: LowRankDelta) -> torch.Tensor:
    """Singular values of ``delta.dense()`` (descending, shape ``(k,)``), never formed densely."""
    if delta.singular_values is not None and delta.scale == 1.0:
        return delta.singular_values
    _, s, _ = qr_svd((delta.scale * delta.left).double(), delta.right.double())
    return s


def energy_beyond(layers: Mapping[str, LowRankDelta], ranks: Iterable[int]) -> dict[str, float]:
    """Mean over layers of the share of ``||dW||_F^2`` beyond each rank ``r``.

    The share of one layer is ``sum_{j > r} S_j^2 / sum_j S_j^2``.

    Layers whose update is zero are left out; an empty result means no layer has energy.

    Returns:
        ``{str(r): share}`` for every ``r`` in ``ranks``, each share in ``[0, 1]``.
    """
    ranks = sorted(set(ranks))
    totals = {r: 0.0 for r in ranks}
    count = 0
    for delta in layers.values():
        energy = singular_values(delta).double() ** 2
        total = float(energy.sum())
        if total <= 0.0:
            continue
        count += 1
        for r in ranks:
            totals[r] += float(energy[r:].sum()) / total
    return {str(r): totals[r] / count for r in ranks} if count else {}
