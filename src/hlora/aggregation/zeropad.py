"""HetLoRA-style zero-padding (the ``zeropad`` baseline).

Every client's factors are zero-padded to the largest rank ``r_max`` and averaged side by side:
``L = sum_k w_k pad(c_k B_k)`` (out, r_max) and ``Rt = sum_k w_k pad(c_k A_k)`` (r_max, in). A
client of rank ``r`` takes the leading ``r`` columns of ``L`` and rows of ``Rt``.

Scaling: when every client has the same LoRA scaling ``s`` the factors are averaged as they are
(``c_k = 1``, global update ``s * L @ Rt``), which makes ``zeropad`` identical to ``fedavg`` for
homogeneous ranks. Otherwise each side is multiplied by ``c_k = sqrt(s_k)`` before averaging and
the global update is ``L @ Rt``; a client divides by ``sqrt(s)`` again when it takes its slice.
Like ``fedavg`` it is biased: the product of averages is not the average of products.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

from hlora.aggregation._common import (
    average_extras,
    common_scaling,
    compute_dtype,
    pad_to,
    prepare,
    shape_groups,
    stacked,
)
from hlora.aggregation.types import AggregationOptions, ClientUpdate, GlobalUpdate, LowRankDelta
from hlora.aggregation.validation import UpdateSpec


def aggregate_zeropad(
    updates: Sequence[ClientUpdate],
    options: AggregationOptions | None = None,
    spec: UpdateSpec | None = None,
    expected_ranks: Mapping[str, int] | None = None,
) -> GlobalUpdate:
    """Zero-pad to the largest rank and average each side (see the module docstring).

    Returns:
        A :class:`GlobalUpdate` with ``left: (out, r_max)``, ``right: (r_max, in)``.

    Raises:
        AggregationError: No updates or duplicate client ids.
        InvalidUpdateError: A client's update fails validation.
    """
    opts = options or AggregationOptions()
    ordered, weights, checked = prepare(updates, spec, expected_ranks)
    dtype = compute_dtype(ordered, opts)
    r_max = max(u.rank for u in ordered)
    shared = common_scaling(ordered)
    coefficients = (
        [1.0] * len(ordered) if shared is not None else [math.sqrt(u.scaling) for u in ordered]
    )
    scale = shared if shared is not None else 1.0
    layers: dict[str, LowRankDelta] = {}
    for _, names in shape_groups(checked).items():
        pairs = [stacked(update, names, dtype) for update in ordered]  # (L, r_k, in), (L, out, r_k)
        first_a, first_b = pairs[0]
        a_sum = first_a.new_zeros(first_a.shape[0], r_max, first_a.shape[2])  # (L, r_max, in)
        b_sum = first_b.new_zeros(first_b.shape[0], first_b.shape[1], r_max)  # (L, out, r_max)
        for (a, b), weight, coef in zip(pairs, weights, coefficients, strict=True):
            a_sum = a_sum + (weight * coef) * pad_to(a, r_max, dim=1)
            b_sum = b_sum + (weight * coef) * pad_to(b, r_max, dim=2)
        for i, name in enumerate(names):
            layers[name] = LowRankDelta(left=b_sum[i], right=a_sum[i], scale=scale)
    return GlobalUpdate(
        strategy="zeropad", layers=layers, extras=average_extras(ordered, weights, checked)
    )
