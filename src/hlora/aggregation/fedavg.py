"""Naive LoRA averaging (the ``fedavg`` baseline): average ``A`` and ``B`` separately.

``B_bar = sum_k w_k B_k``, ``A_bar = sum_k w_k A_k`` and the global update is
``s * B_bar @ A_bar``. This is what most federated LoRA code does; it is biased, because
``mean(B) @ mean(A) != mean(B @ A)`` (the cross terms ``B_j A_k``, ``j != k``, do not vanish),
and it needs every client at the same rank and scaling. Kept as the baseline the paper
compares against.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from hlora.aggregation._common import (
    average_extras,
    compute_dtype,
    prepare,
    require_homogeneous,
    shape_groups,
    stacked,
)
from hlora.aggregation.types import AggregationOptions, ClientUpdate, GlobalUpdate, LowRankDelta
from hlora.aggregation.validation import UpdateSpec


def aggregate_fedavg(
    updates: Sequence[ClientUpdate],
    options: AggregationOptions | None = None,
    spec: UpdateSpec | None = None,
    expected_ranks: Mapping[str, int] | None = None,
) -> GlobalUpdate:
    """Weighted average of the factors, each side separately.

    Returns:
        A :class:`GlobalUpdate` with ``left = B_bar (out, r)``, ``right = A_bar (r, in)`` and
        ``scale = s``: a client with scaling ``s`` gets ``(A_bar, B_bar)`` back unchanged.

    Raises:
        AggregationError: No updates, duplicate ids, or ranks/scalings that differ.
        InvalidUpdateError: A client's update fails validation.
    """
    opts = options or AggregationOptions()
    ordered, weights, checked = prepare(updates, spec, expected_ranks)
    _, scaling = require_homogeneous(ordered, "fedavg")
    dtype = compute_dtype(ordered, opts)
    layers: dict[str, LowRankDelta] = {}
    for _, names in shape_groups(checked).items():
        pairs = [stacked(update, names, dtype) for update in ordered]  # (L, r, in), (L, out, r)
        a_sum = torch.zeros_like(pairs[0][0])
        b_sum = torch.zeros_like(pairs[0][1])
        for (a, b), weight in zip(pairs, weights, strict=True):
            a_sum = a_sum + weight * a
            b_sum = b_sum + weight * b
        for i, name in enumerate(names):
            layers[name] = LowRankDelta(left=b_sum[i], right=a_sum[i], scale=scaling)
    return GlobalUpdate(
        strategy="fedavg", layers=layers, extras=average_extras(ordered, weights, checked)
    )
