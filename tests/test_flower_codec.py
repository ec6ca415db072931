"""Flower codec: bit-exact round trips and clear rejection of malformed replies."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, RecordDict

from hlora.aggregation import ClientUpdate, InvalidUpdateError, LoraFactors, LowRankDelta
from hlora.engines.flower.codec import (
    EVAL_REPLY,
    EXTRAS,
    FACTORS,
    INSTRUCTION,
    REPLY,
    TRAIN_METRICS,
    CodecError,
    array_to_tensor,
    decode_eval_instruction,
    decode_eval_reply,
    decode_instruction,
    decode_reply,
    encode_eval_instruction,
    encode_eval_reply,
    encode_instruction,
    encode_reply,
    record_to_tensors,
    tensor_to_array,
    tensors_to_record,
)
from hlora.metrics import EvalCounts
from hlora.protocol import EvalInstruction, EvalReply, TrainInstruction, TrainReply
from hlora.schedule import RoundSchedule
from hlora.server import residual_version

LAYERS = {
    "encoder.layer.0.attention.self.query": (6, 5),
    "encoder.layer.0.attention.self.value": (6, 5),
    "encoder.layer.1.attention.self.query": (7, 4),
}


def _factors(rank: int, seed: int = 0) -> dict[str, LoraFactors]:
    g = torch.Generator().manual_seed(seed)
    return {
        name: LoraFactors(A=torch.randn(rank, i, generator=g), B=torch.randn(o, rank, generator=g))
        for name, (o, i) in LAYERS.items()
    }


def _extras() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return {
        "classifier.weight": torch.randn(2, 6, generator=g),
        "classifier.bias": torch.randn(2, generator=g, dtype=torch.float64),
    }


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)


def _instruction(**kw: object) -> TrainInstruction:
    values: dict[str, object] = {
        "client_id": "client01",
        "round_num": 3,
        "rank": 4,
        "scaling": 2.0,
        "factors": _factors(4),
        "extras": _extras(),
        "init_seed": 123,
        "train_seed": 2**31 - 2,
        "base_version": 0,
        "base_delta": None,
    }
    values.update(kw)
    return TrainInstruction(**values)  # type: ignore[arg-type]


def _assert_instruction_equal(a: TrainInstruction, b: TrainInstruction) -> None:
    for field in ("client_id", "round_num", "rank", "scaling", "init_seed", "train_seed"):
        assert getattr(a, field) == getattr(b, field), field
    assert a.base_version == b.base_version
    assert a.schedule == b.schedule
    assert (a.factors is None) == (b.factors is None)
    if a.factors is not None and b.factors is not None:
        assert set(a.factors) == set(b.factors)
        for name, f in a.factors.items():
            assert _same(f.A, b.factors[name].A) and _same(f.B, b.factors[name].B)
    assert set(a.extras) == set(b.extras)
    for name, t in a.extras.items():
        assert _same(t, b.extras[name])
    assert (a.base_delta is None) == (b.base_delta is None)
    if a.base_delta is not None and b.base_delta is not None:
        assert set(a.base_delta) == set(b.base_delta)
        for name, d in a.base_delta.items():
            e = b.base_delta[name]
            assert _same(d.left, e.left) and _same(d.right, e.right) and d.scale == e.scale
            assert (d.singular_values is None) == (e.singular_values is None)
            if d.singular_values is not None and e.singular_values is not None:
                assert _same(d.singular_values, e.singular_values)


def _through_message(content: RecordDict) -> RecordDict:
    """Content as a receiver sees it after Flower's own (de)serialization."""
    from flwr.common.serde import recorddict_from_proto, recorddict_to_proto

    return recorddict_from_proto(recorddict_to_proto(content))


def test_instruction_round_trip_is_bit_exact() -> None:
    original = _instruction()
    _assert_instruction_equal(original, decode_instruction(encode_instruction(original)))


def test_instruction_without_factors_round_trips() -> None:
    original = _instruction(factors=None, round_num=1)
    decoded = decode_instruction(encode_instruction(original))
    assert decoded.factors is None
    _assert_instruction_equal(original, decoded)


@pytest.mark.parametrize(
    ("factors", "version"),
    [(None, 2), (_factors(4), residual_version(3, 4))],  # flora; a frozen residual
)
def test_instruction_with_a_base_delta_round_trips(
    factors: dict[str, LoraFactors] | None, version: int
) -> None:
    g = torch.Generator().manual_seed(5)
    delta = {
        name: LowRankDelta(
            left=torch.randn(o, 6, generator=g),
            right=torch.randn(6, i, generator=g),
            scale=0.37,
            singular_values=torch.rand(6, generator=g) if k == 0 else None,
        )
        for k, (name, (o, i)) in enumerate(LAYERS.items())
    }
    original = _instruction(factors=factors, base_version=version, base_delta=delta)
    _assert_instruction_equal(original, decode_instruction(encode_instruction(original)))


def test_instruction_schedule_round_trips() -> None:
    schedule = RoundSchedule("cosine", 1.5e-3, 0.1, 0.25, 0.375)
    original = _instruction(schedule=schedule)
    decoded = decode_instruction(_through_message(encode_instruction(original)))
    assert decoded.schedule == schedule
    assert decode_instruction(encode_instruction(_instruction())).schedule is None
    content = encode_instruction(original)
    del content[INSTRUCTION]["lr-end"]
    with pytest.raises(CodecError, match="lr-end"):
        decode_instruction(content)
    with_prior = encode_instruction(_instruction(label_prior=(0.25, 0.75)))
    assert decode_instruction(_through_message(with_prior)).label_prior == (0.25, 0.75)
    with_prior[INSTRUCTION]["label-prior"] = [0.5, float("nan")]
    with pytest.raises(CodecError, match="bad label-prior"):
        decode_instruction(with_prior)
    content = encode_instruction(original)
    content[INSTRUCTION]["lr-start"] = 0.9
    with pytest.raises(CodecError, match="bad learning-rate schedule: need 0 <= start <= end"):
        decode_instruction(content)


def test_round_trip_survives_flower_serialization() -> None:
    original = _instruction()
    content = _through_message(encode_instruction(original))
    _assert_instruction_equal(original, decode_instruction(content))


@pytest.mark.parametrize(
    "dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16, torch.int64]
)
def test_every_dtype_round_trips_bit_exact(dtype: torch.dtype) -> None:
    t = (torch.randn(3, 4) * 100).to(dtype)
    t[0, 0] = float("nan") if dtype.is_floating_point else 7
    back = array_to_tensor(tensor_to_array(t))
    assert back.dtype == dtype and back.shape == t.shape
    assert torch.equal(back.view(torch.uint8), t.view(torch.uint8))


def test_non_contiguous_tensor_round_trips() -> None:
    t = torch.randn(4, 6).t()
    assert _same(array_to_tensor(tensor_to_array(t)), t.contiguous())


def _reply(nan_loss: bool = False) -> TrainReply:
    update = ClientUpdate(
        client_id="client02",
        num_examples=17,
        rank=2,
        scaling=2.0,
        factors=_factors(2, seed=3),
        extras=_extras(),
    )
    return TrainReply(update, math.nan if nan_loss else 0.6931, steps=5, seconds=1.25)


@pytest.mark.parametrize("nan_loss", [False, True])
def test_reply_round_trip_is_bit_exact(nan_loss: bool) -> None:
    original = _reply(nan_loss)
    back = decode_reply(_through_message(encode_reply(original)), "client02")
    u, v = original.update, back.update
    assert (v.client_id, v.num_examples, v.rank, v.scaling) == (
        u.client_id,
        u.num_examples,
        u.rank,
        u.scaling,
    )
    for name, f in u.factors.items():
        assert _same(f.A, v.factors[name].A) and _same(f.B, v.factors[name].B)
    for name, t in u.extras.items():
        assert _same(t, v.extras[name])
    assert back.steps == 5 and back.seconds == 1.25
    assert math.isnan(back.loss) if nan_loss else back.loss == 0.6931


def _broken(edit: str) -> RecordDict:
    content = encode_reply(_reply())
    if edit == "no-factors":
        del content[FACTORS]
    elif edit == "no-metrics":
        del content[TRAIN_METRICS]
    elif edit == "no-key":
        del content[REPLY]["rank"]
    elif edit == "missing-B":
        factors = record_to_tensors(content[FACTORS])
        del factors["encoder.layer.0.attention.self.query/B"]
        content[FACTORS] = tensors_to_record(factors)
    elif edit == "int-factor":
        factors = record_to_tensors(content[FACTORS])
        factors["encoder.layer.0.attention.self.query/A"] = torch.ones(2, 5, dtype=torch.int32)
        content[FACTORS] = tensors_to_record(factors)
    elif edit == "wrong-rank":
        content[REPLY]["rank"] = 3
    elif edit == "garbage":
        content[EXTRAS]["float32"] = Array(
            dtype="float32", shape=(2,), stype="numpy.ndarray", data=b"not an npy"
        )
    elif edit == "layout-garbage":
        content[FACTORS]["hlora.layout"] = Array(np.frombuffer(b"[[1, 2", dtype=np.uint8).copy())
    elif edit == "no-layout":
        del content[FACTORS]["hlora.layout"]
    elif edit == "layout-too-long":  # a shape beyond the data sent
        layout = json.loads(bytes(content[EXTRAS]["hlora.layout"].numpy()))
        layout[0][2] = [1000]
        content[EXTRAS]["hlora.layout"] = Array(
            np.frombuffer(json.dumps(layout).encode(), dtype=np.uint8).copy()
        )
    elif edit == "data-left-over":  # more data than the layout holds
        data = array_to_tensor(content[EXTRAS]["float32"])
        content[EXTRAS]["float32"] = tensor_to_array(torch.cat([data, torch.ones(3)]))
    elif edit == "name-twice":
        layout = json.loads(bytes(content[FACTORS]["hlora.layout"].numpy()))
        layout[1][0] = layout[0][0]
        content[FACTORS]["hlora.layout"] = Array(
            np.frombuffer(json.dumps(layout).encode(), dtype=np.uint8).copy()
        )
    elif edit == "record-type":
        content[EXTRAS] = ConfigRecord({"x": 1})
    elif edit == "no-examples":
        content[TRAIN_METRICS]["num-examples"] = 0
    return content


@pytest.mark.parametrize(
    "edit",
    [
        "no-factors",
        "no-metrics",
        "no-key",
        "missing-B",
        "int-factor",
        "wrong-rank",
        "garbage",
        "record-type",
        "no-examples",
        "layout-garbage",
        "no-layout",
        "layout-too-long",
        "data-left-over",
        "name-twice",
    ],
)
def test_malformed_reply_raises_invalid_update_naming_the_client(edit: str) -> None:
    with pytest.raises(InvalidUpdateError) as info:
        decode_reply(_broken(edit), "client02")
    assert info.value.client_id == "client02"
    assert "client02" in str(info.value)


def test_reply_for_another_client_is_rejected() -> None:
    with pytest.raises(InvalidUpdateError, match="client07"):
        decode_reply(encode_reply(_reply()), "client07")


def test_malformed_instruction_raises_codec_error() -> None:
    content = encode_instruction(_instruction())
    del content[INSTRUCTION]["train-seed"]
    with pytest.raises(CodecError, match="train-seed"):
        decode_instruction(content)
    content = encode_instruction(_instruction())
    del content[FACTORS]
    with pytest.raises(CodecError, match=FACTORS):
        decode_instruction(content)


def test_only_factors_and_head_travel() -> None:
    content = encode_instruction(_instruction())
    assert set(content) == {INSTRUCTION, FACTORS, EXTRAS}
    arrays = content[FACTORS]
    assert isinstance(arrays, ArrayRecord)
    # Packed: one float32 array for every factor, and the layout; whatever the layer count.
    assert set(arrays) == {"float32", "hlora.layout"}
    assert len(record_to_tensors(arrays)) == 2 * len(LAYERS)


def test_a_record_packs_its_tensors_by_dtype_bit_for_bit() -> None:
    g = torch.Generator().manual_seed(3)
    tensors = {
        "a": torch.randn(3, 4, generator=g),
        "b": torch.randn(2, generator=g).to(torch.bfloat16),
        "c": torch.randn(5, 1, generator=g),
        "d": torch.zeros(0, 7),
        "e": torch.tensor(2.5, dtype=torch.float64),
        "f": torch.randn(2, 2, generator=g).to(torch.bfloat16),
    }
    record = _through_message(RecordDict({"r": tensors_to_record(tensors)}))["r"]
    assert set(record) == {"float32", "bfloat16", "float64", "hlora.layout"}
    back = record_to_tensors(record)
    assert list(back) == list(tensors)
    for name, t in tensors.items():
        assert _same(t, back[name]), name
    assert all(t.untyped_storage().nbytes() == t.nbytes for t in back.values())  # no views


# -- federated evaluation ----------------------------------------------------------------------


def _deltas(k: int, seed: int) -> dict[str, LowRankDelta]:
    g = torch.Generator().manual_seed(seed)
    return {
        name: LowRankDelta(
            left=torch.randn(o, k, generator=g),
            right=torch.randn(k, i, generator=g),
            scale=0.5 + j,
            singular_values=torch.rand(k, generator=g) if j == 1 else None,
        )
        for j, (name, (o, i)) in enumerate(LAYERS.items())
    }


@pytest.mark.parametrize("flora", [False, True])
def test_eval_instruction_round_trip_is_bit_exact(flora: bool) -> None:
    original = EvalInstruction(
        client_id="client02",
        round_num=4,
        layers={} if flora else _deltas(5, 1),
        extras=_extras(),
        base_version=3 if flora else 0,
        base_delta=_deltas(7, 2) if flora else None,
    )
    decoded = decode_eval_instruction(_through_message(encode_eval_instruction(original)))
    assert (decoded.client_id, decoded.round_num, decoded.base_version) == (
        "client02",
        4,
        3 * flora,
    )
    for got, want in [(decoded.layers, original.layers), (decoded.base_delta, original.base_delta)]:
        assert (got is None) == (want is None)
        assert sorted(got or {}) == sorted(want or {})
        for name in want or {}:
            a, b = got[name], want[name]  # type: ignore[index]
            assert a.scale == b.scale and _same(a.left, b.left) and _same(a.right, b.right)
            assert (a.singular_values is None) == (b.singular_values is None)
            assert torch.equal(a.dense(), b.dense())
    assert all(_same(decoded.extras[k], v) for k, v in original.extras.items())


def _eval_reply(**kw: object) -> RecordDict:
    values: dict[str, object] = {
        "client_id": "client01",
        "num_examples": 9,
        "counts": EvalCounts(((4, 1), (2, 2)), loss_sum=5.25, loss_count=9),
        "seconds": 0.5,
    }
    values.update(kw)
    return encode_eval_reply(EvalReply(**values))  # type: ignore[arg-type]


def test_eval_reply_round_trip_is_bit_exact() -> None:
    got = decode_eval_reply(_through_message(_eval_reply()), "client01", 2, 9, counted=True)
    assert got == EvalReply("client01", 9, EvalCounts(((4, 1), (2, 2)), 5.25, 9), 0.5)
    free_form = _eval_reply(counts=EvalCounts(((0, 0), (0, 0)), 31.5, 70))
    assert decode_eval_reply(free_form, "client01", 2, 9, counted=False).counts.loss_count == 70


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda c: c.__delitem__(EVAL_REPLY), "malformed evaluation: message has no"),
        (lambda c: c[EVAL_REPLY].__setitem__("client-id", "client07"), "is for client"),
        (lambda c: c[EVAL_REPLY].__setitem__("num-examples", 2**62), "declared 9 at join"),
        (lambda c: c[EVAL_REPLY].__setitem__("num-labels", 3), "expected 2 x 2"),
        (lambda c: c[EVAL_REPLY].__setitem__("confusion", [4, 1, 2]), "expected 2 x 2"),
        (lambda c: c[EVAL_REPLY].__setitem__("confusion", [6, -1, 2, 2]), "integers >= 0"),
        (lambda c: c[EVAL_REPLY].__setitem__("confusion", [9, 9, 9, 9]), "add up to 36, not 9"),
        (lambda c: c[EVAL_REPLY].__setitem__("loss-sum", float("nan")), "bad loss record"),
        (lambda c: c[EVAL_REPLY].__setitem__("loss-sum", -1.0), "bad loss record"),
        (lambda c: c[EVAL_REPLY].__setitem__("loss-count", "9"), "loss-count"),
    ],
)
def test_a_bad_evaluation_reply_is_rejected_naming_the_client(edit, message: str) -> None:  # type: ignore[no-untyped-def]
    content = _eval_reply()
    edit(content)
    with pytest.raises(InvalidUpdateError, match=message) as err:
        decode_eval_reply(content, "client01", 2, 9, counted=True)
    assert err.value.client_id == "client01"


def test_a_free_form_evaluation_counts_no_examples() -> None:
    with pytest.raises(InvalidUpdateError, match="add up to 9, not 0"):
        decode_eval_reply(_eval_reply(), "client01", 2, 9, counted=False)


def _moments_reply() -> RecordDict:
    from hlora.calibration import ClassMoments
    from hlora.engines.flower.codec import encode_moments_reply
    from hlora.protocol import MomentsReply

    x = torch.randn(9, 3, generator=torch.Generator().manual_seed(0))
    moments = ClassMoments.of(x, torch.tensor([0, 1, 1] * 3), 2)
    return encode_moments_reply(MomentsReply("client01", moments, 0.25))


def test_moments_reply_round_trip_is_bit_exact() -> None:
    from hlora.engines.flower.codec import decode_moments_reply

    sent = _moments_reply()
    got = decode_moments_reply(_through_message(sent), "client01")
    again = decode_moments_reply(sent, "client01")
    assert got.client_id == "client01" and got.seconds == 0.25
    for name in ("count", "mean", "cov"):
        value = getattr(got.moments, name)
        assert value.dtype == torch.float64 and torch.equal(value, getattr(again.moments, name))
    assert got.moments.count.tolist() == [3.0, 6.0]


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda c: c.__delitem__("hlora.moments"), "malformed moments: message has no"),
        (lambda c: c.__delitem__("hlora.moments-arrays"), "malformed moments: message has no"),
        (lambda c: c["hlora.moments"].__setitem__("client-id", "client07"), "is for client"),
        (lambda c: c["hlora.moments"].__setitem__("seconds", "soon"), "seconds"),
        (
            lambda c: c.__setitem__(
                "hlora.moments-arrays", tensors_to_record({"count": torch.ones(2)})
            ),
            "moments without mean, cov",
        ),
    ],
)
def test_a_malformed_moments_reply_is_rejected_naming_the_client(edit, message: str) -> None:  # type: ignore[no-untyped-def]
    from hlora.engines.flower.codec import decode_moments_reply

    content = _moments_reply()
    edit(content)
    with pytest.raises(InvalidUpdateError, match=message) as err:
        decode_moments_reply(content, "client01")
    assert err.value.client_id == "client01"
