"""Helpers shared by the strategies: ordering, grouping layers by shape, weighted sums."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Mapping, Sequence

import torch
from torch import Tensor

from hlora.aggregation.types import AggregationOptions, ClientUpdate
from hlora.aggregation.validation import (
    AggregationError,
    UpdateSpec,
    client_weights,
    validate_updates,
)


def prepare(
    updates: Sequence[ClientUpdate],
    spec: UpdateSpec | None,
    expected_ranks: Mapping[str, int] | None,
) -> tuple[list[ClientUpdate], list[float], UpdateSpec]:
    """Validate, order by client id (so results do not depend on arrival order) and weigh.

    Returns:
        The ordered updates, their weights ``n_k / sum(n)`` and the spec checked against.
    """
    checked = validate_updates(updates, spec, expected_ranks)
    ordered = sorted(updates, key=lambda u: u.client_id)
    return ordered, client_weights(ordered), checked


def shape_groups(spec: UpdateSpec) -> dict[tuple[int, int], list[str]]:
    """Layer names grouped by ``(out_features, in_features)``, in the spec's order."""
    groups: dict[tuple[int, int], list[str]] = defaultdict(list)
    for name, shape in spec.layers.items():
        groups[(int(shape[0]), int(shape[1]))].append(name)
    return dict(groups)


def stacked(
    update: ClientUpdate, names: Sequence[str], dtype: torch.dtype
) -> tuple[Tensor, Tensor]:
    """One client's factors of several same-shape layers, stacked.

    Returns:
        ``A: (L, r, in)`` and ``B: (L, out, r)`` in ``dtype``.
    """
    a = torch.stack([update.factors[n].A for n in names]).to(dtype)
    b = torch.stack([update.factors[n].B for n in names]).to(dtype)
    return a, b


def compute_dtype(updates: Sequence[ClientUpdate], options: AggregationOptions) -> torch.dtype:
    """The dtype of the math for these updates (see :class:`AggregationOptions`)."""
    first = next(iter(updates[0].factors.values()), None)
    if first is not None:
        return options.dtype_for(first.A)
    first_extra = next(iter(updates[0].extras.values()), None)
    return options.dtype_for(first_extra) if first_extra is not None else torch.float32


def average_extras(
    updates: Sequence[ClientUpdate], weights: Sequence[float], spec: UpdateSpec
) -> dict[str, Tensor]:
    """Weighted average of every extra tensor, ``sum_k w_k t_k``, in fp32 or wider."""
    result: dict[str, Tensor] = {}
    for name in spec.extras:
        first = updates[0].extras[name]
        dtype = torch.promote_types(first.dtype, torch.float32)
        total = torch.zeros(first.shape, dtype=dtype, device=first.device)
        for update, weight in zip(updates, weights, strict=True):
            total = total + weight * update.extras[name].to(dtype)
        result[name] = total
    return result


def common_scaling(updates: Sequence[ClientUpdate]) -> float | None:
    """The common LoRA scaling when every client has the same one, else None."""
    scalings = {float(u.scaling) for u in updates}
    return scalings.pop() if len(scalings) == 1 else None


def require_homogeneous(updates: Sequence[ClientUpdate], strategy: str) -> tuple[int, float]:
    """The single rank and scaling of a strategy that needs them identical.

    Raises:
        AggregationError: When ranks or scalings differ between clients.
    """
    ranks = sorted({u.rank for u in updates})
    if len(ranks) > 1:
        raise AggregationError(
            f"strategy '{strategy}' averages A and B separately and needs one rank for every "
            f"client, got ranks {ranks}; use 'hlora' or 'zeropad' for heterogeneous ranks"
        )
    scaling = common_scaling(updates)
    if scaling is None:
        found = sorted({float(u.scaling) for u in updates})
        raise AggregationError(
            f"strategy '{strategy}' needs one LoRA scaling for every client, got {found}"
        )
    return ranks[0], scaling


def pad_to(tensor: Tensor, size: int, dim: int) -> Tensor:
    """``tensor`` zero-padded along ``dim`` to length ``size`` (unchanged when not shorter)."""
    missing = size - tensor.shape[dim]
    if missing <= 0:
        return tensor
    shape = list(tensor.shape)
    shape[dim] = missing
    return torch.cat([tensor, tensor.new_zeros(shape)], dim=dim)
