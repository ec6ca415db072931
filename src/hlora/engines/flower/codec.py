"""Flower message content for hlora's protocol: pure, bit-exact encode/decode functions.

Only the LoRA factors, the head (``extras``) and, for ``flora``, the cumulative base update
travel; the backbone never does. Layout of a :class:`~flwr.app.RecordDict`:

Instruction (server -> client)::

    "hlora.instruction"  ConfigRecord  client-id, round, rank, scaling, init-seed, train-seed,
                                       base-version, has-factors, has-base-delta,
                                       base-delta-scales (one per base-delta layer, sorted)
    "hlora.factors"      ArrayRecord   "<layer>/A" (r, in), "<layer>/B" (out, r)
    "hlora.extras"       ArrayRecord   head name -> tensor
    "hlora.base-delta"   ArrayRecord   "<layer>/left" (out, k), "<layer>/right" (k, in),
                                       optional "<layer>/S" (k,)   (only with has-base-delta)

Reply (client -> server)::

    "hlora.reply"        ConfigRecord  client-id, rank, scaling
    "hlora.train"        MetricRecord  num-examples, loss, steps, seconds
    "hlora.factors", "hlora.extras"    as above

EVALUATE (server -> node: the global model, to evaluate on the node's held-out data)::

    "hlora.evaluate"     ConfigRecord  client-id, round, base-version, has-base-delta,
                                       base-delta-scales, layer-scales (one per layer, sorted)
    "hlora.model"        ArrayRecord   "<layer>/left" (out, k), "<layer>/right" (k, in),
                                       optional "<layer>/S" (k,)
    "hlora.extras", "hlora.base-delta" as in an instruction

EVALUATE reply (node -> server)::

    "hlora.eval"         ConfigRecord  client-id, num-examples, num-labels, confusion
                                       (row-major [true][predicted] counts), loss-sum,
                                       loss-count, seconds

QUERY "moments" (server -> node: the final global model, for the head's calibration): as an
EVALUATE message. Its reply (node -> server)::

    "hlora.moments"         ConfigRecord  client-id, seconds
    "hlora.moments-arrays"  ArrayRecord   "count" (C,), "mean" (C, d), "cov" (C, d, d)

QUERY (server -> node), and beside the instruction in every TRAIN and EVALUATE message::

    "hlora.run"          ConfigRecord  config (TOML), model-sha256, model-is-folder,
                                       fingerprint, model, task, target-modules, scaling, ranks

QUERY reply (node -> server)::

    "hlora.node"         ConfigRecord  data-mode, partition-id, num-partitions, num-examples,
                                       label-counts, eval-examples, rank, memory-mb; or only
                                       refused (one line: why not)

Each ``ArrayRecord`` above is packed (:func:`tensors_to_record`): the named tensors of one
dtype travel flattened into one array named after the dtype (``"float32"``, ...), and
``"hlora.layout"`` (UTF-8 JSON bytes) lists each tensor's name, dtype and shape, so a message
holds a few arrays whatever the number of layers. Arrays travel as :class:`~flwr.app.Array` in
NumPy's ``.npy`` form (Flower's own), except ``bfloat16``, which NumPy lacks: its raw
little-endian bytes travel with ``stype = "torch.raw"``. Either way the decoded tensor has the
sent dtype, shape and bits.

A malformed reply (missing record or key, wrong dtype or shape, unreadable bytes) raises
:class:`hlora.aggregation.InvalidUpdateError` naming the client, so the round loop drops it.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, MetricRecord, RecordDict
from torch import Tensor

from hlora.aggregation import ClientUpdate, InvalidUpdateError, LoraFactors, LowRankDelta
from hlora.calibration import ClassMoments
from hlora.errors import HloraError
from hlora.metrics import EvalCounts
from hlora.protocol import EvalInstruction, EvalReply, MomentsReply, TrainInstruction, TrainReply
from hlora.schedule import RoundSchedule

INSTRUCTION = "hlora.instruction"
REPLY = "hlora.reply"
TRAIN_METRICS = "hlora.train"
FACTORS = "hlora.factors"
EXTRAS = "hlora.extras"
BASE_DELTA = "hlora.base-delta"
EVALUATE = "hlora.evaluate"
MODEL = "hlora.model"
EVAL_REPLY = "hlora.eval"
MOMENTS = "hlora.moments"
MOMENTS_ARRAYS = "hlora.moments-arrays"
NODE_INFO = "hlora.node"
"""The QUERY reply's ConfigRecord (see :func:`hlora.engines.flower.node.node_info`)."""
RUN = "hlora.run"
"""The run's configuration and fingerprint, in QUERY and TRAIN messages (see ``manifest``)."""

_RAW_STYPE = "torch.raw"
_SEP = "/"
_LAYOUT = "hlora.layout"


class CodecError(HloraError):
    """Message content that cannot be decoded (missing key, wrong type or dtype)."""


# -- tensors <-> Array ---------------------------------------------------------------------


def tensor_to_array(tensor: Tensor) -> Array:
    """One tensor as a Flower :class:`Array` (bit-exact; any dtype NumPy or torch knows).

    Args:
        tensor: Any shape; it is detached and copied to the CPU.

    Returns:
        An ``Array`` with ``.npy`` bytes (``stype = "numpy.ndarray"``), or raw bytes with
        ``stype = "torch.raw"`` and ``dtype = "bfloat16"`` for bfloat16 tensors.
    """
    t = tensor.detach().cpu()
    if t.dtype == torch.bfloat16:
        raw = t.contiguous().view(torch.int16).numpy().astype("<i2", copy=False).tobytes()
        return Array(dtype="bfloat16", shape=tuple(t.shape), stype=_RAW_STYPE, data=raw)
    return Array(t.numpy())


def array_to_tensor(array: Array) -> Tensor:
    """The tensor an :class:`Array` holds (inverse of :func:`tensor_to_array`).

    Raises:
        CodecError: Unknown serialization type or unreadable bytes.
    """
    try:
        if array.stype == _RAW_STYPE:
            if array.dtype != "bfloat16":
                raise CodecError(f"raw array of dtype {array.dtype!r} (only bfloat16 is raw)")
            ints = np.frombuffer(array.data, dtype="<i2").astype(np.int16, copy=True)
            return torch.from_numpy(ints).view(torch.bfloat16).reshape(tuple(array.shape))
        return torch.from_numpy(np.array(array.numpy(), copy=True))
    except CodecError:
        raise
    except (TypeError, ValueError, RuntimeError, OSError) as err:
        raise CodecError(f"unreadable array ({array.stype}, {array.dtype}): {err}") from err


def tensors_to_record(tensors: Mapping[str, Tensor]) -> ArrayRecord:
    """Name -> tensor as a packed :class:`ArrayRecord`: the tensors of each dtype flattened
    into one array named after the dtype, and ``hlora.layout`` (UTF-8 JSON bytes) listing each
    tensor's name, dtype and shape in order.

    Flower moves every array of a message as its own object, one request per object on each
    hop (SuperLink, SuperNode, ClientApp); an LLM's 210 adapted layers would be 420 factor
    arrays. Packed, a message holds a few arrays whatever the number of layers.
    """
    layout = []
    groups: dict[torch.dtype, list[Tensor]] = {}
    for name, tensor in tensors.items():
        t = tensor.detach().cpu()
        layout.append([name, _dtype_name(t.dtype), list(t.shape)])
        groups.setdefault(t.dtype, []).append(t.reshape(-1))
    record = ArrayRecord(
        {_dtype_name(dtype): tensor_to_array(torch.cat(parts)) for dtype, parts in groups.items()}
    )
    record[_LAYOUT] = Array(np.frombuffer(json.dumps(layout).encode(), dtype=np.uint8).copy())
    return record


def record_to_tensors(record: ArrayRecord) -> dict[str, Tensor]:
    """Inverse of :func:`tensors_to_record` (bit for bit; insertion order kept).

    Raises:
        CodecError: No layout, or one that does not describe the arrays (an unknown dtype, a
            name twice, sizes that do not add up), or an array that cannot be read.
    """
    layout_array = record.get(_LAYOUT)
    if not isinstance(layout_array, Array):
        raise CodecError(f"array record without its {_LAYOUT!r}")
    try:
        layout = json.loads(array_to_tensor(layout_array).numpy().tobytes().decode())
        entries = [(str(n), str(d), [int(x) for x in shape]) for n, d, shape in layout]
    except (ValueError, TypeError, UnicodeDecodeError) as err:
        raise CodecError(f"unreadable {_LAYOUT!r}: {err}") from err
    if len({name for name, _, _ in entries}) != len(entries):
        raise CodecError(f"{_LAYOUT!r} names a tensor twice")
    flat: dict[str, Tensor] = {}
    offsets: dict[str, int] = {}
    out = {}
    for name, dtype, shape in entries:
        if dtype not in flat:
            value = record.get(dtype)
            if not isinstance(value, Array):
                raise CodecError(f"no {dtype!r} array for tensor {name!r}")
            flat[dtype] = array_to_tensor(value).reshape(-1)
            if _dtype_name(flat[dtype].dtype) != dtype:
                raise CodecError(f"the {dtype!r} array holds {flat[dtype].dtype}")
            offsets[dtype] = 0
        if any(x < 0 for x in shape):
            raise CodecError(f"tensor {name!r} of shape {shape}")
        size = math.prod(shape)
        start = offsets[dtype]
        if start + size > flat[dtype].numel():
            raise CodecError(f"the {dtype!r} array ends before tensor {name!r}")
        # A copy of its own: a view would keep the whole array alive, and safetensors refuses
        # to save tensors that share memory (a checkpoint may hold a decoded tensor).
        out[name] = flat[dtype][start : start + size].reshape(shape).clone()
        offsets[dtype] = start + size
    extra = set(record) - set(flat) - {_LAYOUT}
    left = {d: flat[d].numel() - offsets[d] for d in flat if flat[d].numel() != offsets[d]}
    if extra or left:
        raise CodecError(f"array record with data no tensor of {_LAYOUT!r} holds: {extra or left}")
    return out


def _dtype_name(dtype: torch.dtype) -> str:
    """``torch.float32`` -> ``"float32"``."""
    return str(dtype).removeprefix("torch.")


def _factors_to_record(factors: Mapping[str, LoraFactors]) -> ArrayRecord:
    flat: dict[str, Tensor] = {}
    for name, f in factors.items():
        flat[f"{name}{_SEP}A"] = f.A
        flat[f"{name}{_SEP}B"] = f.B
    return tensors_to_record(flat)


def _record_to_factors(record: ArrayRecord) -> dict[str, LoraFactors]:
    flat = record_to_tensors(record)
    layers = sorted({key.rsplit(_SEP, 1)[0] for key in flat})
    out = {}
    for name in layers:
        a, b = flat.get(f"{name}{_SEP}A"), flat.get(f"{name}{_SEP}B")
        if a is None or b is None:
            raise CodecError(f"layer {name!r} lacks its {'A' if a is None else 'B'} factor")
        out[name] = LoraFactors(A=a, B=b)
    unexpected = set(flat) - {f"{n}{_SEP}{p}" for n in layers for p in "AB"}
    if unexpected:
        raise CodecError(f"unexpected factor keys {sorted(unexpected)[:3]}")
    return out


def _base_delta_to_record(delta: Mapping[str, LowRankDelta]) -> tuple[ArrayRecord, list[float]]:
    flat: dict[str, Tensor] = {}
    scales = []
    for name in sorted(delta):
        d = delta[name]
        flat[f"{name}{_SEP}left"] = d.left
        flat[f"{name}{_SEP}right"] = d.right
        if d.singular_values is not None:
            flat[f"{name}{_SEP}S"] = d.singular_values
        scales.append(float(d.scale))
    return tensors_to_record(flat), scales


def _record_to_base_delta(record: ArrayRecord, scales: list[float]) -> dict[str, LowRankDelta]:
    flat = record_to_tensors(record)
    layers = sorted({key.rsplit(_SEP, 1)[0] for key in flat})
    if len(scales) != len(layers):
        raise CodecError(f"{len(layers)} base-delta layers but {len(scales)} scales")
    out = {}
    for name, scale in zip(layers, scales, strict=True):
        left, right = flat.get(f"{name}{_SEP}left"), flat.get(f"{name}{_SEP}right")
        if left is None or right is None:
            raise CodecError(f"base-delta layer {name!r} lacks a factor")
        out[name] = LowRankDelta(
            left=left, right=right, scale=scale, singular_values=flat.get(f"{name}{_SEP}S")
        )
    return out


# -- records access with clear errors ------------------------------------------------------


def _decode_base_delta(
    cfg: Mapping[str, Any], content: RecordDict
) -> dict[str, LowRankDelta] | None:
    """The ``flora`` base delta of an instruction or evaluation, if it has one."""
    if not _value(cfg, "has-base-delta", bool):
        return None
    scales = [float(s) for s in _value(cfg, "base-delta-scales", list)]
    return _record_to_base_delta(_get(content, BASE_DELTA, ArrayRecord), scales)


def _get(content: RecordDict, key: str, kind: type) -> Any:
    if key not in content:
        raise CodecError(f"message has no {key!r} record (has: {sorted(content)})")
    record = content[key]
    if not isinstance(record, kind):
        raise CodecError(f"record {key!r} is a {type(record).__name__}, not a {kind.__name__}")
    return record


def _value(record: Mapping[str, Any], key: str, kind: type | tuple[type, ...]) -> Any:
    if key not in record:
        raise CodecError(f"missing key {key!r}")
    value = record[key]
    if isinstance(value, bool) and kind in (int, float, (int, float)):
        raise CodecError(f"key {key!r} is a bool, expected {kind}")
    if not isinstance(value, kind):
        raise CodecError(f"key {key!r} is a {type(value).__name__}, expected {kind}")
    return value


# -- instructions ----------------------------------------------------------------------------


_SCHEDULE_KEYS = ("lr-peak", "lr-warmup", "lr-start", "lr-end")


def encode_instruction(instruction: TrainInstruction) -> RecordDict:
    """A :class:`TrainInstruction` as message content (see the module docstring)."""
    config: dict[str, Any] = {
        "client-id": instruction.client_id,
        "round": int(instruction.round_num),
        "rank": int(instruction.rank),
        "scaling": float(instruction.scaling),
        "init-seed": int(instruction.init_seed),
        "train-seed": int(instruction.train_seed),
        "base-version": int(instruction.base_version),
        "has-factors": instruction.factors is not None,
        "has-base-delta": instruction.base_delta is not None,
    }
    if instruction.label_prior is not None:
        config["label-prior"] = [float(x) for x in instruction.label_prior]
    if instruction.schedule is not None:
        sched = instruction.schedule
        config["lr-schedule"] = sched.schedule
        config["lr-peak"] = float(sched.peak)
        config["lr-warmup"] = float(sched.warmup_ratio)
        config["lr-start"], config["lr-end"] = float(sched.start), float(sched.end)
    records: dict[str, Any] = {
        FACTORS: _factors_to_record(instruction.factors or {}),
        EXTRAS: tensors_to_record(instruction.extras),
    }
    if instruction.base_delta is not None:
        records[BASE_DELTA], scales = _base_delta_to_record(instruction.base_delta)
        config["base-delta-scales"] = scales
    records[INSTRUCTION] = ConfigRecord(config)
    return RecordDict(records)


def decode_instruction(content: RecordDict) -> TrainInstruction:
    """Inverse of :func:`encode_instruction`.

    Raises:
        CodecError: Missing records or keys, wrong types, unreadable arrays.
    """
    cfg = _get(content, INSTRUCTION, ConfigRecord)
    factors = None
    if _value(cfg, "has-factors", bool):
        factors = _record_to_factors(_get(content, FACTORS, ArrayRecord))
    base_delta = _decode_base_delta(cfg, content)
    prior = None
    if "label-prior" in cfg:
        values = _value(cfg, "label-prior", list)
        if not values or not all(
            isinstance(x, float) and math.isfinite(x) and 0 < x <= 1 for x in values
        ):
            raise CodecError(f"bad label-prior {values!r}: expected probabilities in (0, 1]")
        prior = tuple(values)
    schedule = None
    if "lr-schedule" in cfg:
        try:
            schedule = RoundSchedule(
                _value(cfg, "lr-schedule", str),
                *(float(_value(cfg, k, (int, float))) for k in _SCHEDULE_KEYS),
            )
        except ValueError as err:
            raise CodecError(f"bad learning-rate schedule: {err}") from err
    return TrainInstruction(
        client_id=_value(cfg, "client-id", str),
        round_num=_value(cfg, "round", int),
        rank=_value(cfg, "rank", int),
        scaling=float(_value(cfg, "scaling", (int, float))),
        factors=factors,
        extras=record_to_tensors(_get(content, EXTRAS, ArrayRecord)),
        init_seed=_value(cfg, "init-seed", int),
        train_seed=_value(cfg, "train-seed", int),
        base_version=_value(cfg, "base-version", int),
        base_delta=base_delta,
        schedule=schedule,
        label_prior=prior,
    )


# -- replies -----------------------------------------------------------------------------------


def encode_reply(reply: TrainReply) -> RecordDict:
    """A :class:`TrainReply` as message content (see the module docstring)."""
    u = reply.update
    return RecordDict(
        {
            REPLY: ConfigRecord(
                {"client-id": u.client_id, "rank": int(u.rank), "scaling": float(u.scaling)}
            ),
            TRAIN_METRICS: MetricRecord(
                {
                    "num-examples": int(u.num_examples),
                    "loss": float(reply.loss),
                    "steps": int(reply.steps),
                    "seconds": float(reply.seconds),
                }
            ),
            FACTORS: _factors_to_record(u.factors),
            EXTRAS: tensors_to_record(u.extras),
        }
    )


def decode_reply(content: RecordDict, client_id: str) -> TrainReply:
    """Inverse of :func:`encode_reply`, with structural checks.

    Args:
        content: The reply message's content.
        client_id: The client the server expects this reply from (the node's client id).

    Raises:
        InvalidUpdateError: Naming ``client_id``: a missing record or key, a reply for another
            client, non-floating tensors, factors that are not ``A (r, in)`` / ``B (out, r)``
            of the declared rank, or unreadable bytes.
    """
    try:
        cfg = _get(content, REPLY, ConfigRecord)
        metrics = _get(content, TRAIN_METRICS, MetricRecord)
        sender = _value(cfg, "client-id", str)
        if sender != client_id:
            raise CodecError(f"reply is for client {sender!r}")
        rank = _value(cfg, "rank", int)
        factors = _record_to_factors(_get(content, FACTORS, ArrayRecord))
        extras = record_to_tensors(_get(content, EXTRAS, ArrayRecord))
        num_examples = _value(metrics, "num-examples", int)
        loss = float(_value(metrics, "loss", (int, float)))
        steps = _value(metrics, "steps", int)
        seconds = float(_value(metrics, "seconds", (int, float)))
        scaling = float(_value(cfg, "scaling", (int, float)))
    except CodecError as err:
        raise InvalidUpdateError(client_id, f"malformed reply: {err}") from err
    for name, f in factors.items():
        for part, t in (("A", f.A), ("B", f.B)):
            if not t.is_floating_point():
                raise InvalidUpdateError(client_id, f"factor {name}/{part} has dtype {t.dtype}")
        if f.A.dim() != 2 or f.B.dim() != 2 or f.A.shape[0] != rank or f.B.shape[1] != rank:
            raise InvalidUpdateError(
                client_id,
                f"factors of {name!r} are A {tuple(f.A.shape)}, B {tuple(f.B.shape)}: "
                f"expected A (r, in), B (out, r) with r = {rank}",
            )
    for name, t in extras.items():
        if not t.is_floating_point():
            raise InvalidUpdateError(client_id, f"head tensor {name!r} has dtype {t.dtype}")
    if num_examples < 1:
        raise InvalidUpdateError(client_id, f"num-examples is {num_examples}, expected >= 1")
    if not math.isfinite(seconds) or steps < 0:
        raise InvalidUpdateError(client_id, f"bad training record: {steps} steps, {seconds} s")
    update = ClientUpdate(
        client_id=client_id,
        num_examples=num_examples,
        rank=rank,
        scaling=scaling,
        factors=factors,
        extras=extras,
    )
    return TrainReply(update=update, loss=loss, steps=steps, seconds=seconds)


# -- federated evaluation ----------------------------------------------------------------------


def encode_eval_instruction(instruction: EvalInstruction) -> RecordDict:
    """An :class:`EvalInstruction` as message content (see the module docstring)."""
    model, scales = _base_delta_to_record(instruction.layers)
    config: dict[str, Any] = {
        "client-id": instruction.client_id,
        "round": int(instruction.round_num),
        "base-version": int(instruction.base_version),
        "has-base-delta": instruction.base_delta is not None,
        "layer-scales": scales,
    }
    records: dict[str, Any] = {MODEL: model, EXTRAS: tensors_to_record(instruction.extras)}
    if instruction.base_delta is not None:
        records[BASE_DELTA], config["base-delta-scales"] = _base_delta_to_record(
            instruction.base_delta
        )
    records[EVALUATE] = ConfigRecord(config)
    return RecordDict(records)


def decode_eval_instruction(content: RecordDict) -> EvalInstruction:
    """Inverse of :func:`encode_eval_instruction`.

    Raises:
        CodecError: Missing records or keys, wrong types, unreadable arrays.
    """
    cfg = _get(content, EVALUATE, ConfigRecord)
    scales = [float(x) for x in _value(cfg, "layer-scales", list)]
    layers = _record_to_base_delta(_get(content, MODEL, ArrayRecord), scales)
    base_delta = _decode_base_delta(cfg, content)
    return EvalInstruction(
        client_id=_value(cfg, "client-id", str),
        round_num=_value(cfg, "round", int),
        layers=layers,
        extras=record_to_tensors(_get(content, EXTRAS, ArrayRecord)),
        base_version=_value(cfg, "base-version", int),
        base_delta=base_delta,
    )


def encode_eval_reply(reply: EvalReply) -> RecordDict:
    """An :class:`EvalReply` as message content (see the module docstring)."""
    confusion = reply.counts.confusion
    return RecordDict(
        {
            EVAL_REPLY: ConfigRecord(
                {
                    "client-id": reply.client_id,
                    "num-examples": int(reply.num_examples),
                    "num-labels": len(confusion),
                    "confusion": [int(v) for row in confusion for v in row],
                    "loss-sum": float(reply.counts.loss_sum),
                    "loss-count": int(reply.counts.loss_count),
                    "seconds": float(reply.seconds),
                }
            )
        }
    )


def decode_eval_reply(
    content: RecordDict, client_id: str, num_labels: int, num_examples: int, counted: bool
) -> EvalReply:
    """Inverse of :func:`encode_eval_reply`, checked against what the node declared at join time.

    Args:
        content: The reply message's content.
        client_id: The client the server expects this reply from.
        num_labels: The task's label count.
        num_examples: The held-out examples the node declared in the QUERY round.
        counted: Whether every example is counted in the confusion (a labelled task; free-form
            instructions count none: their loss is per token).

    Raises:
        InvalidUpdateError: Naming ``client_id``: a missing record or key, a reply for another
            client, another example count than declared, counts that are negative, of another
            shape or that do not add up to the example count, or a loss that is not finite.
    """
    try:
        cfg = _get(content, EVAL_REPLY, ConfigRecord)
        sender = _value(cfg, "client-id", str)
        if sender != client_id:
            raise CodecError(f"reply is for client {sender!r}")
        examples = _value(cfg, "num-examples", int)
        labels = _value(cfg, "num-labels", int)
        flat = _value(cfg, "confusion", list)
        loss_sum = float(_value(cfg, "loss-sum", (int, float)))
        loss_count = _value(cfg, "loss-count", int)
        seconds = float(_value(cfg, "seconds", (int, float)))
    except CodecError as err:
        raise InvalidUpdateError(client_id, f"malformed evaluation: {err}") from err
    if examples != num_examples:
        raise InvalidUpdateError(
            client_id, f"evaluated {examples} examples, declared {num_examples} at join time"
        )
    if labels != num_labels or len(flat) != num_labels * num_labels:
        raise InvalidUpdateError(
            client_id,
            f"confusion of {len(flat)} counts for {labels} labels: expected "
            f"{num_labels} x {num_labels}",
        )
    if not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in flat):
        raise InvalidUpdateError(client_id, "confusion counts must be integers >= 0")
    expected = num_examples if counted else 0  # free-form answers count no labels
    if sum(flat) != expected:
        raise InvalidUpdateError(
            client_id, f"confusion counts add up to {sum(flat)}, not {expected}"
        )
    if not (math.isfinite(loss_sum) and loss_sum >= 0 and loss_count >= 0 and seconds >= 0):
        raise InvalidUpdateError(
            client_id, f"bad loss record: sum {loss_sum} over {loss_count} terms, {seconds} s"
        )
    confusion = tuple(tuple(flat[i * labels : (i + 1) * labels]) for i in range(labels))
    return EvalReply(client_id, examples, EvalCounts(confusion, loss_sum, loss_count), seconds)


def encode_moments_reply(reply: MomentsReply) -> RecordDict:
    """A :class:`MomentsReply` as message content (see the module docstring)."""
    m = reply.moments
    return RecordDict(
        {
            MOMENTS: ConfigRecord({"client-id": reply.client_id, "seconds": float(reply.seconds)}),
            MOMENTS_ARRAYS: tensors_to_record({"count": m.count, "mean": m.mean, "cov": m.cov}),
        }
    )


def decode_moments_reply(content: RecordDict, client_id: str) -> MomentsReply:
    """Inverse of :func:`encode_moments_reply`. What the moments hold (shapes, finiteness,
    class counts) is checked by the round loop (:func:`hlora.calibration.check_moments`),
    whatever the engine.

    Raises:
        InvalidUpdateError: Naming ``client_id``: a missing record, key or tensor, a reply for
            another client, unreadable arrays.
    """
    try:
        cfg = _get(content, MOMENTS, ConfigRecord)
        sender = _value(cfg, "client-id", str)
        if sender != client_id:
            raise CodecError(f"reply is for client {sender!r}")
        seconds = float(_value(cfg, "seconds", (int, float)))
        tensors = record_to_tensors(_get(content, MOMENTS_ARRAYS, ArrayRecord))
        missing = [k for k in ("count", "mean", "cov") if k not in tensors]
        if missing:
            raise CodecError(f"moments without {', '.join(missing)}")
    except CodecError as err:
        raise InvalidUpdateError(client_id, f"malformed moments: {err}") from err
    moments = ClassMoments(tensors["count"], tensors["mean"], tensors["cov"])
    return MomentsReply(client_id, moments, seconds)


def content_bytes(content: RecordDict) -> int:
    """Bytes of the arrays in a message's content (``.npy`` headers included)."""
    return sum(
        record.count_bytes() for record in content.values() if isinstance(record, ArrayRecord)
    )
