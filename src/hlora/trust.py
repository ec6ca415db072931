"""What the server checks before a client's update may change the global model.

The server trusts nothing a client says about itself. Every reply is screened here, whatever
the engine (in-process or Flower), before it reaches the aggregation:

* its example count must equal the count the server accepted when the client joined (a reply
  that claims another count is dropped: a client that misreports its data is not trusted with
  its update either); the aggregation weight is that accepted count, capped by
  ``max_client_examples`` when set;
* its LoRA scaling must be the run's (``model.lora_scaling``): the server reads every update
  with its own scaling, never with one a reply brings;
* its tensors are checked (names, shapes, rank, finiteness; :func:`validate_update`) and then
  held in the server's precision (:data:`SERVER_DTYPE`), never in one a reply chooses; a value
  that overflows it drops the update;
* with ``norm_bound > 0``, the update's Frobenius norm (:func:`update_norm`, from the ``r x r``
  Gram products of its factors) must stay within the bound: ``reject`` drops a larger update,
  ``clip`` scales it down onto the bound.

After aggregation, :func:`nonfinite_state` checks the new global state before it replaces the
old one.

Everything here is pure: tensors in, tensors out, inputs never mutated.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field, replace

import torch
from torch import Tensor

from hlora.aggregation import (
    ClientUpdate,
    GlobalUpdate,
    InvalidUpdateError,
    LoraFactors,
    LowRankDelta,
    UpdateSpec,
    validate_update,
)
from hlora.config import NORM_POLICIES

SERVER_DTYPE = torch.float32
"""The precision the server holds client factors and heads in (that of its own adapters)."""


@dataclass(frozen=True)
class TrustPolicy:
    """The server's checks on client updates (see the module docstring).

    Attributes:
        max_client_examples: Cap on the example count a client's weight is computed from
            (0: no cap).
        norm_bound: Bound on each update's Frobenius norm :func:`update_norm` (0: no bound).
        norm_policy: ``reject`` (drop a larger update) or ``clip`` (scale it onto the bound).
    """

    max_client_examples: int = field(
        default=0, metadata={"help": "cap on a client's weight in examples (0: no cap)"}
    )
    norm_bound: float = field(
        default=0.0, metadata={"help": "bound on ||s B A||_F over the update (0: no bound)"}
    )
    norm_policy: str = field(
        default="reject", metadata={"help": f"one of {', '.join(NORM_POLICIES)}"}
    )

    def __post_init__(self) -> None:
        n = self.max_client_examples
        if isinstance(n, bool) or not isinstance(n, int) or n < 0:
            raise ValueError(f"max_client_examples must be an integer >= 0, got {n!r}")
        b = self.norm_bound
        if isinstance(b, bool) or not isinstance(b, int | float) or not math.isfinite(b) or b < 0:
            raise ValueError(f"norm_bound must be a finite number >= 0, got {b!r}")
        if self.norm_policy not in NORM_POLICIES:
            raise ValueError(
                f"norm_policy must be one of {', '.join(NORM_POLICIES)}, got {self.norm_policy!r}"
            )


def product_norm_sq(left: Tensor, right: Tensor) -> float:
    """``||left @ right||_F^2`` in fp64 from the ``k x k`` Gram products (no dense matrix).

    ``||L R||_F^2 = trace((L^T L)(R R^T))``; both Gram matrices are symmetric, so the trace is
    the sum of their elementwise product.

    Args:
        left: Shape ``(out, k)`` (a LoRA ``B``).
        right: Shape ``(k, in)`` (a LoRA ``A``).

    Returns:
        The squared norm (``inf`` when it overflows fp64, ``nan`` for non-finite input).
    """
    lhs = left.detach().to(torch.float64)  # (out, k)
    rhs = right.detach().to(torch.float64)  # (k, in)
    gram_left = lhs.T @ lhs  # (k, k)
    gram_right = rhs @ rhs.T  # (k, k)
    value = float((gram_left * gram_right).sum())  # trace(gram_left @ gram_right)
    return max(value, 0.0) if not math.isnan(value) else value


def update_norm(factors: Mapping[str, LoraFactors], scaling: float) -> float:
    """The Frobenius norm of a whole LoRA update, ``sqrt(sum_l ||s B_l A_l||_F^2)``, in fp64.

    Each layer's term comes from its ``r x r`` Gram products (:func:`product_norm_sq`), never
    from the dense ``(out, in)`` matrix: ``||B A||_F^2 = trace((B^T B)(A A^T))``.

    Args:
        factors: Layer name -> factors with ``A: (r, in)`` and ``B: (out, r)``.
        scaling: The LoRA scaling ``s``.

    Returns:
        The norm (``inf`` if a term overflows fp64, ``nan`` for non-finite factors).
    """
    total = sum(product_norm_sq(f.B, f.A) for f in factors.values())  # B (out, r), A (r, in)
    return abs(float(scaling)) * math.sqrt(total)


def scale_update(update: ClientUpdate, factor: float) -> ClientUpdate:
    """``update`` with every layer's ``s B A`` multiplied by ``factor`` (> 0).

    Both factors take ``sqrt(factor)``, so neither grows relative to the other; the head
    (``extras``) is left as it is.
    """
    root = math.sqrt(factor)
    factors = {name: LoraFactors(A=f.A * root, B=f.B * root) for name, f in update.factors.items()}
    return replace(update, factors=factors)


def _to_server_dtype(update: ClientUpdate) -> ClientUpdate:
    factors = {
        name: LoraFactors(A=f.A.to(SERVER_DTYPE), B=f.B.to(SERVER_DTYPE))
        for name, f in update.factors.items()
    }
    extras = {name: t.to(SERVER_DTYPE) for name, t in update.extras.items()}
    for name, f in factors.items():
        if not (bool(torch.isfinite(f.A).all()) and bool(torch.isfinite(f.B).all())):
            raise InvalidUpdateError(
                update.client_id, f"layer '{name}' overflows the server's {SERVER_DTYPE}"
            )
    for name, t in extras.items():
        if not bool(torch.isfinite(t).all()):
            raise InvalidUpdateError(
                update.client_id, f"extra tensor '{name}' overflows the server's {SERVER_DTYPE}"
            )
    return replace(update, factors=factors, extras=extras)


@dataclass(frozen=True)
class Screened:
    """An update the server accepted, as it will be aggregated.

    Attributes:
        update: The update: the accepted example count (capped), the run's scaling, tensors in
            :data:`SERVER_DTYPE`, clipped when the policy clips.
        norm: Its norm before any clipping (None when no bound is set).
        clipped: Whether it was scaled down onto the bound.
    """

    update: ClientUpdate
    norm: float | None = None
    clipped: bool = False


def screen_update(
    update: ClientUpdate,
    *,
    accepted_examples: int,
    scaling: float,
    rank: int,
    spec: UpdateSpec,
    policy: TrustPolicy,
) -> Screened:
    """Check one reply against what the server knows, and make it the update to aggregate.

    Args:
        update: The client's reply, as decoded.
        accepted_examples: The example count the server accepted when the client joined.
        scaling: The run's LoRA scaling.
        rank: The rank the server assigned to the client.
        spec: Expected layers ``(out, in)`` and head shapes.
        policy: The bounds.

    Returns:
        The screened update (see :class:`Screened`).

    Raises:
        InvalidUpdateError: Naming the client and the reason it is dropped.
    """
    cid = update.client_id
    if update.num_examples != accepted_examples:
        raise InvalidUpdateError(
            cid,
            f"reply claims {update.num_examples!r} training examples; the client joined with "
            f"{accepted_examples}",
        )
    if not isinstance(update.scaling, int | float) or float(update.scaling) != float(scaling):
        raise InvalidUpdateError(
            cid, f"reply's LoRA scaling {update.scaling!r} is not the run's {scaling!r}"
        )
    validate_update(update, spec, rank)
    checked = _to_server_dtype(update)
    weight = accepted_examples
    if policy.max_client_examples:
        weight = min(weight, policy.max_client_examples)
    checked = replace(checked, num_examples=weight, scaling=float(scaling))
    if not policy.norm_bound:
        return Screened(checked)
    norm = update_norm(checked.factors, scaling)
    if norm <= policy.norm_bound:
        return Screened(checked, norm)
    if policy.norm_policy == "reject" or not math.isfinite(norm):
        raise InvalidUpdateError(
            cid, f"update norm {norm:.6g} exceeds trust.update_norm_bound = {policy.norm_bound:g}"
        )
    return Screened(scale_update(checked, policy.norm_bound / norm), norm, clipped=True)


def _nonfinite(what: str, tensors: Mapping[str, Tensor | None]) -> str | None:
    for name, t in tensors.items():
        if t is not None and not bool(torch.isfinite(t).all()):
            return f"{what} '{name}' has non-finite values"
    return None


_FLOAT32_MAX = float(torch.finfo(torch.float32).max)


def _nonfinite_deltas(what: str, layers: Mapping[str, LowRankDelta] | None) -> str | None:
    for name, d in (layers or {}).items():
        if not math.isfinite(d.scale):
            return f"{what} '{name}' has a non-finite scale"
        problem = _nonfinite(
            what, {f"{name}.left": d.left, f"{name}.right": d.right, f"{name}.S": d.singular_values}
        )
        if problem:
            return problem
        # Finite factors can still multiply out past fp32: bound the dense norm (fp64, Gram).
        norm = abs(d.scale) * math.sqrt(product_norm_sq(d.left, d.right))
        if not norm <= _FLOAT32_MAX:
            return f"{what} '{name}' has norm {norm:.3g}, beyond float32"
    return None


def nonfinite_state(
    global_update: GlobalUpdate | None,
    extras: Mapping[str, Tensor],
    base_delta: Mapping[str, LowRankDelta] | None = None,
    optimizer: Mapping[str, Tensor] | None = None,
) -> str | None:
    """Why a candidate global state must not replace the current one, or None when it may.

    Checks every tensor of the state for NaN and infinities, and that each layer's update
    ``scale * left @ right`` stays within float32 (its norm from the Gram products: no dense
    ``(out, in)`` matrix is formed).

    Args:
        global_update: The new global update (None: none yet).
        extras: The new global head.
        base_delta: The new cumulative merged update (``flora``).
        optimizer: The server optimizer's new state.

    Returns:
        The first problem found, in words, or None.
    """
    layers = None if global_update is None else global_update.layers
    return (
        _nonfinite_deltas("global update layer", layers)
        or _nonfinite("global head tensor", dict(extras))
        or _nonfinite_deltas("merged base layer", base_delta)
        or _nonfinite("server optimizer state", dict(optimizer or {}))
    )
