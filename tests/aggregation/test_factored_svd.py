"""The factored SVD routines against a dense fp64 SVD."""

from __future__ import annotations

import pytest
import torch

from hlora.aggregation import dense_svd, factored_svd, gram_svd, qr_svd, randomized_svd
from hlora.aggregation.factored import choose_method


def _factors(batch: int, out_f: int, in_f: int, total: int, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    left = torch.randn(batch, out_f, total, generator=gen, dtype=torch.float64)
    right = torch.randn(batch, total, in_f, generator=gen, dtype=torch.float64)
    return left, right


@pytest.mark.parametrize("fn", [qr_svd, gram_svd])
def test_exact_methods_match_dense(fn) -> None:  # type: ignore[no-untyped-def]
    left, right = _factors(3, 20, 16, 7)
    u, s, vh = fn(left, right)
    dense = left @ right
    torch.testing.assert_close(u @ torch.diag_embed(s) @ vh, dense, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(s[..., :7], torch.linalg.svdvals(dense)[..., :7])
    eye = torch.eye(7, dtype=torch.float64).expand(3, 7, 7)
    torch.testing.assert_close(u[..., :7].mT @ u[..., :7], eye, atol=1e-10, rtol=0)
    torch.testing.assert_close(vh[..., :7, :] @ vh[..., :7, :].mT, eye, atol=1e-10, rtol=0)


def test_qr_handles_more_components_than_dimensions() -> None:
    left, right = _factors(2, 9, 8, 30)
    u, s, vh = qr_svd(left, right)
    assert s.shape == (2, 8)
    torch.testing.assert_close(u @ torch.diag_embed(s) @ vh, left @ right)


def test_gram_drops_numerically_zero_components() -> None:
    left, right = _factors(1, 10, 10, 4)
    left = torch.cat([left, left], dim=-1)  # duplicated columns: P has rank 4, R = 8
    right = torch.cat([right, right], dim=-2)
    u, s, vh = gram_svd(left, right)
    torch.testing.assert_close(u @ torch.diag_embed(s) @ vh, left @ right)
    assert torch.all(s[..., 4:] == 0)


def test_randomized_recovers_a_clear_spectrum_and_never_needs_the_dense_matrix() -> None:
    left, right = _factors(2, 50, 40, 60)
    left = left * 0.8 ** torch.arange(60, dtype=torch.float64)  # a decaying spectrum
    gen = torch.Generator().manual_seed(1)
    u, s, vh = randomized_svd(left, right, 5, power_iterations=3, generator=gen)
    _, s_ref, _ = dense_svd(left, right)
    dense = left @ right
    err = (dense - u @ torch.diag_embed(s) @ vh).norm(dim=(-2, -1))
    opt = s_ref[..., 5:].pow(2).sum(-1).sqrt()
    assert torch.all(err <= opt * (1 + 1e-3))


def test_auto_method_choice_and_errors() -> None:
    assert choose_method("auto", 10, 64, 64) == "qr"
    assert choose_method("auto", 33, 64, 64) == "qr"  # exact unless truncating anyway
    assert choose_method("auto", 33, 64, 64, truncating=True) == "randomized"
    assert choose_method("auto", 32, 64, 64, truncating=True) == "qr"
    assert choose_method("gram", 1000, 64, 64) == "gram"
    with pytest.raises(ValueError, match="unknown SVD method 'lanczos'; allowed: auto, qr"):
        choose_method("lanczos", 1, 2, 2)
    left, right = _factors(1, 8, 8, 6)
    with pytest.raises(ValueError, match="randomized SVD needs a target rank"):
        factored_svd(left, right, method="randomized")


@pytest.mark.parametrize("rank", [2, 5, 9])
def test_best_rank_factors_are_the_truncated_svd_of_an_unsorted_update(rank: int) -> None:
    """``LowRankDelta.best_rank``: the best rank-r part of ``scale * left @ right`` (Eckart-Young,
    against a dense fp64 SVD), whatever order its 6 components are stored in, for a client of
    another LoRA scaling, zero-padded beyond the update's rank, with balanced factor norms."""
    from hlora.aggregation import LowRankDelta

    gen = torch.Generator().manual_seed(3)
    left = torch.randn(12, 6, generator=gen, dtype=torch.float64)
    right = torch.randn(6, 10, generator=gen, dtype=torch.float64)
    delta = LowRankDelta(
        left=left[:, [4, 0, 5, 2, 1, 3]], right=right[[4, 0, 5, 2, 1, 3]], scale=0.5
    )
    factors = delta.best_rank(rank, scaling=2.0)
    assert factors.A.shape == (rank, 10) and factors.B.shape == (12, rank)
    assert factors.A.dtype == factors.B.dtype == torch.float32
    u, s, vh = torch.linalg.svd(0.5 * left @ right)
    k = min(rank, 6)
    best = u[:, :k] @ torch.diag(s[:k]) @ vh[:k]
    got = 2.0 * factors.B.double() @ factors.A.double()
    torch.testing.assert_close(got, best, rtol=1e-5, atol=1e-5)
    assert torch.count_nonzero(factors.A[k:]) == torch.count_nonzero(factors.B[:, k:]) == 0
    norms_a, norms_b = factors.A[:k].norm(dim=1), factors.B[:, :k].norm(dim=0)
    torch.testing.assert_close(norms_a, norms_b, rtol=1e-4, atol=1e-6)
