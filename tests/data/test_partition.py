"""Tests of hlora.data.partition."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hlora.data.partition import (
    ALL_PARTITION_SCHEMES,
    CATEGORY_SCHEME,
    PARTITION_SCHEMES,
    partition_indices,
    partition_summary,
)
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


# --- the category scheme ------------------------------------------------------------------------


def test_category_scheme_is_listed_apart() -> None:
    assert CATEGORY_SCHEME == "category"
    assert CATEGORY_SCHEME not in PARTITION_SCHEMES
    assert (*PARTITION_SCHEMES, CATEGORY_SCHEME) == ALL_PARTITION_SCHEMES


def test_category_one_client_per_category() -> None:
    labels = [2, 0, 1, 0, 2, 2, 1]
    parts = partition_indices(labels, 3, "category", seed=5)
    assert parts == [[1, 3], [2, 6], [0, 4, 5]]  # clients in ascending label order


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_category_groups_clients_evenly(seed: int) -> None:
    # labels 0..3 with 40, 10, 25, 25 examples; 10 clients -> 2 each, 2 extra to the largest
    # two (label 0; then labels 2 and 3 tie at 25, the smaller wins)
    labels = [0] * 40 + [1] * 10 + [2] * 25 + [3] * 25
    parts = partition_indices(labels, 10, "category", seed=seed, min_size=4)
    _check_valid(parts, len(labels), 10, 4)
    owners = [{labels[i] for i in part} for part in parts]
    assert owners == [{0}] * 3 + [{1}] * 2 + [{2}] * 3 + [{3}] * 2
    sizes = [len(p) for p in parts]
    assert sizes == [14, 13, 13, 5, 5, 9, 8, 8, 13, 12]
    assert partition_indices(labels, 10, "category", seed=seed, min_size=4) == parts


def test_category_seed_changes_the_split_not_the_grouping() -> None:
    a = partition_indices(MRPC_LIKE, 20, "category", seed=3, min_size=8)
    b = partition_indices(MRPC_LIKE, 20, "category", seed=4, min_size=8)
    _check_valid(a, len(MRPC_LIKE), 20, 8)
    assert a != b
    summary = partition_summary(MRPC_LIKE, a)
    assert [s["label_counts"][0] > 0 for s in summary] == [True] * 10 + [False] * 10
    assert [len(p) for p in a] == [len(p) for p in b]
    assert [sum(MRPC_LIKE[i] for i in p) for p in a] == [0] * 10 + [len(p) for p in a[10:]]


def test_category_single_category_is_iid_sized() -> None:
    parts = partition_indices([4] * 7, 3, "category")
    assert [len(p) for p in parts] == [3, 2, 2]
    assert partition_indices([0, 1, 1], 2, "category") == [[0], [1, 2]]


@pytest.mark.parametrize(
    ("labels", "num_clients", "min_size", "pattern"),
    [
        ([0, 1, 2, 0], 2, 1, r"'category' gives every client one category: 2 clients for 3 cat"),
        ([0, 1, 2, 3], 1, 1, r"1 clients for 4 categories; use at least 4 clients"),
        ([0] * 9 + [1] * 3, 4, 2, r"min_size=2 .*too few in label 1 \(3 examples for 2 clients\)"),
        ([0] * 9 + [1, 2], 3, 2, r"too few in label 1 \(1 examples for 1 clients\), 2 \(1 ex"),
        ([0, 1, 2], 4, 1, r"cannot give 4 clients at least min_size=1 .*only 3 examples"),
    ],
)
def test_category_errors(labels: list[int], num_clients: int, min_size: int, pattern: str) -> None:
    with pytest.raises(DataError, match=pattern):
        partition_indices(labels, num_clients, "category", min_size=min_size)
