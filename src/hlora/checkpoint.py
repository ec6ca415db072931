"""The server's state after a finished round, saved atomically in one safetensors file.

Tensors go into the file by key; everything else (round, strategy, scales, the config it
belongs to) is JSON in the file's metadata. The file is written next to its final name and
moved over it with ``os.replace``, so a crash (even SIGKILL) leaves either the previous
checkpoint or the new one, never half of one.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save
from torch import Tensor

from hlora.aggregation import GlobalUpdate, LoraFactors, LowRankDelta
from hlora.errors import CheckpointError
from hlora.io import write_bytes_atomic

FORMAT_VERSION = 1

CHECKPOINT_FILE = "checkpoint.safetensors"
"""Name of the server's checkpoint inside a run folder."""


@dataclass
class ClientState:
    """A client's own adapter (the ``local`` reference mode keeps one per client)."""

    factors: dict[str, LoraFactors]
    extras: dict[str, Tensor]


@dataclass
class ServerState:
    """Everything the round loop needs to continue after ``round_num``.

    Attributes:
        round_num: The last finished round (0: none yet).
        global_update: The last aggregate (None before the first round and in ``local`` mode).
        extras: The current global head.
        base_version: Number of merged updates in the base (``flora``).
        base_delta: Cumulative merged update (``flora``), layer -> ``LowRankDelta``.
        local: Client id -> its own adapter (``local`` mode).
        wall_time_s: Training wall time spent so far (accumulated across resumes).
        optimizer: The server optimizer's state, name -> tensor (see :mod:`hlora.server_opt`).
    """

    round_num: int
    global_update: GlobalUpdate | None
    extras: dict[str, Tensor]
    base_version: int = 0
    base_delta: dict[str, LowRankDelta] | None = None
    local: dict[str, ClientState] = field(default_factory=dict)
    wall_time_s: float = 0.0
    optimizer: dict[str, Tensor] = field(default_factory=dict)

    def whole_update(self) -> dict[str, LowRankDelta]:
        """The whole update relative to the pretrained weights, layer -> ``LowRankDelta``:
        the merged one (``flora``), else the global update; empty before the first round."""
        if self.base_delta is not None:
            return dict(self.base_delta)
        if self.global_update is not None:
            return dict(self.global_update.layers)
        return {}


def _put_delta(
    tensors: dict[str, Tensor],
    meta: dict[str, Any],
    prefix: str,
    layers: Mapping[str, LowRankDelta],
) -> None:
    scales = {}
    for name, d in layers.items():
        tensors[f"{prefix}.left.{name}"] = d.left.contiguous()
        tensors[f"{prefix}.right.{name}"] = d.right.contiguous()
        if d.singular_values is not None:
            tensors[f"{prefix}.S.{name}"] = d.singular_values.contiguous()
        scales[name] = d.scale
    meta[f"{prefix}.scales"] = scales


def _get_delta(
    tensors: Mapping[str, Tensor], meta: Mapping[str, Any], prefix: str
) -> dict[str, LowRankDelta]:
    out = {}
    for name, scale in meta[f"{prefix}.scales"].items():
        out[name] = LowRankDelta(
            left=tensors[f"{prefix}.left.{name}"],
            right=tensors[f"{prefix}.right.{name}"],
            scale=float(scale),
            singular_values=tensors.get(f"{prefix}.S.{name}"),
        )
    return out


def save_state(path: str | Path, state: ServerState, fingerprint: str) -> None:
    """Write ``state`` atomically to ``path``.

    Args:
        path: The checkpoint file (``.safetensors``).
        state: The state after a finished round.
        fingerprint: Identifies the configuration the state belongs to (checked on load).
    """
    target = Path(path)
    tensors: dict[str, Tensor] = {}
    meta: dict[str, Any] = {
        "format": FORMAT_VERSION,
        "round": state.round_num,
        "fingerprint": fingerprint,
        "base_version": state.base_version,
        "wall_time_s": state.wall_time_s,
        "local_clients": sorted(state.local),
    }
    for name, t in state.extras.items():
        tensors[f"extras.{name}"] = t.contiguous()
    if state.global_update is not None:
        g = state.global_update
        meta["global"] = {"strategy": g.strategy, "merge": g.merge_into_base}
        _put_delta(tensors, meta, "global", g.layers)
        for name, t in g.extras.items():
            tensors[f"global.extras.{name}"] = t.contiguous()
    if state.base_delta is not None:
        _put_delta(tensors, meta, "base", state.base_delta)
    for cid, cs in state.local.items():
        for name, f in cs.factors.items():
            tensors[f"local.{cid}.A.{name}"] = f.A.contiguous()
            tensors[f"local.{cid}.B.{name}"] = f.B.contiguous()
        for name, t in cs.extras.items():
            tensors[f"local.{cid}.extras.{name}"] = t.contiguous()
    for name, t in state.optimizer.items():
        tensors[f"opt.{name}"] = t.contiguous()
    tensors = {k: v.detach().cpu().clone() for k, v in tensors.items()}
    write_bytes_atomic(target, save(tensors, metadata={"hlora": json.dumps(meta)}))


def load_state(path: str | Path, fingerprint: str | None = None) -> ServerState:
    """Read a checkpoint written by :func:`save_state`.

    Args:
        path: The checkpoint file.
        fingerprint: When given, the checkpoint must belong to this configuration.

    Raises:
        CheckpointError: Missing, unreadable or corrupt file, or another configuration's.
    """
    source = Path(path)
    if not source.is_file():
        raise CheckpointError(f"checkpoint '{source}' does not exist")
    try:
        tensors = load_file(str(source))
        with safe_open(str(source), framework="pt") as handle:
            raw_meta = (handle.metadata() or {}).get("hlora")
        if raw_meta is None:
            raise CheckpointError(f"checkpoint '{source}' has no hlora metadata")
        meta = json.loads(raw_meta)
    except (SafetensorError, OSError, ValueError, json.JSONDecodeError) as err:
        raise CheckpointError(f"checkpoint '{source}' is corrupt or unreadable: {err}") from err
    if meta.get("format") != FORMAT_VERSION:
        raise CheckpointError(
            f"checkpoint '{source}' has format {meta.get('format')!r}, expected {FORMAT_VERSION}"
        )
    if fingerprint is not None and meta.get("fingerprint") != fingerprint:
        raise CheckpointError(
            f"checkpoint '{source}' belongs to another configuration (the run's config.toml "
            "changed since it was written)"
        )
    try:
        extras = {k[len("extras.") :]: v for k, v in tensors.items() if k.startswith("extras.")}
        global_update = None
        if "global" in meta:
            global_update = GlobalUpdate(
                strategy=meta["global"]["strategy"],
                layers=_get_delta(tensors, meta, "global"),
                extras={
                    k[len("global.extras.") :]: v
                    for k, v in tensors.items()
                    if k.startswith("global.extras.")
                },
                merge_into_base=bool(meta["global"]["merge"]),
            )
        base_delta = _get_delta(tensors, meta, "base") if "base.scales" in meta else None
        local: dict[str, ClientState] = {}
        for cid in meta["local_clients"]:
            prefix = f"local.{cid}."
            factors: dict[str, LoraFactors] = {}
            head: dict[str, Tensor] = {}
            for key, value in tensors.items():
                if not key.startswith(prefix):
                    continue
                kind, _, name = key[len(prefix) :].partition(".")
                if kind == "extras":
                    head[name] = value
                elif kind in ("A", "B"):
                    other = factors.get(name)
                    a = value if kind == "A" else (other.A if other else torch.empty(0))
                    b = value if kind == "B" else (other.B if other else torch.empty(0))
                    factors[name] = LoraFactors(A=a, B=b)
            local[cid] = ClientState(factors=factors, extras=head)
        return ServerState(
            round_num=int(meta["round"]),
            global_update=global_update,
            extras=extras,
            base_version=int(meta["base_version"]),
            base_delta=base_delta,
            local=local,
            wall_time_s=float(meta.get("wall_time_s", 0.0)),
            optimizer={k[len("opt.") :]: v for k, v in tensors.items() if k.startswith("opt.")},
        )
    except (KeyError, TypeError, ValueError) as err:
        raise CheckpointError(f"checkpoint '{source}' is incomplete: missing {err}") from err
