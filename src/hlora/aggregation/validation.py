"""Checks on client updates before anything is combined.

Every failed check raises :class:`InvalidUpdateError` naming the client and the reason, so a
caller can drop that client from the round and go on with the others.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from hlora.aggregation.types import ClientUpdate
from hlora.errors import HloraError


class AggregationError(HloraError):
    """The round as a whole cannot be aggregated (e.g. no clients)."""


class InvalidUpdateError(HloraError):
    """One client's update fails validation.

    Attributes:
        client_id: The offending client.
        reason: What is wrong, in words.
    """

    def __init__(self, client_id: str, reason: str) -> None:
        super().__init__(f"client '{client_id}': {reason}")
        self.client_id = client_id
        self.reason = reason


@dataclass(frozen=True)
class UpdateSpec:
    """What the server expects from every client.

    Attributes:
        layers: Adapted layer name -> ``(out_features, in_features)``.
        extras: Other trainable tensor name -> shape.
    """

    layers: Mapping[str, tuple[int, int]]
    extras: Mapping[str, tuple[int, ...]]

    @staticmethod
    def from_update(update: ClientUpdate) -> UpdateSpec:
        """The spec implied by one (trusted) update."""
        return UpdateSpec(
            layers={n: (int(f.B.shape[0]), int(f.A.shape[1])) for n, f in update.factors.items()},
            extras={n: tuple(int(d) for d in t.shape) for n, t in update.extras.items()},
        )


def _names_diff(kind: str, got: Sequence[str], expected: Sequence[str]) -> str | None:
    missing = sorted(set(expected) - set(got))
    extra = sorted(set(got) - set(expected))
    if not missing and not extra:
        return None
    parts = []
    if missing:
        parts.append(f"missing {kind} {_short(missing)}")
    if extra:
        parts.append(f"unexpected {kind} {_short(extra)}")
    return "; ".join(parts)


def _short(names: Sequence[str], limit: int = 3) -> str:
    shown = ", ".join(repr(n) for n in names[:limit])
    more = f" and {len(names) - limit} more" if len(names) > limit else ""
    return f"[{shown}{more}]"


def _check_tensor(client: str, what: str, tensor: object, shape: tuple[int, ...]) -> None:
    if not isinstance(tensor, Tensor):
        raise InvalidUpdateError(client, f"{what} is a {type(tensor).__name__}, not a tensor")
    if not tensor.is_floating_point():
        raise InvalidUpdateError(
            client, f"{what} has dtype {tensor.dtype}, expected floating point"
        )
    if tuple(tensor.shape) != shape:
        raise InvalidUpdateError(
            client, f"{what} has shape {tuple(tensor.shape)}, expected {shape}"
        )
    if not bool(torch.isfinite(tensor).all()):
        raise InvalidUpdateError(client, f"{what} contains non-finite values (NaN or inf)")


def validate_update(
    update: ClientUpdate, spec: UpdateSpec, expected_rank: int | None = None
) -> None:
    """Check one client's update against the server's expectations.

    Args:
        update: The client's update.
        spec: Expected layers and extras with their shapes.
        expected_rank: The rank the server assigned to this client, if any.

    Raises:
        InvalidUpdateError: Naming the client and the first problem found.
    """
    cid = update.client_id
    if isinstance(update.num_examples, bool) or not isinstance(update.num_examples, int):
        raise InvalidUpdateError(
            cid, f"num_examples must be an integer, got {update.num_examples!r}"
        )
    if update.num_examples <= 0:
        raise InvalidUpdateError(cid, f"num_examples must be positive, got {update.num_examples}")
    if not isinstance(update.rank, int) or update.rank < 1:
        raise InvalidUpdateError(cid, f"rank must be a positive integer, got {update.rank!r}")
    if expected_rank is not None and update.rank != expected_rank:
        raise InvalidUpdateError(
            cid, f"rank {update.rank} differs from the assigned rank {expected_rank}"
        )
    scaling = float(update.scaling)
    if not math.isfinite(scaling) or scaling <= 0:
        raise InvalidUpdateError(
            cid, f"scaling must be finite and positive, got {update.scaling!r}"
        )
    problem = _names_diff("layers", list(update.factors), list(spec.layers))
    if problem:
        raise InvalidUpdateError(cid, problem)
    problem = _names_diff("extra tensors", list(update.extras), list(spec.extras))
    if problem:
        raise InvalidUpdateError(cid, problem)
    r = update.rank
    for name, (out_f, in_f) in spec.layers.items():
        factors = update.factors[name]
        if r > min(out_f, in_f):
            raise InvalidUpdateError(
                cid, f"rank {r} exceeds min(out, in) = {min(out_f, in_f)} of layer '{name}'"
            )
        _check_tensor(cid, f"layer '{name}' A", factors.A, (r, in_f))
        _check_tensor(cid, f"layer '{name}' B", factors.B, (out_f, r))
    for name, shape in spec.extras.items():
        _check_tensor(cid, f"extra tensor '{name}'", update.extras[name], tuple(shape))


def validate_updates(
    updates: Sequence[ClientUpdate],
    spec: UpdateSpec | None = None,
    expected_ranks: Mapping[str, int] | None = None,
) -> UpdateSpec:
    """Check a whole round's updates.

    Args:
        updates: The updates to combine.
        spec: Expected layers and shapes; inferred from the first update when None (the other
            updates must then agree with it).
        expected_ranks: Client id -> assigned rank, for the clients that have one.

    Returns:
        The spec the updates were checked against.

    Raises:
        AggregationError: No updates, or two updates with the same client id.
        InvalidUpdateError: The first client whose update is invalid.
    """
    if not updates:
        raise AggregationError("no client updates to aggregate")
    ids = [u.client_id for u in updates]
    duplicates = sorted({c for c in ids if ids.count(c) > 1})
    if duplicates:
        raise AggregationError(f"duplicate client ids in one round: {_short(duplicates)}")
    if spec is None:
        spec = UpdateSpec.from_update(updates[0])
    for update in updates:
        expected = None if expected_ranks is None else expected_ranks.get(update.client_id)
        validate_update(update, spec, expected)
    return spec


def client_weights(updates: Sequence[ClientUpdate]) -> list[float]:
    """Weights ``w_k = n_k / sum(n)`` in the order of ``updates``."""
    total = sum(u.num_examples for u in updates)
    return [u.num_examples / total for u in updates]
