"""Tokenization, length-grouped batching and dynamic padding of sentence pairs."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from hlora.data.glue import Example
from hlora.errors import DataError

_TOKENIZE_CHUNK = 1024
_SEQUENCE_KEYS = ("input_ids", "attention_mask", "token_type_ids")


def tokenize_pairs(
    tokenizer: Any, examples: Sequence[Example], max_length: int = 128
) -> list[dict[str, Any]]:
    """Tokenize sentence pairs without padding.

    Args:
        tokenizer: A Hugging Face tokenizer (called as ``tokenizer(text_a, text_b, ...)``).
        examples: The pairs to encode.
        max_length: Maximum number of tokens per pair, special tokens included; longer pairs
            are truncated (longest sequence first).

    Returns:
        One dict per example with ``input_ids``, ``attention_mask``, ``token_type_ids`` (only if
        the tokenizer returns them) as lists of ints, and ``labels`` as an int.

    Raises:
        DataError: If ``max_length`` is not a positive integer.
    """
    if isinstance(max_length, bool) or not isinstance(max_length, int) or max_length < 1:
        raise DataError(f"max_length must be a positive integer, got {max_length!r}")
    features: list[dict[str, Any]] = []
    for start in range(0, len(examples), _TOKENIZE_CHUNK):
        chunk = examples[start : start + _TOKENIZE_CHUNK]
        encoded = tokenizer(
            [ex.text_a for ex in chunk],
            [ex.text_b for ex in chunk],
            truncation=True,
            max_length=max_length,
            padding=False,
        )
        keys = [k for k in _SEQUENCE_KEYS if k in encoded]
        for i, ex in enumerate(chunk):
            feature: dict[str, Any] = {k: list(encoded[k][i]) for k in keys}
            feature["labels"] = int(ex.label)
            features.append(feature)
    return features


def length_grouped_batches(
    lengths: Sequence[int],
    batch_size: int,
    *,
    shuffle: bool,
    seed: int,
    group_size_multiplier: int = 50,
) -> list[list[int]]:
    """Group examples of similar length into batches to reduce padding.

    With ``shuffle``, the indices are permuted with ``seed``, cut into mega-batches of
    ``batch_size * group_size_multiplier``, each mega-batch is sorted by length (longest
    first) and cut into batches, and the order of all batches is permuted (as in Hugging
    Face's ``LengthGroupedSampler``). Without ``shuffle`` (evaluation), all indices are sorted
    by length, longest first, ties in index order. The last batch of a mega-batch may be
    smaller than ``batch_size``.

    Args:
        lengths: Length (for example number of tokens) of every example.
        batch_size: Maximum number of examples per batch.
        shuffle: Whether to randomize (training) or sort deterministically (evaluation).
        seed: Seed of the permutations; ignored when ``shuffle`` is False.
        group_size_multiplier: Mega-batch size in batches.

    Returns:
        Batches of indices into ``lengths``; every index appears exactly once.

    Raises:
        DataError: If ``batch_size`` or ``group_size_multiplier`` is not a positive integer.
    """
    for option, value in (
        ("batch_size", batch_size),
        ("group_size_multiplier", group_size_multiplier),
    ):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise DataError(f"{option} must be a positive integer, got {value!r}")
    size = np.asarray(list(lengths), dtype=np.int64)
    if not shuffle:
        order = np.argsort(-size, kind="stable")
        return [order[i : i + batch_size].tolist() for i in range(0, len(order), batch_size)]
    rng = np.random.default_rng(seed)
    perm = rng.permutation(size.shape[0])
    group = batch_size * group_size_multiplier
    batches: list[list[int]] = []
    for g in range(0, len(perm), group):
        mega = perm[g : g + group]
        mega = mega[np.argsort(-size[mega], kind="stable")]
        batches.extend(mega[i : i + batch_size].tolist() for i in range(0, len(mega), batch_size))
    return [batches[i] for i in rng.permutation(len(batches))]


class DynamicPaddingCollator:
    """Pad a list of tokenized features to the longest one in the batch.

    Args:
        tokenizer: Tokenizer whose ``pad_token_id`` (and ``padding_side``, default right) is used.
        pad_to_multiple_of: Round the padded length up to a multiple of this (tensor-core
            friendly), or None to pad exactly to the longest sequence.

    Raises:
        DataError: If the tokenizer has no ``pad_token_id`` or ``pad_to_multiple_of`` is not a
            positive integer or None.
    """

    def __init__(self, tokenizer: Any, pad_to_multiple_of: int | None = 8) -> None:
        pad_id = getattr(tokenizer, "pad_token_id", None)
        if pad_id is None:
            raise DataError(
                "the tokenizer has no pad token; set tokenizer.pad_token (for example to "
                "tokenizer.eos_token) before building the collator"
            )
        if pad_to_multiple_of is not None and (
            isinstance(pad_to_multiple_of, bool)
            or not isinstance(pad_to_multiple_of, int)
            or pad_to_multiple_of < 1
        ):
            raise DataError(
                f"pad_to_multiple_of must be a positive integer or None, got {pad_to_multiple_of!r}"
            )
        self.pad_values = {
            "input_ids": int(pad_id),
            "attention_mask": 0,
            "token_type_ids": int(getattr(tokenizer, "pad_token_type_id", 0) or 0),
        }
        self.left = getattr(tokenizer, "padding_side", "right") == "left"
        self.pad_to_multiple_of = pad_to_multiple_of

    def __call__(self, features: Sequence[dict[str, Any]]) -> dict[str, torch.Tensor]:
        """Pad ``features`` into tensors.

        Args:
            features: Dicts from :func:`tokenize_pairs`: ``input_ids``, optional
                ``attention_mask`` (ones when absent) and ``token_type_ids``, optional
                ``labels`` (int).

        Returns:
            ``input_ids``, ``attention_mask`` (0 on padding), ``token_type_ids`` if given, as
            ``(batch, length)`` LongTensors, and ``labels`` as a ``(batch,)`` LongTensor if given.

        Raises:
            DataError: If the batch is empty or the features have unknown or inconsistent keys.
        """
        if not features:
            raise DataError("cannot collate an empty batch")
        keys = set(features[0])
        allowed = {*_SEQUENCE_KEYS, "labels"}
        if "input_ids" not in keys or not keys <= allowed:
            raise DataError(
                f"features must have 'input_ids' and only keys from {sorted(allowed)}, "
                f"got {sorted(keys)}"
            )
        if any(set(f) != keys for f in features):
            raise DataError("all features of a batch must have the same keys")
        longest = max(len(f["input_ids"]) for f in features)
        if self.pad_to_multiple_of is not None:
            longest = -(-longest // self.pad_to_multiple_of) * self.pad_to_multiple_of
        batch: dict[str, torch.Tensor] = {}
        for key in _SEQUENCE_KEYS:
            if key != "attention_mask" and key not in keys:
                continue
            out = torch.full((len(features), longest), self.pad_values[key], dtype=torch.long)
            for row, feature in enumerate(features):
                n = len(feature["input_ids"])
                values = feature.get(key, [1] * n)
                if len(values) != n:
                    raise DataError(f"feature {row}: {key} and input_ids differ in length")
                span = slice(longest - n, longest) if self.left else slice(0, n)
                out[row, span] = torch.as_tensor(values, dtype=torch.long)
            batch[key] = out
        if "labels" in keys:
            batch["labels"] = torch.tensor([int(f["labels"]) for f in features], dtype=torch.long)
        return batch
