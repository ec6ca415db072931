"""The server trusts nothing a client says: screening of replies and of the new global state.

Pure checks against fp64 dense references, then the round loop driven by a fake transport (no
data files, no model): every hostile reply is dropped with its reason, and the honest clients'
result equals a run without the hostile one.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Callable, Sequence
from pathlib import Path

import pytest
import torch

from hlora.aggregation import (
    AggregationOptions,
    ClientUpdate,
    GlobalUpdate,
    InvalidUpdateError,
    LoraFactors,
    LowRankDelta,
    UpdateSpec,
)
from hlora.checkpoint import ServerState
from hlora.config import TrustConfig, fingerprint, load_config
from hlora.errors import ConfigError
from hlora.federation import loop_settings
from hlora.protocol import RoundResult, TrainInstruction, TrainReply
from hlora.report import MetricsLog, RoundProgress
from hlora.server import ClientSlot, FederationError, LoopSettings, RoundLoop
from hlora.trust import (
    Screened,
    TrustPolicy,
    nonfinite_state,
    product_norm_sq,
    screen_update,
    update_norm,
)

SPEC = UpdateSpec(layers={"q": (6, 5), "v": (7, 4)}, extras={"head": (3,)})
SCALING = 2.0


def _factors(rank: int, seed: int, dtype: torch.dtype = torch.float32) -> dict[str, LoraFactors]:
    gen = torch.Generator().manual_seed(seed)
    return {
        name: LoraFactors(
            A=torch.randn(rank, n_in, generator=gen, dtype=dtype),
            B=torch.randn(n_out, rank, generator=gen, dtype=dtype),
        )
        for name, (n_out, n_in) in SPEC.layers.items()
    }


def _update(cid: str, rank: int = 2, n: int = 10, seed: int = 0, **changes: object) -> ClientUpdate:
    update = ClientUpdate(
        client_id=cid,
        num_examples=n,
        rank=rank,
        scaling=SCALING,
        factors=_factors(rank, seed),
        extras={"head": torch.full((3,), float(seed))},
    )
    return dataclasses.replace(update, **changes)  # type: ignore[arg-type]


def _dense_norm(factors: dict[str, LoraFactors], scaling: float) -> float:
    total = sum(
        float(torch.linalg.matrix_norm(scaling * (f.B.double() @ f.A.double())) ** 2)
        for f in factors.values()
    )
    return math.sqrt(total)


# -- the norm from Gram products against the dense fp64 norm --------------------------------------


@pytest.mark.parametrize("rank", [1, 3, 8])
def test_gram_norm_equals_the_dense_norm(rank: int) -> None:
    factors = _factors(rank, seed=rank, dtype=torch.float64)
    got = update_norm(factors, 0.5)
    torch.testing.assert_close(
        torch.tensor(got), torch.tensor(_dense_norm(factors, 0.5)), rtol=1e-12, atol=0.0
    )
    f = factors["q"]
    dense = float(torch.linalg.matrix_norm(f.B @ f.A) ** 2)
    torch.testing.assert_close(
        torch.tensor(product_norm_sq(f.B, f.A)), torch.tensor(dense), rtol=1e-12, atol=0.0
    )


def test_gram_norm_of_fp32_factors_is_computed_in_fp64() -> None:
    big = {"q": LoraFactors(A=torch.full((2, 5), 1e30), B=torch.full((6, 2), 1e30))}
    v = float(big["q"].A[0, 0])  # 1e30 as fp32 holds it
    # ||B A||_F = 2 v^2 sqrt(30) ~ 1e61: far beyond fp32, exact to rounding in fp64.
    assert math.isclose(update_norm(big, 1.0), 2 * v * v * math.sqrt(30), rel_tol=1e-12)


# -- screening one reply --------------------------------------------------------------------------


def _screen(
    update: ClientUpdate, policy: TrustPolicy | None = None, accepted: int = 10
) -> Screened:
    return screen_update(
        update,
        accepted_examples=accepted,
        scaling=SCALING,
        rank=2,
        spec=SPEC,
        policy=policy or TrustPolicy(),
    )


def test_an_honest_update_passes_unchanged() -> None:
    update = _update("c0")
    screened = _screen(update)
    assert screened.update.num_examples == 10 and not screened.clipped
    assert screened.norm is None  # no bound: no norm computed
    for name, f in update.factors.items():
        assert torch.equal(screened.update.factors[name].A, f.A)
        assert torch.equal(screened.update.factors[name].B, f.B)


@pytest.mark.parametrize(
    ("changes", "reason"),
    [
        (
            {"num_examples": 2**62},
            r"claims 4611686018427387904 training examples; .* with 10",
        ),
        ({"num_examples": 9}, "claims 9 training examples"),
        ({"scaling": 4.0}, r"scaling 4.0 is not the run's 2.0"),
        ({"rank": 4, "factors": _factors(4, 0)}, "rank 4 differs from the assigned rank 2"),
        ({"extras": {"head": torch.tensor([0.0, float("nan"), 0.0])}}, "non-finite"),
        ({"factors": {"q": _factors(2, 0)["q"]}}, r"missing layers \['v'\]"),
    ],
)
def test_a_hostile_reply_is_dropped_with_its_reason(changes: dict, reason: str) -> None:
    with pytest.raises(InvalidUpdateError, match=reason) as caught:
        _screen(_update("c0", **changes))
    assert caught.value.client_id == "c0"


def test_fp64_values_beyond_fp32_are_dropped_not_rounded_to_inf() -> None:
    factors = _factors(2, 0, dtype=torch.float64)
    factors["q"] = LoraFactors(A=factors["q"].A * 1e300, B=factors["q"].B)
    with pytest.raises(InvalidUpdateError, match=r"overflows the server's torch\.float32"):
        _screen(_update("c0", factors=factors))


def test_the_server_holds_updates_in_its_own_precision() -> None:
    update = _update("c0", factors=_factors(2, 0, dtype=torch.float64))
    screened = _screen(update).update
    assert {f.A.dtype for f in screened.factors.values()} == {torch.float32}
    assert screened.extras["head"].dtype == torch.float32


def test_the_example_cap_limits_the_weight_not_the_check() -> None:
    screened = _screen(_update("c0", n=500), TrustPolicy(max_client_examples=100), accepted=500)
    assert screened.update.num_examples == 100
    with pytest.raises(InvalidUpdateError, match="claims 500"):  # the claim is still checked
        _screen(_update("c0", n=500), TrustPolicy(max_client_examples=100), accepted=400)


def test_norm_bound_rejects_or_clips() -> None:
    update = _update("c0")
    norm = _dense_norm(dict(update.factors), SCALING)
    bound = norm / 4
    with pytest.raises(InvalidUpdateError, match=r"update norm .* exceeds trust.update_norm_bound"):
        _screen(update, TrustPolicy(norm_bound=bound))
    clipped = _screen(update, TrustPolicy(norm_bound=bound, norm_policy="clip"))
    assert clipped.clipped and math.isclose(clipped.norm or 0.0, norm, rel_tol=1e-9)
    assert math.isclose(_dense_norm(dict(clipped.update.factors), SCALING), bound, rel_tol=1e-5)
    for name, f in update.factors.items():  # same direction: s B A scaled by bound / norm
        torch.testing.assert_close(
            clipped.update.factors[name].delta(SCALING).double(),
            f.delta(SCALING).double() * (bound / norm),
            rtol=1e-5,
            atol=1e-6,
        )
    within = _screen(update, TrustPolicy(norm_bound=norm * 1.01))
    assert not within.clipped and math.isclose(within.norm or 0.0, norm, rel_tol=1e-9)


def test_trust_settings_name_the_bad_value() -> None:
    with pytest.raises(ConfigError, match=r"trust.norm_policy.*'drop'"):
        TrustConfig(norm_policy="drop")
    with pytest.raises(ConfigError, match=r"trust.update_norm_bound.*-1"):
        TrustConfig(update_norm_bound=-1.0)
    with pytest.raises(ConfigError, match=r"trust.max_client_examples.*-5"):
        TrustConfig(max_client_examples=-5)
    with pytest.raises(ValueError, match="norm_bound must be a finite number"):
        TrustPolicy(norm_bound=math.inf)
    config = load_config(None, ("trust.update_norm_bound=3.5", "trust.norm_policy=clip"))
    assert loop_settings(config).trust == TrustPolicy(norm_bound=3.5, norm_policy="clip")


def test_default_trust_keeps_the_fingerprint_a_changed_one_changes_it() -> None:
    base = load_config()
    assert fingerprint(base) == fingerprint(load_config(None, ("trust.norm_policy=reject",)))
    assert fingerprint(base) != fingerprint(load_config(None, ("trust.update_norm_bound=1",)))


# -- the new global state ------------------------------------------------------------------------


def test_nonfinite_state_names_what_is_wrong() -> None:
    ok = LowRankDelta(left=torch.ones(6, 2), right=torch.ones(2, 5))
    g = GlobalUpdate("hlora", {"q": ok}, {"head": torch.zeros(3)})
    assert nonfinite_state(g, g.extras) is None
    bad = LowRankDelta(left=torch.ones(6, 2), right=torch.full((2, 5), float("inf")))
    assert "global update layer 'q.right'" in (
        nonfinite_state(GlobalUpdate("hlora", {"q": bad}, {}), {}) or ""
    )
    # Finite factors whose product leaves float32 (what fedavg's averaged factors can do).
    huge = LowRankDelta(left=torch.full((6, 2), 1e30), right=torch.full((2, 5), 1e30))
    assert "beyond float32" in (nonfinite_state(GlobalUpdate("fedavg", {"q": huge}, {}), {}) or "")
    assert "global head tensor 'head'" in (
        nonfinite_state(None, {"head": torch.tensor([float("nan")])}) or ""
    )
    assert "server optimizer state 'm'" in (
        nonfinite_state(None, {}, None, {"m": torch.tensor([math.inf])}) or ""
    )
    assert "merged base layer" in (nonfinite_state(None, {}, {"q": bad}) or "")


# -- the round loop over a fake transport --------------------------------------------------------


Behaviour = Callable[[TrainInstruction], TrainReply]


def _honest(instruction: TrainInstruction) -> TrainReply:
    seed = int(instruction.client_id[-2:]) + 10 * instruction.round_num
    update = ClientUpdate(
        client_id=instruction.client_id,
        num_examples=10 + int(instruction.client_id[-2:]),
        rank=instruction.rank,
        scaling=instruction.scaling,
        factors=_factors(instruction.rank, seed),
        extras={"head": torch.full((3,), float(seed))},
    )
    return TrainReply(update, loss=1.0 / (1 + seed), steps=1, seconds=0.1)


def _instruction(cid: str, round_num: int = 1) -> TrainInstruction:
    return TrainInstruction(cid, round_num, 2, SCALING, None, {}, init_seed=0, train_seed=0)


class FakeTransport:
    """Answers each instruction with ``behaviour[client_id](instruction)``."""

    def __init__(self, behaviour: dict[str, Behaviour]) -> None:
        self.behaviour = behaviour

    def run_round(self, instructions: Sequence[TrainInstruction]) -> RoundResult:
        return RoundResult(replies=[self.behaviour[i.client_id](i) for i in instructions])


def _loop(
    tmp_path: Path,
    behaviour: dict[str, Behaviour],
    *,
    strategy: str = "hlora",
    trust: TrustPolicy | None = None,
    rounds: int = 2,
) -> tuple[RoundLoop, ServerState, list[dict]]:
    clients = [ClientSlot(cid, 2, 10 + int(cid[-2:])) for cid in behaviour]
    settings = LoopSettings(
        mode=strategy,
        rounds=rounds,
        clients_per_round=0,
        scaling=SCALING,
        seed=0,
        min_clients=1,
        eval_every=1,
        eval_truncations="never",
        options=AggregationOptions(),
        trust=trust or TrustPolicy(),
    )
    folder = tmp_path / f"run{len(list(tmp_path.iterdir()))}"
    folder.mkdir()
    loop = RoundLoop(
        settings,
        clients,
        SPEC,
        {"head": torch.zeros(3)},
        FakeTransport(behaviour),
        lambda *a, **k: {"accuracy": 0.0},
        MetricsLog(folder / "metrics.jsonl"),
        folder / "checkpoint.safetensors",
        "fake",
        RoundProgress(rounds, enabled=False),
    )
    state = loop.run()
    records = [json.loads(x) for x in (folder / "metrics.jsonl").read_text().splitlines()]
    return loop, state, records


def _lie(**changes: object) -> Behaviour:
    def behave(instruction: TrainInstruction) -> TrainReply:
        reply = _honest(instruction)
        update = dataclasses.replace(reply.update, **changes)  # type: ignore[arg-type]
        return dataclasses.replace(reply, update=update)

    return behave


def _as_client(other: str) -> Behaviour:
    def behave(instruction: TrainInstruction) -> TrainReply:
        return _honest(dataclasses.replace(instruction, client_id=other))

    return behave


def _oversized(instruction: TrainInstruction) -> TrainReply:
    reply = _honest(instruction)
    factors = {n: LoraFactors(A=f.A * 1e3, B=f.B * 1e3) for n, f in reply.update.factors.items()}
    return dataclasses.replace(reply, update=dataclasses.replace(reply.update, factors=factors))


def _nan(instruction: TrainInstruction) -> TrainReply:
    reply = _honest(instruction)
    head = {"head": torch.full((3,), float("nan"))}
    return dataclasses.replace(reply, update=dataclasses.replace(reply.update, extras=head))


HOSTILE: dict[str, tuple[Behaviour, str]] = {
    "huge count": (_lie(num_examples=2**62), "claims 4611686018427387904 training examples"),
    "other scaling": (_lie(scaling=8.0), "scaling 8.0 is not the run's 2.0"),
    "wrong rank": (_lie(rank=4, factors=_factors(4, 3)), "rank 4 differs"),
    "NaN": (_nan, "non-finite"),
    "oversized norm": (_oversized, "exceeds trust.update_norm_bound = 1000"),
    "answers for another": (_as_client("client00"), "2 replies for one client"),
}


@pytest.mark.parametrize("kind", list(HOSTILE))
def test_a_hostile_client_is_dropped_and_the_others_equal_a_run_without_it(
    kind: str, tmp_path: Path
) -> None:
    behaviour, reason = HOSTILE[kind]
    policy = TrustPolicy(norm_bound=1000.0)
    honest = {"client00": _honest, "client01": _honest}
    _, clean, clean_records = _loop(tmp_path, honest, trust=policy)
    _, state, records = _loop(tmp_path, {**honest, "client02": behaviour}, trust=policy)
    for record in records:
        if kind == "answers for another":  # client00 is named twice: both its replies go
            assert [d["client_id"] for d in record["dropped"]] == ["client00"]
            assert reason in record["dropped"][0]["reason"]
            continue
        assert [d["client_id"] for d in record["dropped"]] == ["client02"], record["dropped"]
        assert reason in record["dropped"][0]["reason"]
        accepted = {c["client_id"]: c["accepted"] for c in record["clients"]}
        assert accepted == {"client00": True, "client01": True, "client02": False}
    if kind == "answers for another":
        return
    assert state.global_update is not None and clean.global_update is not None
    for name, layer in clean.global_update.layers.items():
        assert torch.equal(state.global_update.layers[name].left, layer.left)
        assert torch.equal(state.global_update.layers[name].right, layer.right)
    assert torch.equal(state.extras["head"], clean.extras["head"])
    assert [r["train_loss"] for r in records] == [r["train_loss"] for r in clean_records]


def test_a_client_answering_for_another_cannot_replace_its_update(tmp_path: Path) -> None:
    # client02 answers as client00: client00's slot now has two replies and both are dropped;
    # the aggregate is client01's alone, as in a run of client01 only.
    behaviour = {"client00": _honest, "client01": _honest, "client02": _as_client("client00")}
    _, state, records = _loop(tmp_path, behaviour)
    _, alone, _ = _loop(tmp_path, {"client01": _honest})
    assert [c["accepted"] for c in records[0]["clients"]] == [False, True, False]
    assert state.global_update is not None and alone.global_update is not None
    for name, layer in alone.global_update.layers.items():
        torch.testing.assert_close(state.global_update.layers[name].dense(), layer.dense())


def test_the_weights_come_from_join_time_and_the_cap(tmp_path: Path) -> None:
    # Capped at 11 examples: client00 (10) and client01 (11) weigh 10 : 11; client05 (15) would
    # weigh 15 without the cap and weighs 11 with it: its head enters with 11 / 32.
    behaviour = {"client00": _honest, "client01": _honest, "client05": _honest}
    _, state, _ = _loop(tmp_path, behaviour, trust=TrustPolicy(max_client_examples=11), rounds=1)
    heads = {"client00": 10.0, "client01": 11.0, "client05": 15.0}  # seed = id + 10 * round
    expected = (10 * heads["client00"] + 11 * heads["client01"] + 11 * heads["client05"]) / 32
    torch.testing.assert_close(state.extras["head"], torch.full((3,), expected))


def test_clipped_updates_are_recorded(tmp_path: Path) -> None:
    behaviour = {"client00": _honest, "client01": _oversized}
    policy = TrustPolicy(norm_bound=1000.0, norm_policy="clip")
    _, state, records = _loop(tmp_path, behaviour, trust=policy, rounds=1)
    by_id = {c["client_id"]: c for c in records[0]["clients"]}
    assert by_id["client01"]["clipped"] and by_id["client01"]["update_norm"] > 1000
    assert not by_id["client00"]["clipped"] and by_id["client00"]["accepted"]
    assert records[0]["dropped"] == []
    assert state.global_update is not None
    # The aggregate is a convex combination: its norm is at most max(1000, the honest norm).
    honest = update_norm(_honest(_instruction("client00")).update.factors, SCALING)
    got = update_norm(
        {n: d.leading(8, SCALING) for n, d in state.global_update.layers.items()}, SCALING
    )
    assert got <= max(1000.0, honest) * (1 + 1e-5)


def test_a_nonfinite_aggregate_keeps_the_old_state(tmp_path: Path) -> None:
    # fedavg averages A and B separately: finite factors of 1e20 give a product beyond fp32.
    def huge(instruction: TrainInstruction) -> TrainReply:
        reply = _honest(instruction)
        factors = {
            n: LoraFactors(A=torch.full_like(f.A, 1e20), B=torch.full_like(f.B, 1e20))
            for n, f in reply.update.factors.items()
        }
        return dataclasses.replace(reply, update=dataclasses.replace(reply.update, factors=factors))

    behaviour = {"client00": _honest, "client01": _honest}
    _, clean, _ = _loop(tmp_path, behaviour, strategy="fedavg", rounds=1)

    def huge_in_round_2(instruction: TrainInstruction) -> TrainReply:
        return huge(instruction) if instruction.round_num == 2 else _honest(instruction)

    _, state, records = _loop(
        tmp_path, {"client00": _honest, "client01": huge_in_round_2}, strategy="fedavg"
    )
    assert "aggregate_rejected" not in records[0]
    assert "beyond float32" in records[1]["aggregate_rejected"]
    assert [c["accepted"] for c in records[1]["clients"]] == [False, False]
    assert state.round_num == 2 and state.global_update is not None
    assert clean.global_update is not None  # round 1's state is kept
    for name, layer in clean.global_update.layers.items():
        assert torch.equal(state.global_update.layers[name].left, layer.left)
    assert torch.equal(state.extras["head"], clean.extras["head"])


def test_too_few_screened_updates_stop_the_run(tmp_path: Path) -> None:
    with pytest.raises(FederationError, match="only 0 valid client updates"):
        _loop(tmp_path, {"client00": _lie(num_examples=99)})


def test_a_reply_for_a_client_not_asked_is_dropped(tmp_path: Path) -> None:
    class Chatty(FakeTransport):
        def run_round(self, instructions: Sequence[TrainInstruction]) -> RoundResult:
            result = super().run_round(instructions)
            stranger = _honest(dataclasses.replace(instructions[0], client_id="client09"))
            return RoundResult(replies=[*result.replies, stranger])

    behaviour = {"client00": _honest, "client01": _honest}
    _, clean, _ = _loop(tmp_path, behaviour, rounds=1)
    loop, _, _ = _loop(tmp_path, behaviour, rounds=1)
    loop.transport = Chatty(behaviour)
    state, record = loop.run_round(loop.initial_state(), 1)
    assert record["dropped"] == [
        {"client_id": "client09", "reason": "reply from a client not asked this round"}
    ]
    assert [c["client_id"] for c in record["clients"]] == ["client00", "client01"]
    assert state.global_update is not None and clean.global_update is not None
    for name, layer in clean.global_update.layers.items():
        assert torch.equal(state.global_update.layers[name].left, layer.left)
