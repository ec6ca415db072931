"""A node's tokenized examples, cached on its own disk between ClientApp processes.

A deployed SuperNode starts a fresh ClientApp process per message, so without a cache every
round re-reads and re-tokenizes the node's data. The cache key is a SHA-256 over everything the
features depend on: the bytes of the data files, the tokenizer (its full serialized
definition: vocabulary, normalizer, special tokens), the maximum length, the pairing of the
texts (decoders get a newline) and, for a simulated partition, the configuration fingerprint
and the partition. A changed file or tokenizer gives a new key; stale entries are never read.

An entry is one ``.npz`` file (no pickled objects): each sequence key's token ids (or per-token
labels) concatenated into one int64 array with the offsets of each example, and each integer
key (a class label) as one int64 array. It is written
atomically (:func:`hlora.io.write_bytes_atomic`), so concurrent processes never read a partial
one.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from hlora.io import default_cache_dir, write_bytes_atomic
from hlora.runtime import Features

logger = logging.getLogger(__name__)

NO_CACHE = "none"
"""The ``cache-dir`` value that turns the cache off."""
_FORMAT = "hlora-features-v2"


def resolve_cache_dir(value: str) -> Path | None:
    """The cache folder for a node's ``cache-dir`` value ('' : the default; ``none``: off)."""
    if value.strip().lower() == NO_CACHE:
        return None
    return Path(value).expanduser() if value.strip() else default_cache_dir()


def file_sha256(path: Path) -> str:
    """SHA-256 of a file's bytes."""
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def tokenizer_sha256(tokenizer: Any) -> str:
    """SHA-256 of a tokenizer's definition.

    A fast tokenizer is hashed by its full serialized form (``backend_tokenizer.to_str()``:
    vocabulary, normalizer, pre-tokenizer, post-processor, added tokens) without the
    truncation and padding state its last call left; any other by its class, its vocabulary
    and its special tokens.
    """
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        definition = json.loads(backend.to_str())
        for state in ("truncation", "padding"):  # set by the last call, not the definition
            definition.pop(state, None)
        text = json.dumps(definition, sort_keys=True)
    else:
        text = json.dumps(
            [
                type(tokenizer).__name__,
                sorted(tokenizer.get_vocab().items()),
                sorted(map(str, getattr(tokenizer, "all_special_tokens", []))),
            ]
        )
    return hashlib.sha256(text.encode()).hexdigest()


def features_key(files: Sequence[Path], tokenizer: Any, parts: Sequence[str]) -> str:
    """The cache key of features made from ``files`` by ``tokenizer`` with settings ``parts``."""
    digest = hashlib.sha256(_FORMAT.encode())
    for path in files:
        digest.update(f"|file:{file_sha256(path)}".encode())
    digest.update(f"|tokenizer:{tokenizer_sha256(tokenizer)}".encode())
    for part in parts:
        digest.update(f"|{part}".encode())
    return digest.hexdigest()


def _save(path: Path, features: Features) -> None:
    first = features[0] if features else {}
    arrays: dict[str, np.ndarray] = {}
    for key in sorted(first):
        if isinstance(first[key], int):
            arrays[f"int.{key}"] = np.asarray([int(f[key]) for f in features], dtype=np.int64)
            continue
        lengths = [len(f[key]) for f in features]
        arrays[f"seq.{key}"] = np.fromiter(
            (t for f in features for t in f[key]), dtype=np.int64, count=sum(lengths)
        )
        arrays[f"offsets.{key}"] = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)  # type: ignore[arg-type]
    write_bytes_atomic(path, buffer.getvalue())


def _load(path: Path) -> list[dict[str, Any]]:
    with np.load(path, allow_pickle=False) as data:
        ints = {
            name.removeprefix("int."): data[name].tolist()
            for name in data.files
            if name.startswith("int.")
        }
        seqs = {
            name.removeprefix("seq."): (
                data[name].tolist(),
                data["offsets." + name.removeprefix("seq.")].tolist(),
            )
            for name in data.files
            if name.startswith("seq.")
        }
    counts = [len(v) for v in ints.values()] + [len(off) - 1 for _, off in seqs.values()]
    count = counts[0] if counts else 0
    out: list[dict[str, Any]] = []
    for i in range(count):
        item: dict[str, Any] = {k: flat[off[i] : off[i + 1]] for k, (flat, off) in seqs.items()}
        item.update({k: values[i] for k, values in ints.items()})
        out.append(item)
    return out


def cached_features(cache_dir: Path | None, key: str, make: Callable[[], Features]) -> Features:
    """The features stored under ``key`` in ``cache_dir``, else ``make()`` (then stored).

    Args:
        cache_dir: The cache folder (None: no cache, always ``make()``).
        key: :func:`features_key` of what the features depend on.
        make: Reads and tokenizes the data.

    A cache folder that cannot be written is logged as a warning and the features are
    returned all the same.
    """
    if cache_dir is None:
        return make()
    path = cache_dir / "features" / f"{key}.npz"
    if path.is_file():
        try:
            return _load(path)
        except (OSError, ValueError, KeyError):
            path.unlink(missing_ok=True)  # unreadable entry: rebuild it
    features = make()
    try:
        _save(path, features)
    except OSError as err:
        logger.warning("features not cached: cannot write '%s': %s", path, err)
    return features
