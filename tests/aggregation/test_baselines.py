"""fedavg, zeropad and flora: definitions, the fedavg bias, and the registry."""

from __future__ import annotations

import pytest
import torch
from agg_helpers import SHAPES, make_round, make_update, reference_delta, rel

from hlora.aggregation import (
    AggregationError,
    ClientUpdate,
    LoraFactors,
    aggregate_fedavg,
    aggregate_flora,
    aggregate_hlora,
    aggregate_zeropad,
    get_strategy,
)


def test_fedavg_averages_each_side() -> None:
    updates = make_round([3, 3, 3], scalings=[2.0, 2.0, 2.0])
    result = aggregate_fedavg(updates)
    total = sum(u.num_examples for u in updates)
    for name in SHAPES:
        a_bar = sum(u.num_examples / total * u.factors[name].A for u in updates)
        b_bar = sum(u.num_examples / total * u.factors[name].B for u in updates)
        back = result.client_factors(3, 2.0)[name]
        torch.testing.assert_close(back.A, a_bar)
        torch.testing.assert_close(back.B, b_bar)
        torch.testing.assert_close(result.layers[name].dense(), 2.0 * b_bar @ a_bar)


def test_fedavg_cross_term_bias_and_hlora_has_none() -> None:
    # Two equal-weight clients: B1 A1 = e1 e1^T, B2 A2 = e2 e2^T. The mean of the products is
    # diag(1/2, 1/2); the product of the means is 1/4 * (e1 + e2)(e1 + e2)^T: cross terms appear.
    e1 = torch.tensor([[1.0], [0.0]], dtype=torch.float64)
    e2 = torch.tensor([[0.0], [1.0]], dtype=torch.float64)
    clients = [
        ClientUpdate("one", 1, 1, 1.0, {"w": LoraFactors(A=e1.T.clone(), B=e1.clone())}),
        ClientUpdate("two", 1, 1, 1.0, {"w": LoraFactors(A=e2.T.clone(), B=e2.clone())}),
    ]
    truth = torch.tensor([[0.5, 0.0], [0.0, 0.5]], dtype=torch.float64)
    naive = aggregate_fedavg(clients).layers["w"].dense()
    torch.testing.assert_close(naive, torch.full((2, 2), 0.25, dtype=torch.float64))
    assert float((naive - truth).norm()) > 0.3
    torch.testing.assert_close(aggregate_hlora(clients).layers["w"].dense(), truth)


def test_fedavg_refuses_heterogeneous_ranks_and_scalings() -> None:
    with pytest.raises(
        AggregationError, match=r"needs one rank for every client, got ranks \[2, 4\]"
    ):
        aggregate_fedavg(make_round([2, 4]))
    with pytest.raises(AggregationError, match=r"needs one LoRA scaling for every client"):
        aggregate_fedavg(make_round([2, 2], scalings=[1.0, 3.0]))


def test_zeropad_equals_fedavg_for_homogeneous_ranks() -> None:
    updates = make_round([4, 4, 4], scalings=[0.5, 0.5, 0.5])
    za, fa = aggregate_zeropad(updates), aggregate_fedavg(updates)
    for name in SHAPES:
        assert torch.equal(za.layers[name].left, fa.layers[name].left)
        assert torch.equal(za.layers[name].right, fa.layers[name].right)
        assert za.layers[name].scale == fa.layers[name].scale


def test_zeropad_pads_and_slices() -> None:
    updates = make_round([1, 3], sizes=[1, 3], scalings=[2.0, 2.0])
    result = aggregate_zeropad(updates)
    layer = result.layers["out"]
    assert layer.left.shape == (7, 3) and layer.right.shape == (3, 9)
    a_small, a_big = updates[0].factors["out"].A, updates[1].factors["out"].A
    expected_row0 = 0.25 * a_small[0] + 0.75 * a_big[0]
    torch.testing.assert_close(layer.right[0], expected_row0)
    torch.testing.assert_close(layer.right[1:], 0.75 * a_big[1:])
    back = result.client_factors(1, 2.0)["out"]
    torch.testing.assert_close(back.A, layer.right[:1])


def test_zeropad_folds_differing_scalings_into_the_factors() -> None:
    updates = make_round([2, 2], sizes=[1, 1], scalings=[1.0, 4.0])
    layer = aggregate_zeropad(updates).layers["out"]
    a0, a1 = updates[0].factors["out"].A, updates[1].factors["out"].A
    torch.testing.assert_close(layer.right, 0.5 * (1.0 * a0 + 2.0 * a1))
    assert layer.scale == 1.0


def test_flora_stacks_the_exact_update_and_merges() -> None:
    updates = make_round([1, 2, 5])
    result = aggregate_flora(updates)
    assert result.merge_into_base
    for name in SHAPES:
        assert result.layers[name].rank == 8
        assert rel(result.layers[name].dense(), reference_delta(updates, name)) < 1e-12
    with pytest.raises(ValueError, match="merges its update into the base weights"):
        result.client_factors(2, 1.0)


def test_every_strategy_averages_the_extras() -> None:
    updates = make_round([2, 2, 2], scalings=[1.0, 1.0, 1.0])
    total = sum(u.num_examples for u in updates)
    expected = sum(u.num_examples / total * u.extras["classifier.weight"] for u in updates)
    for fn in (aggregate_hlora, aggregate_fedavg, aggregate_zeropad, aggregate_flora):
        torch.testing.assert_close(fn(updates).extras["classifier.weight"], expected)


def test_registry() -> None:
    assert get_strategy("hlora").heterogeneous_ranks
    assert not get_strategy("fedavg").heterogeneous_ranks
    assert get_strategy("flora").merges_into_base
    with pytest.raises(ValueError, match="unknown strategy 'avg'; allowed: fedavg, flora, hlora"):
        get_strategy("avg")


def test_single_client_round_trip_for_every_non_merging_strategy() -> None:
    update = make_update("solo", 4, scaling=2.0)
    for name in ("hlora", "fedavg", "zeropad"):
        result = get_strategy(name).aggregate([update])
        back = result.client_factors(4, 2.0)
        for layer, factors in update.factors.items():
            torch.testing.assert_close(
                2.0 * back[layer].B @ back[layer].A, 2.0 * factors.B @ factors.A
            )
