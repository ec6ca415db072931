"""SVD of a sum of low-rank products without forming the dense matrix.

The global update of one layer is ``dW = P @ Q`` with the clients' factors stacked::

    P = [c_1 B_1, ..., c_K B_K]      # (out, R),  R = sum_k r_k
    Q = [c_1 A_1; ...; c_K A_K]      # (R, in)
    c_k = sqrt(w_k * s_k)            # so that P @ Q = sum_k w_k s_k B_k @ A_k

Three ways to get ``dW = U diag(S) Vh`` from ``(P, Q)``, all batched over a leading dimension of
layers with the same shape (``(L, out, R)`` and ``(L, R, in)``) and all on the inputs' device:

* ``qr`` (exact): ``P = Qp Rp``, ``Q^T = Qq Rq``, SVD of the small core ``Rp @ Rq^T``
  (``(R, R)`` when ``R <= min(out, in)``). Cost ``O((out + in) R^2)``.
* ``gram`` (exact up to the squaring of the condition number): eigendecompositions of the
  ``R x R`` Gram matrices ``P^T P`` and ``Q Q^T`` in fp64; every large operation is a matrix
  product. Components whose squared singular value falls below ``1e-13`` of the largest
  (relative to fp64) are dropped as numerically zero. The relative Frobenius error of the
  rebuilt ``dW`` is about ``eps64 * kappa^2``, ``kappa = S[0] / S[R-1]`` (the update's
  condition number over its ``R`` components): 2.5e-7 at ``kappa = 1e4``, where ``qr`` stays at
  1e-15. ``auto`` never chooses it.
* ``randomized`` (approximate, for ``R`` close to or above ``min(out, in)``): subspace iteration
  with the operator ``x -> P (Q x)``; returns only the leading ``rank`` triplets. Cost
  ``O((out + in) R (rank + oversampling) (2 q + 2))``.

``dense_svd`` is the reference the published method uses: form ``dW`` and run a full SVD.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

SvdMethod = Literal["qr", "gram", "randomized"]
SVD_METHODS: tuple[str, ...] = ("auto", "qr", "gram", "randomized")

_GRAM_RELATIVE_CUTOFF = 1e-13


def stack_factors(
    factors: list[tuple[Tensor, Tensor]], coefficients: list[float]
) -> tuple[Tensor, Tensor]:
    """Stack the clients' factors of one batch of layers into ``(P, Q)``.

    Args:
        factors: Per client ``(A_k, B_k)`` with ``A_k: (L, r_k, in)`` and ``B_k: (L, out, r_k)``.
        coefficients: Per client ``c_k``; both factors are multiplied by it.

    Returns:
        ``P: (L, out, R)`` and ``Q: (L, R, in)`` with ``R = sum_k r_k``.
    """
    left = torch.cat([c * b for (_, b), c in zip(factors, coefficients, strict=True)], dim=-1)
    right = torch.cat([c * a for (a, _), c in zip(factors, coefficients, strict=True)], dim=-2)
    return left, right


FACTOR_SPLITS = ("balanced", "orthonormal-a")


def split_singular_values(
    u: Tensor, s: Tensor, vh: Tensor, split: str = "balanced"
) -> tuple[Tensor, Tensor]:
    """Factors ``(left, right)`` of ``U diag(S) Vh``: the one place ``S`` is split between them.

    The leading ``r`` columns / rows of the two factors are the best rank-``r`` approximation
    (Eckart-Young) with either split; the split only decides where the magnitude sits, which
    matters to a client that keeps training them (``B = left``, ``A = right``):

    * ``balanced``: ``(U sqrt(S), sqrt(S) Vh)``, equal norms on both sides. A component with a
      tiny singular value has tiny ``B`` and ``A`` and barely moves under training (the
      product's change ``dB A + B dA`` is proportional to ``sqrt(s_j)``).
    * ``orthonormal-a``: ``(U diag(S), Vh)``, the rows of ``A`` orthonormal and the magnitude in
      ``B``, as LoRA initialises a fresh adapter (``A`` random at unit scale, ``B`` zero); a
      component with ``s_j = 0`` starts like a fresh LoRA component and can still learn.

    Args:
        u: ``(..., out, k)``.
        s: ``(..., k)``, non-negative (tiny negative rounding is clamped to zero).
        vh: ``(..., k, in)``.
        split: One of :data:`FACTOR_SPLITS`.

    Returns:
        ``left: (..., out, k)`` and ``right: (..., k, in)``.

    Raises:
        ValueError: An unknown split.
    """
    if split == "balanced":
        root = s.clamp_min(0).sqrt()  # (..., k)
        return u * root.unsqueeze(-2), root.unsqueeze(-1) * vh
    if split == "orthonormal-a":
        return u * s.clamp_min(0).unsqueeze(-2), vh
    raise ValueError(f"unknown factor split {split!r} (allowed: {FACTOR_SPLITS})")


def qr_svd(left: Tensor, right: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Exact SVD of ``left @ right`` through two QR factorisations.

    Args:
        left: ``P``, shape ``(..., out, R)``.
        right: ``Q``, shape ``(..., R, in)``.

    Returns:
        ``U: (..., out, k)``, ``S: (..., k)`` descending, ``Vh: (..., k, in)`` with
        ``k = min(out, in, R)``.
    """
    q_left, r_left = torch.linalg.qr(left)  # (.., out, m1), (.., m1, R)
    q_right, r_right = torch.linalg.qr(right.mT)  # (.., in, m2), (.., m2, R)
    core = r_left @ r_right.mT  # (.., m1, m2)
    u_core, s, vh_core = torch.linalg.svd(core, full_matrices=False)
    u = q_left @ u_core  # (.., out, k)
    vh = vh_core @ q_right.mT  # (.., k, in)
    return u, s, vh


def gram_svd(left: Tensor, right: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """SVD of ``left @ right`` from the two ``R x R`` Gram matrices, computed in fp64.

    With ``P^T P = Ep diag(lam) Ep^T``, ``P = Up diag(sqrt(lam)) Ep^T``; the core
    ``Z = diag(sqrt(lam)) Ep^T Q`` has ``Z Z^T = Ez diag(sigma^2) Ez^T`` and then
    ``U = P Ep diag(lam^-1/2) Ez`` and ``Vh = diag(1/sigma) Ez^T Z``. Components below the
    fp64 cutoff are zeroed (the shapes stay fixed so that the call stays batched).

    Args:
        left: ``P``, shape ``(..., out, R)``.
        right: ``Q``, shape ``(..., R, in)``.

    Returns:
        ``U: (..., out, R)``, ``S: (..., R)`` descending, ``Vh: (..., R, in)`` in the inputs'
        dtype (trailing numerically-zero components have zero ``S`` and zero vectors).
    """
    dtype = left.dtype
    p64 = left.to(torch.float64)
    q64 = right.to(torch.float64)
    lam, e_p = torch.linalg.eigh(p64.mT @ p64)  # (.., R), (.., R, R) ascending
    lam_max = lam[..., -1:].clamp_min(torch.finfo(torch.float64).tiny)
    keep_p = lam > _GRAM_RELATIVE_CUTOFF * lam_max
    sqrt_lam = torch.where(keep_p, lam.clamp_min(0).sqrt(), torch.zeros_like(lam))
    inv_sqrt_lam = torch.where(keep_p, 1.0 / sqrt_lam.clamp_min(1e-300), torch.zeros_like(lam))
    gram_q = q64 @ q64.mT  # (.., R, R)
    t = e_p * sqrt_lam.unsqueeze(-2)  # Ep diag(sqrt lam): (.., R, R)
    core = t.mT @ gram_q @ t  # Z Z^T: (.., R, R)
    mu, e_z = torch.linalg.eigh(core)
    mu = mu.flip(-1)  # descending
    e_z = e_z.flip(-1)
    mu_max = mu[..., :1].clamp_min(torch.finfo(torch.float64).tiny)
    keep_z = mu > _GRAM_RELATIVE_CUTOFF * mu_max
    sigma = torch.where(keep_z, mu.clamp_min(0).sqrt(), torch.zeros_like(mu))
    inv_sigma = torch.where(keep_z, 1.0 / sigma.clamp_min(1e-300), torch.zeros_like(mu))
    coef_u = (e_p * inv_sqrt_lam.unsqueeze(-2)) @ e_z  # (.., R, R)
    coef_v = (e_z * inv_sigma.unsqueeze(-2)).mT @ t.mT  # (.., R, R)
    u = p64 @ coef_u  # (.., out, R)
    vh = coef_v @ q64  # (.., R, in)
    return u.to(dtype), sigma.to(dtype), vh.to(dtype)


def randomized_svd(
    left: Tensor,
    right: Tensor,
    rank: int,
    *,
    oversampling: int | None = None,
    power_iterations: int = 4,
    generator: torch.Generator | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """Leading ``rank`` singular triplets of ``left @ right`` by randomized subspace iteration.

    ``dW`` is only ever applied as ``x -> left @ (right @ x)`` (and its transpose), so it is
    never formed. The basis is re-orthonormalised by QR after every application.

    Args:
        left: ``P``, shape ``(..., out, R)``.
        right: ``Q``, shape ``(..., R, in)``.
        rank: Number of triplets wanted.
        oversampling: Extra basis vectors beyond ``rank`` (``None``: ``rank`` more).
        power_iterations: Number of ``(dW dW^T)`` applications; more = closer to optimal.
        generator: Source of the Gaussian test matrix (on the inputs' device).

    Returns:
        ``U: (..., out, k)``, ``S: (..., k)``, ``Vh: (..., k, in)`` with
        ``k = min(rank, out, in)``.
    """
    out_f, in_f = left.shape[-2], right.shape[-1]
    k = min(rank, out_f, in_f)
    extra = k if oversampling is None else oversampling
    width = min(k + extra, out_f, in_f)
    batch = left.shape[:-2]
    omega = torch.randn(
        (*batch, in_f, width), dtype=left.dtype, device=left.device, generator=generator
    )
    basis, _ = torch.linalg.qr(left @ (right @ omega))  # (.., out, width)
    for _ in range(power_iterations):
        z, _ = torch.linalg.qr(right.mT @ (left.mT @ basis))  # (.., in, width)
        basis, _ = torch.linalg.qr(left @ (right @ z))  # (.., out, width)
    small = (basis.mT @ left) @ right  # (.., width, in)
    u_small, s, vh = torch.linalg.svd(small, full_matrices=False)
    u = basis @ u_small  # (.., out, width)
    return u[..., :k], s[..., :k], vh[..., :k, :]


def dense_svd(left: Tensor, right: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Reference: form ``dW = left @ right`` and take its full thin SVD.

    Returns:
        ``U: (..., out, m)``, ``S: (..., m)``, ``Vh: (..., m, in)``, ``m = min(out, in)``.
    """
    return torch.linalg.svd(left @ right, full_matrices=False)


def choose_method(
    method: str, total_rank: int, out_f: int, in_f: int, *, truncating: bool = False
) -> SvdMethod:
    """Resolve ``"auto"``.

    ``auto`` is exact (``qr``) unless the caller truncates anyway (``truncating``: a global rank
    is set) and ``R > min(out, in) / 2``; then ``randomized``, which never forms the dense
    matrix and costs ``O((out + in) R k)`` instead of ``O(out in min(out, in))``.

    Raises:
        ValueError: On an unknown method name.
    """
    if method not in SVD_METHODS:
        raise ValueError(f"unknown SVD method '{method}'; allowed: {', '.join(SVD_METHODS)}")
    if method != "auto":
        return method  # type: ignore[return-value]
    if truncating and 2 * total_rank > min(out_f, in_f):
        return "randomized"
    return "qr"


def factored_svd(
    left: Tensor,
    right: Tensor,
    *,
    method: str = "auto",
    rank: int | None = None,
    oversampling: int | None = None,
    power_iterations: int = 4,
    generator: torch.Generator | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """SVD of ``left @ right``, truncated to ``rank`` components when given.

    Args:
        left: ``P``, shape ``(..., out, R)``.
        right: ``Q``, shape ``(..., R, in)``.
        method: ``auto``, ``qr``, ``gram`` or ``randomized`` (see the module docstring).
        rank: Keep at most this many components; required for ``randomized``.
        oversampling: ``randomized`` only.
        power_iterations: ``randomized`` only.
        generator: ``randomized`` only.

    Returns:
        ``U: (..., out, k)``, ``S: (..., k)`` descending, ``Vh: (..., k, in)``.

    Raises:
        ValueError: Unknown method, or ``randomized`` without a rank.
    """
    out_f, total, in_f = left.shape[-2], left.shape[-1], right.shape[-1]
    resolved = choose_method(method, total, out_f, in_f, truncating=rank is not None)
    if resolved == "randomized":
        if rank is None:
            raise ValueError("the randomized SVD needs a target rank")
        return randomized_svd(
            left,
            right,
            rank,
            oversampling=oversampling,
            power_iterations=power_iterations,
            generator=generator,
        )
    u, s, vh = qr_svd(left, right) if resolved == "qr" else gram_svd(left, right)
    if rank is not None and rank < s.shape[-1]:
        u, s, vh = u[..., :rank], s[..., :rank], vh[..., :rank, :]
    return u, s, vh
