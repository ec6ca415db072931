"""The hlora strategy against an independent dense fp64 reference."""

from __future__ import annotations

import itertools

import pytest
import torch
from agg_helpers import SHAPES, make_round, make_update, optimal_error, reference_delta, rel
from hypothesis import given, settings
from hypothesis import strategies as st

from hlora.aggregation import AggregationOptions, ClientUpdate, aggregate_hlora
from hlora.aggregation.factored import split_singular_values

EXACT_METHODS = ["qr", "gram"]


@pytest.mark.parametrize("method", EXACT_METHODS)
def test_single_client_gets_its_own_update_back(method: str) -> None:
    update = make_update("solo", rank=3, scaling=5.0)
    result = aggregate_hlora([update], AggregationOptions(svd_method=method))
    back = result.client_factors(rank=3, scaling=5.0)
    for name, factors in update.factors.items():
        mine = 5.0 * factors.B @ factors.A
        assert back[name].A.shape == (3, SHAPES[name][1])
        assert back[name].B.shape == (SHAPES[name][0], 3)
        torch.testing.assert_close(5.0 * back[name].B @ back[name].A, mine, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(
        result.extras["classifier.weight"], update.extras["classifier.weight"]
    )


@pytest.mark.parametrize("method", EXACT_METHODS)
@pytest.mark.parametrize(("dtype", "tol"), [(torch.float64, 1e-10), (torch.float32, 1e-5)])
def test_untruncated_global_update_is_exact(method: str, dtype: torch.dtype, tol: float) -> None:
    updates = make_round([1, 2, 4, 2], dtype=dtype)
    result = aggregate_hlora(updates, AggregationOptions(svd_method=method))
    for name in SHAPES:
        assert rel(result.layers[name].dense(), reference_delta(updates, name)) <= tol


@pytest.mark.parametrize("method", EXACT_METHODS)
def test_each_client_gets_the_eckart_young_optimum(method: str) -> None:
    updates = make_round([1, 2, 3, 5])
    result = aggregate_hlora(updates, AggregationOptions(svd_method=method))
    for update in updates:
        mine = result.client_factors(update.rank, update.scaling)
        for name in SHAPES:
            dense = reference_delta(updates, name)
            approx = update.scaling * mine[name].B @ mine[name].A
            err = float((dense - approx).norm())
            assert err == pytest.approx(optimal_error(dense, update.rank), rel=1e-9, abs=1e-12)


def test_singular_values_are_those_of_the_dense_update() -> None:
    updates = make_round([2, 3, 4])
    result = aggregate_hlora(updates)
    for name in SHAPES:
        expected = torch.linalg.svdvals(reference_delta(updates, name))
        got = result.layers[name].singular_values
        assert got is not None
        k = got.shape[0]
        torch.testing.assert_close(got, expected[:k], rtol=1e-10, atol=1e-10)
        # R = 9 components; any beyond them are zero.
        assert k == min(9, *SHAPES[name])
        if k < expected.shape[0]:
            assert float(expected[k:].max()) < 1e-10


def test_client_order_does_not_matter() -> None:
    updates = make_round([1, 4, 2])
    base = aggregate_hlora(updates)
    for perm in itertools.permutations(updates):
        other = aggregate_hlora(list(perm))
        for name in SHAPES:
            torch.testing.assert_close(other.layers[name].left, base.layers[name].left)
            torch.testing.assert_close(other.layers[name].right, base.layers[name].right)


@pytest.mark.parametrize("method", EXACT_METHODS)
def test_rank_one_and_full_rank_clients(method: str) -> None:
    shapes = {"w": (6, 5)}
    updates = [
        make_update("a", 1, shapes=shapes, seed=1, extras=False),
        make_update("b", 5, shapes=shapes, seed=2, extras=False),  # rank == min(out, in)
    ]
    result = aggregate_hlora(updates, AggregationOptions(svd_method=method))
    dense = reference_delta(updates, "w")
    assert rel(result.layers["w"].dense(), dense) < 1e-10
    for update in updates:
        mine = result.client_factors(update.rank, update.scaling)["w"]
        err = float((dense - update.scaling * mine.B @ mine.A).norm())
        assert err == pytest.approx(optimal_error(dense, update.rank), abs=1e-9)


def test_global_rank_truncates() -> None:
    updates = make_round([2, 4, 4])
    result = aggregate_hlora(updates, AggregationOptions(global_rank=3))
    for name in SHAPES:
        layer = result.layers[name]
        assert layer.rank == 3
        dense = reference_delta(updates, name)
        assert float((dense - layer.dense()).norm()) == pytest.approx(optimal_error(dense, 3))


def test_low_rank_global_pads_a_larger_client_with_zeros() -> None:
    updates = make_round([2, 2])
    result = aggregate_hlora(updates, AggregationOptions(global_rank=1))
    mine = result.client_factors(rank=2, scaling=1.0)["out"]
    assert mine.A.shape == (2, 9)
    assert torch.all(mine.A[1] == 0) and torch.all(mine.B[:, 1] == 0)


def test_randomized_method_is_near_optimal() -> None:
    shapes = {"w": (40, 30)}
    updates = make_round([8] * 6, shapes=shapes)  # R = 48 > min(out, in)
    result = aggregate_hlora(
        updates, AggregationOptions(global_rank=8, power_iterations=4, oversampling=10)
    )
    layer = result.layers["w"]
    assert layer.rank == 8  # auto + global rank -> randomized
    dense = reference_delta(updates, "w")
    err = float((dense - layer.dense()).norm())
    assert err <= optimal_error(dense, 8) * (1 + 1e-3)


def test_default_keeps_every_exact_component_even_with_many_clients() -> None:
    shapes = {"w": (10, 8)}
    updates = make_round([4] * 5, shapes=shapes)  # R = 20 > min(out, in)
    result = aggregate_hlora(updates)
    assert result.layers["w"].rank == 8
    assert rel(result.layers["w"].dense(), reference_delta(updates, "w")) < 1e-10


def test_randomized_without_global_rank_keeps_the_largest_client_rank() -> None:
    updates = make_round([2, 3], shapes={"w": (10, 8)})
    result = aggregate_hlora(updates, AggregationOptions(svd_method="randomized"))
    assert result.layers["w"].rank == 3


def test_inputs_are_not_mutated() -> None:
    updates = make_round([2, 3])
    before = [{n: (f.A.clone(), f.B.clone()) for n, f in u.factors.items()} for u in updates]
    aggregate_hlora(updates)
    for update, saved in zip(updates, before, strict=True):
        for name, (a, b) in saved.items():
            assert torch.equal(update.factors[name].A, a)
            assert torch.equal(update.factors[name].B, b)


def test_half_precision_inputs_are_computed_in_fp32() -> None:
    updates = make_round([2, 4], dtype=torch.bfloat16)
    result = aggregate_hlora(updates)
    assert result.layers["out"].left.dtype == torch.float32


@pytest.mark.gpu
def test_computation_stays_on_the_cuda_device() -> None:
    updates = [
        ClientUpdate(
            u.client_id,
            u.num_examples,
            u.rank,
            u.scaling,
            {n: type(f)(A=f.A.cuda(), B=f.B.cuda()) for n, f in u.factors.items()},
            {n: t.cuda() for n, t in u.extras.items()},
        )
        for u in make_round([2, 4], dtype=torch.float32)
    ]
    result = aggregate_hlora(updates)
    assert result.layers["out"].left.is_cuda


@settings(max_examples=30, deadline=None)
@given(
    ranks=st.lists(st.integers(1, 6), min_size=1, max_size=5),
    out_f=st.integers(6, 14),
    in_f=st.integers(6, 14),
    seed=st.integers(0, 10_000),
    method=st.sampled_from(EXACT_METHODS),
    data=st.data(),
)
def test_property_exact_and_optimal(
    ranks: list[int], out_f: int, in_f: int, seed: int, method: str, data: st.DataObject
) -> None:
    ranks = [min(r, out_f, in_f) for r in ranks]
    sizes = data.draw(st.lists(st.integers(1, 1000), min_size=len(ranks), max_size=len(ranks)))
    scalings = data.draw(st.lists(st.floats(0.05, 20.0), min_size=len(ranks), max_size=len(ranks)))
    shapes = {"w": (out_f, in_f)}
    updates = make_round(ranks, sizes=sizes, scalings=scalings, shapes=shapes, seed=seed)
    result = aggregate_hlora(updates, AggregationOptions(svd_method=method))
    dense = reference_delta(updates, "w")
    tolerance = 1e-9
    if method == "gram":  # the module's stated bound: about eps * kappa^2 of dW's R components
        s = torch.linalg.svdvals(dense)
        kappa = float(s[0] / s[min(sum(ranks), s.numel()) - 1])
        tolerance += 10 * torch.finfo(torch.float64).eps * kappa**2
    assert float((result.layers["w"].dense() - dense).norm()) <= tolerance * float(dense.norm())
    for update in updates:
        mine = result.client_factors(update.rank, update.scaling)["w"]
        err = float((dense - update.scaling * mine.B @ mine.A).norm())
        assert err <= optimal_error(dense, update.rank) + tolerance * float(dense.norm())


@pytest.mark.parametrize("method", EXACT_METHODS)
def test_orthonormal_a_split_changes_the_factors_not_the_update(method: str) -> None:
    updates = make_round([1, 2, 3, 5])
    balanced = aggregate_hlora(updates, AggregationOptions(svd_method=method))
    split = aggregate_hlora(
        updates, AggregationOptions(svd_method=method, factor_split="orthonormal-a")
    )
    for name in SHAPES:
        dense = reference_delta(updates, name)
        assert rel(split.layers[name].dense(), dense) <= 1e-10
        # (k, in): Vh, orthonormal rows (the gram method leaves rows of zero S at zero)
        values = split.layers[name].singular_values
        assert values is not None
        right = split.layers[name].right[values > 1e-8 * values[0]]
        eye = torch.eye(right.shape[0], dtype=right.dtype)
        torch.testing.assert_close(right @ right.T, eye, rtol=0, atol=1e-10)
        for update in updates:
            mine = split.client_factors(update.rank, update.scaling)[name]
            theirs = balanced.client_factors(update.rank, update.scaling)[name]
            torch.testing.assert_close(mine.B @ mine.A, theirs.B @ theirs.A, rtol=1e-9, atol=1e-12)
            err = float((dense - update.scaling * mine.B @ mine.A).norm())
            assert err == pytest.approx(optimal_error(dense, update.rank), rel=1e-9, abs=1e-12)


def test_unknown_factor_split_is_refused() -> None:
    with pytest.raises(ValueError, match="factor_split must be one of"):
        AggregationOptions(factor_split="left")


def test_a_dead_component_learns_only_with_the_orthonormal_a_split() -> None:
    """A component whose singular value is zero: under the balanced split both its factors are
    zero, a saddle point of ``B @ A`` where no gradient reaches it; under ``orthonormal-a`` its
    row of ``A`` is a unit vector, so the gradient on its column of ``B`` is not zero."""
    gen = torch.Generator().manual_seed(0)
    u, _ = torch.linalg.qr(torch.randn(6, 3, generator=gen, dtype=torch.float64))
    vh = torch.linalg.qr(torch.randn(5, 3, generator=gen, dtype=torch.float64))[0].T
    s = torch.tensor([2.0, 1.0, 0.0], dtype=torch.float64)
    x = torch.randn(8, 5, generator=gen, dtype=torch.float64)
    target = torch.randn(8, 6, generator=gen, dtype=torch.float64)
    grads = {}
    for split in ("balanced", "orthonormal-a"):
        left, right = split_singular_values(u, s, vh, split)
        b = left.clone().requires_grad_(True)
        a = right.clone().requires_grad_(True)
        loss = ((x @ (b @ a).T - target) ** 2).sum()
        loss.backward()
        assert b.grad is not None and a.grad is not None
        grads[split] = (float(b.grad[:, 2].norm()), float(a.grad[2].norm()))
    assert grads["balanced"] == (0.0, 0.0)
    assert grads["orthonormal-a"][0] > 1e-3
    with pytest.raises(ValueError, match="unknown factor split 'left'"):
        split_singular_values(u, s, vh, "left")
