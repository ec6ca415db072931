"""Tests of hlora.data.partition."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hlora.data.partition import PARTITION_SCHEMES, partition_indices, partition_summary
from hlora.errors import DataError

# MRPC-like labels: 2,474 positives and 1,194 negatives, interleaved deterministically.
MRPC_LIKE = [int(v) for v in np.random.default_rng(7).permutation([1] * 2474 + [0] * 1194)]


def _check_valid(parts: list[list[int]], n: int, num_clients: int, min_size: int) -> None:
    assert len(parts) == num_clients
    flat = [i for part in parts for i in part]
    assert sorted(flat) == list(range(n))  # disjoint and complete
    for part in parts:
        assert part == sorted(part)
        assert len(part) >= min_size
        assert all(type(i) is int for i in part)


def _label_distance(labels: Sequence[int], parts: list[list[int]]) -> float:
    """Mean total-variation distance between client and global label distributions."""
    y = np.asarray(labels)
    classes = np.unique(y)
    overall = np.array([(y == c).mean() for c in classes])
    dists = [
        0.5 * np.abs(np.array([(y[p] == c).mean() for c in classes]) - overall).sum() for p in parts
    ]
    return float(np.mean(dists))


@settings(max_examples=40, deadline=None)
@given(
    n=st.integers(1, 300),
    num_clients=st.integers(1, 12),
    scheme=st.sampled_from(PARTITION_SCHEMES),
    alpha=st.sampled_from([0.01, 0.1, 0.5, 5.0]),
    seed=st.integers(0, 2**31),
    min_size=st.integers(1, 5),
    num_classes=st.integers(1, 4),
)
def test_partitions_are_valid_and_deterministic(
    n: int,
    num_clients: int,
    scheme: str,
    alpha: float,
    seed: int,
    min_size: int,
    num_classes: int,
) -> None:
    labels = [i % num_classes for i in range(n)]
    kwargs: dict[str, Any] = {"alpha": alpha, "seed": seed, "min_size": min_size}
    if n < num_clients * min_size:
        with pytest.raises(DataError, match="only"):
            partition_indices(labels, num_clients, scheme, **kwargs)
        return
    parts = partition_indices(labels, num_clients, scheme, **kwargs)
    _check_valid(parts, n, num_clients, min_size)
    assert partition_indices(labels, num_clients, scheme, **kwargs) == parts


@pytest.mark.parametrize("scheme", PARTITION_SCHEMES)
def test_real_size_schemes(scheme: str) -> None:
    parts = partition_indices(MRPC_LIKE, 20, scheme, alpha=0.1, seed=3, min_size=8)
    _check_valid(parts, len(MRPC_LIKE), 20, 8)
    assert parts != partition_indices(MRPC_LIKE, 20, scheme, alpha=0.1, seed=4, min_size=8)


def test_iid_sizes_are_balanced() -> None:
    sizes = [len(p) for p in partition_indices(MRPC_LIKE, 7, "iid", seed=1)]
    assert max(sizes) - min(sizes) <= 1


def test_dirichlet_is_more_label_skewed_than_iid() -> None:
    iid = np.mean(
        [_label_distance(MRPC_LIKE, partition_indices(MRPC_LIKE, 10, seed=s)) for s in range(5)]
    )
    skew = np.mean(
        [
            _label_distance(
                MRPC_LIKE, partition_indices(MRPC_LIKE, 10, "dirichlet", alpha=0.1, seed=s)
            )
            for s in range(5)
        ]
    )
    mild = np.mean(
        [
            _label_distance(
                MRPC_LIKE, partition_indices(MRPC_LIKE, 10, "dirichlet", alpha=100.0, seed=s)
            )
            for s in range(5)
        ]
    )
    assert iid < 0.05
    assert skew > 0.25
    assert skew > 5 * iid
    assert mild < skew


def test_quantity_skew_unequal_sizes_iid_labels() -> None:
    parts = partition_indices(MRPC_LIKE, 10, "quantity", alpha=0.3, seed=0)
    sizes = sorted(len(p) for p in parts)
    assert sizes[-1] > 4 * sizes[0]
    big = [p for p in parts if len(p) >= 200]
    assert big and _label_distance(MRPC_LIKE, big) < 0.1


def test_single_client_gets_everything() -> None:
    for scheme in PARTITION_SCHEMES:
        assert partition_indices([0, 1, 1], 1, scheme) == [[0, 1, 2]]


def test_summary() -> None:
    labels = [0, 1, 1, 2, 0]
    summary = partition_summary(labels, [[0, 1], [2, 3, 4]])
    assert summary == [
        {"client": 0, "size": 2, "label_counts": {0: 1, 1: 1, 2: 0}},
        {"client": 1, "size": 3, "label_counts": {0: 1, 1: 1, 2: 1}},
    ]


@pytest.mark.parametrize(
    ("kwargs", "pattern"),
    [
        ({"scheme": "shards"}, r"unknown partition scheme 'shards'.*'iid', 'dirichlet'"),
        ({"num_clients": 0}, r"num_clients must be an integer >= 1, got 0"),
        ({"num_clients": 2.0}, r"num_clients must be an integer >= 1, got 2\.0"),
        ({"alpha": 0.0}, r"alpha must be a finite number > 0, got 0\.0"),
        ({"alpha": -1}, r"alpha must be a finite number > 0, got -1"),
        ({"alpha": float("nan")}, r"alpha must be a finite number > 0, got nan"),
        ({"alpha": "0.5"}, r"alpha must be a number > 0, got '0\.5'"),
        ({"min_size": 0}, r"min_size must be an integer >= 1, got 0"),
        ({"num_clients": 4}, r"cannot give 4 clients at least min_size=1 .*only 3 examples"),
        ({"num_clients": 2, "min_size": 2}, r"min_size=2 .*only 3 examples"),
    ],
)
def test_errors(kwargs: dict[str, Any], pattern: str) -> None:
    args: dict[str, Any] = {"num_clients": 2, "scheme": "dirichlet", **kwargs}
    with pytest.raises(DataError, match=pattern):
        partition_indices([0, 1, 0], **args)
