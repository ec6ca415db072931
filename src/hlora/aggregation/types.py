"""Value types of the aggregation math: client updates in, global updates out.

All tensors follow peft's LoRA layout. For one adapted linear layer ``W`` of shape
``(out_features, in_features)``, a client of rank ``r`` holds::

    A: (r, in_features)     B: (out_features, r)     update = scaling * B @ A   # (out, in)

These types hold tensors only: no ``nn.Module``, peft, Flower or file I/O.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch
from torch import Tensor

from hlora.aggregation.factored import FACTOR_SPLITS, qr_svd, split_singular_values


@dataclass(frozen=True)
class LoraFactors:
    """The LoRA factors of one adapted layer.

    Attributes:
        A: Down-projection, shape ``(r, in_features)``.
        B: Up-projection, shape ``(out_features, r)``.
    """

    A: Tensor
    B: Tensor

    @property
    def rank(self) -> int:
        """The rank ``r`` (rows of ``A``)."""
        return int(self.A.shape[0])

    def delta(self, scaling: float) -> Tensor:
        """The dense update ``scaling * B @ A``, shape ``(out_features, in_features)``."""
        return scaling * (self.B @ self.A)

    def low_rank(self, scaling: float) -> LowRankDelta:
        """The same update in factored form: ``LowRankDelta(B, A, scaling)``, whose
        :meth:`~LowRankDelta.dense` equals :meth:`delta` bit for bit."""
        return LowRankDelta(left=self.B, right=self.A, scale=scaling)


@dataclass(frozen=True)
class ClientUpdate:
    """What one client sends back after local training.

    Attributes:
        client_id: Stable identifier of the client (used in error messages and for ordering).
        num_examples: Number of local training examples ``n_k``; the client's weight is
            ``n_k / sum(n)``.
        rank: The LoRA rank ``r_k`` the client trained at.
        scaling: The client's LoRA scaling ``s_k`` (``alpha / r``, or ``alpha / sqrt(r)`` with
            rsLoRA); its effective update of a layer is ``s_k * B_k @ A_k``.
        factors: Adapted layer name -> :class:`LoraFactors` of rank ``r_k``.
        extras: Other trainable tensors (e.g. the classifier head), name -> tensor; they are
            averaged with the same weights.
    """

    client_id: str
    num_examples: int
    rank: int
    scaling: float
    factors: Mapping[str, LoraFactors]
    extras: Mapping[str, Tensor] = field(default_factory=dict)


@dataclass(frozen=True)
class LowRankDelta:
    """A global update of one layer in factored form: ``dW = scale * left @ right``.

    The columns of ``left`` (rows of ``right``) are ordered by importance: a client of rank ``r``
    takes the leading ``r`` of them. For the ``hlora`` strategy ``left = U * sqrt(S)`` and
    ``right = sqrt(S)[:, None] * Vh`` from the SVD ``dW = U diag(S) Vh``, so the leading ``r``
    columns give the best rank-``r`` approximation (Eckart-Young); with
    ``AggregationOptions.factor_split = "orthonormal-a"`` the magnitude sits in ``left = U S``
    and ``right = Vh``.

    Attributes:
        left: Shape ``(out_features, k)``.
        right: Shape ``(k, in_features)``.
        scale: Scalar folded out of the factors (1.0 unless a strategy keeps a common LoRA
            scaling separate so that clients get their factors back bit for bit).
        singular_values: ``S``, shape ``(k,)``, descending, when the factors come from an SVD.
    """

    left: Tensor
    right: Tensor
    scale: float = 1.0
    singular_values: Tensor | None = None

    @property
    def rank(self) -> int:
        """Number of stored components ``k``."""
        return int(self.left.shape[-1])

    def dense(self) -> Tensor:
        """The dense update ``scale * left @ right``, shape ``(out_features, in_features)``."""
        return self.scale * (self.left @ self.right)

    def leading(self, rank: int, scaling: float) -> LoraFactors:
        """LoRA factors of rank ``rank`` for a client whose LoRA scaling is ``scaling``.

        Returns ``(A', B')`` with ``scaling * B' @ A' == scale * left[:, :rank] @ right[:rank]``.
        The factor ``sqrt(scale / scaling)`` is applied to both sides (skipped when it is 1, so
        that a client with the global scaling gets the stored factors bit for bit). When fewer
        than ``rank`` components are stored, the missing ones are zero.

        Args:
            rank: The client's rank ``r >= 1``.
            scaling: The client's LoRA scaling ``s > 0``.

        Returns:
            ``LoraFactors`` with ``A: (rank, in_features)`` and ``B: (out_features, rank)``.
        """
        k = min(rank, self.rank)
        left = self.left[:, :k]  # (out, k)
        right = self.right[:k]  # (k, in)
        factor = math.sqrt(self.scale / scaling)
        if factor != 1.0:
            left = left * factor
            right = right * factor
        if k < rank:
            left = torch.cat([left, left.new_zeros(left.shape[0], rank - k)], dim=1)
            right = torch.cat([right, right.new_zeros(rank - k, right.shape[1])], dim=0)
        return LoraFactors(A=right.clone(), B=left.clone())

    def rolled(self, offset: int) -> LowRankDelta:
        """The same update with its components rolled so that component ``offset % k`` leads:
        ``left[:, j]`` of the result is ``left[:, (offset + j) % k]`` (likewise ``right``), so
        the leading ``r`` of them are the components ``offset .. offset + r - 1`` modulo ``k``.
        :meth:`dense` is unchanged; the result's order is no longer by importance, so it keeps
        no ``singular_values``."""
        shift = offset % self.rank if self.rank else 0
        if shift == 0:
            return self
        order = torch.roll(torch.arange(self.rank), -shift)
        return LowRankDelta(left=self.left[:, order], right=self.right[order], scale=self.scale)

    def best_rank(self, rank: int, scaling: float) -> LoraFactors:
        """The best rank-``rank`` LoRA factors of the whole update, whatever order the stored
        components are in (a ``fedavg`` or ``flora`` update is not sorted by importance).

        The update's SVD (through QR, never dense), ``S`` split as ``balanced``
        (:func:`~hlora.aggregation.factored.split_singular_values`), then :meth:`leading`.

        Returns:
            ``LoraFactors`` in fp32 with ``A: (rank, in_features)``, ``B: (out_features, rank)``
            and ``scaling * B @ A`` the best rank-``rank`` approximation of :meth:`dense`.
        """
        u, s, vh = qr_svd((self.left * self.scale).unsqueeze(0), self.right.unsqueeze(0))
        left, right = split_singular_values(u[0], s[0], vh[0])  # (out, k), (k, in)
        factors = LowRankDelta(left.float(), right.float()).leading(rank, scaling)
        return LoraFactors(A=factors.A.contiguous(), B=factors.B.contiguous())


@dataclass(frozen=True)
class GlobalUpdate:
    """The server's aggregate of one round.

    Attributes:
        strategy: Name of the strategy that produced it.
        layers: Adapted layer name -> :class:`LowRankDelta`.
        extras: Other trainable tensors, weighted averages of the clients'.
        merge_into_base: If True (``flora``), ``layers`` is this round's increment: every client
            adds ``dense()`` of each layer into its frozen base weight and starts the next round
            from a fresh LoRA initialisation. If False, ``layers`` is the whole update relative
            to the frozen base and each client continues from :meth:`client_factors`.
    """

    strategy: str
    layers: Mapping[str, LowRankDelta]
    extras: Mapping[str, Tensor]
    merge_into_base: bool = False

    def client_factors(self, rank: int, scaling: float) -> dict[str, LoraFactors]:
        """The starting factors of a client of rank ``rank`` and LoRA scaling ``scaling``.

        Raises:
            ValueError: For a merging strategy (its clients start from a fresh initialisation).
        """
        if self.merge_into_base:
            raise ValueError(
                f"strategy '{self.strategy}' merges its update into the base weights; "
                "clients start from a fresh LoRA initialisation, not from global factors"
            )
        return {name: delta.leading(rank, scaling) for name, delta in self.layers.items()}

    def rolled(self, offset: int) -> GlobalUpdate:
        """Every layer :meth:`LowRankDelta.rolled` by ``offset`` (the extras as they are)."""
        layers = {name: delta.rolled(offset) for name, delta in self.layers.items()}
        return GlobalUpdate(self.strategy, layers, self.extras, self.merge_into_base)

    def dense_layers(self) -> dict[str, Tensor]:
        """Every layer's dense update, name -> ``(out_features, in_features)``."""
        return {name: delta.dense() for name, delta in self.layers.items()}


@dataclass(frozen=True)
class AggregationOptions:
    """Settings of the server-side math.

    Attributes:
        global_rank: Keep at most this many components of the global update (``None``: keep
            every exact component; the randomized method then keeps the largest client rank).
        svd_method: ``auto`` (exact ``qr``; ``randomized`` when ``global_rank`` is set and
            ``sum(r_k) > min(out, in) / 2``), ``qr``, ``gram`` or ``randomized``.
        oversampling: Extra basis vectors of the randomized method (``None``: as many as the
            target rank, i.e. a basis twice the rank).
        power_iterations: Power iterations of the randomized method. With the defaults its
            truncation error stays within 1e-3 of the optimum even on flat spectra (see
            docs/PERFORMANCE.md).
        seed: Seed of the randomized method's test matrices.
        compute_dtype: dtype of the math; ``None`` keeps fp32/fp64 inputs as they are and
            promotes half-precision inputs to fp32.
        factor_split: How an SVD's ``S`` is split between the factors clients start from
            (:func:`hlora.aggregation.factored.split_singular_values`): ``balanced`` or
            ``orthonormal-a``. The product, and so every exactness property, is the same.
    """

    global_rank: int | None = None
    svd_method: str = "auto"
    oversampling: int | None = None
    power_iterations: int = 4
    seed: int = 0
    compute_dtype: torch.dtype | None = None
    factor_split: str = "balanced"

    def __post_init__(self) -> None:
        if self.factor_split not in FACTOR_SPLITS:
            raise ValueError(
                f"factor_split must be one of {FACTOR_SPLITS}, got {self.factor_split!r}"
            )
        if self.global_rank is not None and self.global_rank < 1:
            raise ValueError(f"global_rank must be >= 1 or None, got {self.global_rank}")
        if self.oversampling is not None and self.oversampling < 0:
            raise ValueError(f"oversampling must be >= 0, got {self.oversampling}")
        if self.power_iterations < 0:
            raise ValueError(f"power_iterations must be >= 0, got {self.power_iterations}")

    def dtype_for(self, tensor: Tensor) -> torch.dtype:
        """The dtype the math runs in for inputs like ``tensor``."""
        if self.compute_dtype is not None:
            return self.compute_dtype
        if tensor.dtype in (torch.float16, torch.bfloat16):
            return torch.float32
        return tensor.dtype
