"""The HLoRA strategy: rebuild the exact weighted update, re-decompose it by SVD.

For every adapted layer the global update is::

    dW = sum_k w_k * s_k * B_k @ A_k          # (out, in), w_k = n_k / sum(n)

It is never formed as a dense matrix: the clients' factors are stacked into ``P (out, R)`` and
``Q (R, in)`` (``R = sum_k r_k``, see :mod:`hlora.aggregation.factored`) and ``dW = P @ Q`` is
decomposed as ``U diag(S) Vh``. The result is stored as ``left = U sqrt(S)`` and
``right = sqrt(S) Vh`` (``S`` split evenly between the two sides; or ``left = U S``,
``right = Vh`` with ``factor_split = "orthonormal-a"``), so a client of rank ``r`` and
scaling ``s`` starts the next round from ``B' = left[:, :r] / sqrt(s)``,
``A' = right[:r] / sqrt(s)``: ``s B' A'`` is the best rank-``r`` approximation of ``dW``
(Eckart-Young). Same-shape layers are decomposed in one batched call.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch

from hlora.aggregation._common import average_extras, compute_dtype, prepare, shape_groups, stacked
from hlora.aggregation.factored import (
    choose_method,
    factored_svd,
    split_singular_values,
    stack_factors,
)
from hlora.aggregation.types import AggregationOptions, ClientUpdate, GlobalUpdate, LowRankDelta
from hlora.aggregation.validation import UpdateSpec


def aggregate_hlora(
    updates: Sequence[ClientUpdate],
    options: AggregationOptions | None = None,
    spec: UpdateSpec | None = None,
    expected_ranks: Mapping[str, int] | None = None,
) -> GlobalUpdate:
    """Aggregate heterogeneous-rank LoRA updates exactly (see the module docstring).

    Args:
        updates: One update per client; ranks and scalings may differ.
        options: SVD method, global rank and dtype; defaults to exact and untruncated.
        spec: Expected layers/extras (inferred from the first update when None).
        expected_ranks: Client id -> assigned rank, checked when given.

    Returns:
        A :class:`GlobalUpdate` whose layers hold ``k`` components each, with
        ``k = min(R, out, in)`` by default, ``min(k, global_rank)`` when a global rank is set,
        or ``global_rank`` (the largest client rank if unset) with the randomized method.

    Raises:
        AggregationError: No updates or duplicate client ids.
        InvalidUpdateError: A client's update fails validation.
    """
    opts = options or AggregationOptions()
    ordered, weights, checked = prepare(updates, spec, expected_ranks)
    dtype = compute_dtype(ordered, opts)
    coefficients = [math.sqrt(w * float(u.scaling)) for u, w in zip(ordered, weights, strict=True)]
    total_rank = sum(u.rank for u in ordered)
    max_rank = max(u.rank for u in ordered)
    layers: dict[str, LowRankDelta] = {}
    for (out_f, in_f), names in shape_groups(checked).items():
        rank = opts.global_rank
        method = choose_method(
            opts.svd_method, total_rank, out_f, in_f, truncating=rank is not None
        )
        if method == "randomized" and rank is None:
            rank = max_rank
        per_client = [stacked(u, names, dtype) for u in ordered]
        left, right = stack_factors(per_client, coefficients)  # (L, out, R), (L, R, in)
        generator = None
        if method == "randomized":
            generator = torch.Generator(device=left.device).manual_seed(opts.seed)
        u, s, vh = factored_svd(
            left,
            right,
            method=method,
            rank=rank,
            oversampling=opts.oversampling,
            power_iterations=opts.power_iterations,
            generator=generator,
        )
        # (L, out, k), (L, k, in)
        left_out, right_out = split_singular_values(u, s, vh, opts.factor_split)
        for i, name in enumerate(names):
            layers[name] = LowRankDelta(
                left=left_out[i], right=right_out[i], scale=1.0, singular_values=s[i]
            )
    return GlobalUpdate(
        strategy="hlora", layers=layers, extras=average_extras(ordered, weights, checked)
    )
