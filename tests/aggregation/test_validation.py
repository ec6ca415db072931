"""Every validation error names the client and the reason."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from agg_helpers import make_round, make_update

from hlora.aggregation import (
    AggregationError,
    InvalidUpdateError,
    LoraFactors,
    UpdateSpec,
    aggregate_hlora,
    validate_updates,
)


def _spec() -> UpdateSpec:
    return UpdateSpec.from_update(make_update("ref", 2))


def _with_layer(update, name, **changes):  # type: ignore[no-untyped-def]
    factors = dict(update.factors)
    factors[name] = dataclasses.replace(factors[name], **changes)
    return dataclasses.replace(update, factors=factors)


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda u: dataclasses.replace(u, num_examples=0), "num_examples must be positive, got 0"),
        (lambda u: dataclasses.replace(u, num_examples=2.5), "num_examples must be an integer"),
        (lambda u: dataclasses.replace(u, scaling=float("nan")), "scaling must be finite"),
        (lambda u: dataclasses.replace(u, scaling=-1.0), "scaling must be finite and positive"),
        (lambda u: dataclasses.replace(u, rank=0), "rank must be a positive integer"),
        (
            lambda u: dataclasses.replace(
                u, factors={k: v for k, v in u.factors.items() if k != "out"}
            ),
            "missing layers ['out']",
        ),
        (
            lambda u: dataclasses.replace(
                u, factors={**u.factors, "extra.layer": u.factors["out"]}
            ),
            "unexpected layers ['extra.layer']",
        ),
        (
            lambda u: dataclasses.replace(u, extras={}),
            "missing extra tensors ['classifier.weight']",
        ),
        (
            lambda u: _with_layer(u, "out", A=torch.zeros(2, 8, dtype=torch.float64)),
            "layer 'out' A has shape (2, 8), expected (2, 9)",
        ),
        (
            lambda u: _with_layer(u, "out", B=torch.zeros(7, 3, dtype=torch.float64)),
            "layer 'out' B has shape (7, 3), expected (7, 2)",
        ),
        (
            lambda u: _with_layer(
                u, "out", A=torch.full((2, 9), float("inf"), dtype=torch.float64)
            ),
            "layer 'out' A contains non-finite values",
        ),
        (
            lambda u: _with_layer(u, "out", B=torch.zeros(7, 2, dtype=torch.int64)),
            "layer 'out' B has dtype torch.int64, expected floating point",
        ),
        (
            lambda u: dataclasses.replace(
                u, extras={"classifier.weight": torch.full((2, 4), float("nan"))}
            ),
            "extra tensor 'classifier.weight' contains non-finite values",
        ),
        (
            lambda u: dataclasses.replace(u, extras={"classifier.weight": torch.zeros(3, 4)}),
            "extra tensor 'classifier.weight' has shape (3, 4), expected (2, 4)",
        ),
    ],
)
def test_invalid_update_messages(mutate, message: str) -> None:  # type: ignore[no-untyped-def]
    bad = mutate(make_update("bad-client", 2, seed=3))
    with pytest.raises(InvalidUpdateError) as info:
        validate_updates([make_update("good", 2), bad], _spec())
    assert info.value.client_id == "bad-client"
    assert str(info.value).startswith("client 'bad-client': ")
    assert message in str(info.value)


def test_rank_other_than_assigned() -> None:
    updates = make_round([2, 4])
    with pytest.raises(
        InvalidUpdateError, match="client 'c1': rank 4 differs from the assigned rank 8"
    ):
        validate_updates(updates, expected_ranks={"c0": 2, "c1": 8})


def test_rank_above_layer_limit() -> None:
    shapes = {"w": (3, 5)}
    update = make_update("big", 4, shapes=shapes, extras=False)
    spec = UpdateSpec(layers={"w": (3, 5)}, extras={})
    with pytest.raises(InvalidUpdateError, match=r"rank 4 exceeds min\(out, in\) = 3 of layer 'w'"):
        validate_updates([update], spec)


def test_no_clients_and_duplicate_ids() -> None:
    with pytest.raises(AggregationError, match="no client updates to aggregate"):
        aggregate_hlora([])
    update = make_update("twin", 2)
    with pytest.raises(AggregationError, match=r"duplicate client ids in one round: \['twin'\]"):
        aggregate_hlora([update, update])


def test_spec_inferred_from_first_update_catches_disagreement() -> None:
    odd = make_update("odd", 2, shapes={"other": (4, 4)})
    with pytest.raises(InvalidUpdateError, match="client 'odd': missing layers"):
        aggregate_hlora([make_update("first", 2), odd])


def test_non_tensor_factor() -> None:
    update = make_update("x", 2)
    bad = dataclasses.replace(
        update,
        factors={**update.factors, "out": LoraFactors(A=[[0.0]], B=update.factors["out"].B)},  # type: ignore[arg-type]
    )
    with pytest.raises(InvalidUpdateError, match="layer 'out' A is a list, not a tensor"):
        validate_updates([bad], _spec())


def test_options_validation() -> None:
    from hlora.aggregation import AggregationOptions

    with pytest.raises(ValueError, match="global_rank must be >= 1 or None, got 0"):
        AggregationOptions(global_rank=0)
    with pytest.raises(ValueError, match="power_iterations must be >= 0, got -1"):
        AggregationOptions(power_iterations=-1)
