"""FLoRA-style stacking (the ``flora`` baseline).

The exact weighted update of the round is kept as one adapter of rank ``R = sum_k r_k``::

    left  = [w_1 s_1 B_1, ..., w_K s_K B_K]      # (out, R)
    right = [A_1; ...; A_K]                      # (R, in)
    left @ right = sum_k w_k s_k B_k @ A_k       # exact, no SVD

It cannot be handed back at a client's own rank, so the client side differs from the other
strategies (``GlobalUpdate.merge_into_base`` is True). At the start of the next round every
client must:

1. add ``left @ right`` (``GlobalUpdate.dense_layers()``) into the frozen base weight of each
   adapted layer, ``W <- W + dW``;
2. load the averaged extras (the classifier head);
3. start a fresh LoRA adapter at its own rank (``A`` random, ``B = 0``), so that its next update
   is an increment on top of the merged weights.

The global model after round ``t`` is therefore ``W_0 + sum_{rounds <= t} dW``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from hlora.aggregation._common import average_extras, compute_dtype, prepare, shape_groups, stacked
from hlora.aggregation.types import AggregationOptions, ClientUpdate, GlobalUpdate, LowRankDelta
from hlora.aggregation.validation import UpdateSpec


def aggregate_flora(
    updates: Sequence[ClientUpdate],
    options: AggregationOptions | None = None,
    spec: UpdateSpec | None = None,
    expected_ranks: Mapping[str, int] | None = None,
) -> GlobalUpdate:
    """Stack the weighted factors into one exact adapter of rank ``R = sum_k r_k``.

    Returns:
        A merging :class:`GlobalUpdate` (``merge_into_base=True``), layers of rank ``R``.

    Raises:
        AggregationError: No updates or duplicate client ids.
        InvalidUpdateError: A client's update fails validation.
    """
    opts = options or AggregationOptions()
    ordered, weights, checked = prepare(updates, spec, expected_ranks)
    dtype = compute_dtype(ordered, opts)
    layers: dict[str, LowRankDelta] = {}
    for _, names in shape_groups(checked).items():
        pairs = [stacked(update, names, dtype) for update in ordered]
        left = torch.cat(
            [
                (w * float(u.scaling)) * b
                for (_, b), w, u in zip(pairs, weights, ordered, strict=True)
            ],
            dim=-1,
        )  # (L, out, R)
        right = torch.cat([a for a, _ in pairs], dim=-2)  # (L, R, in)
        for i, name in enumerate(names):
            layers[name] = LowRankDelta(left=left[i], right=right[i], scale=1.0)
    return GlobalUpdate(
        strategy="flora",
        layers=layers,
        extras=average_extras(ordered, weights, checked),
        merge_into_base=True,
    )
