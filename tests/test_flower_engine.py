"""The Flower engine end to end: simulation (Ray) against the in-process engine.

Tiny random BERT, real MRPC slices, 3 clients x 2 rounds. Flower, Ray, uv and torch write only
into temporary folders; every process started is stopped.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
import uuid
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from flwr.app import ConfigRecord, Error, Message, MessageType, RecordDict

from flower_helpers import own_files, read_records, tiny_config
from hlora.aggregation import ClientUpdate, LoraFactors
from hlora.config import RunConfig, load_config, replace, to_toml
from hlora.data.glue import load_task
from hlora.engines.flower.codec import decode_instruction, encode_reply
from hlora.engines.flower.transport import REFUSED
from hlora.errors import ConfigError
from hlora.federation import build_federation, run
from hlora.memory import Footprint
from hlora.protocol import TrainInstruction, TrainReply


def test_node_partitions_match_build_federation(
    tiny_bert_dir: Path, glue_dir: Path, tmp_path: Path
) -> None:
    from hlora.engines.flower.node import client_runtime, partition_features

    config = tiny_config(tiny_bert_dir, glue_dir, tmp_path)
    federation = build_federation(config)
    _, backbone = client_runtime(config)
    for k, slot in enumerate(federation.clients):
        mine = partition_features(config, backbone, k, config.federation.num_clients)
        assert mine == list(federation.train_features[slot.client_id])


# -- the transport and node identity against a fake grid (fast, no Flower runtime) --------------


class FakeGrid:
    """Answers each message with ``behaviour[node](message)`` (None: no reply).

    A reply can be pulled once the message was pushed; ``pulls`` counts the pulls. A message to
    a node of ``refused`` is not taken: its id is empty, as the SuperLink answers for a node
    that is not registered.
    """

    def __init__(
        self,
        behaviour: dict[int, Callable[[Message], Message | None]],
        refused: frozenset[int] = frozenset(),
    ) -> None:
        self.behaviour = behaviour
        self.refused = refused
        self.sent: list[Message] = []
        self.pending: dict[str, Message] = {}
        self.pulls = 0

    def get_node_ids(self) -> list[int]:
        return list(self.behaviour)

    def push_messages(self, messages: list[Message]) -> list[str]:
        ids = []
        for m in messages:
            m.metadata.__dict__["_message_id"] = uuid.uuid4().hex  # as Flower's grids do
            self.sent.append(m)
            if m.metadata.dst_node_id in self.refused:
                ids.append("")
                continue
            reply = self.behaviour[m.metadata.dst_node_id](m)
            if reply is not None:
                self.pending[m.metadata.message_id] = reply
            ids.append(m.metadata.message_id)
        return ids

    def pull_messages(self, message_ids: set[str]) -> list[Message]:
        self.pulls += 1
        return [self.pending.pop(i) for i in sorted(message_ids) if i in self.pending]


class FakeTime:
    """A clock for the transport's polling: ``sleep`` moves it on, nothing waits."""

    def __init__(self) -> None:
        self.now = 0.0
        self.sleeps: list[float] = []

    def monotonic(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds


@pytest.fixture
def fake_time(monkeypatch: pytest.MonkeyPatch) -> FakeTime:
    """The transport's polling on a fake clock (a timeout passes without waiting)."""
    import hlora.engines.flower.transport as transport

    clock = FakeTime()
    monkeypatch.setattr(transport, "time", clock)
    return clock


@pytest.fixture
def task_identity(monkeypatch: pytest.MonkeyPatch, fake_time: FakeTime) -> None:
    """What Flower sets in a ServerApp process before messages can be created; the
    transport's polling on a fake clock."""
    from flwr.supercore.task_identity import TaskIdentity

    for name in ("_run_id", "_node_id", "_task_id"):
        monkeypatch.setattr(TaskIdentity, name, 0 if name == "_node_id" else 1)


def _train_ok(message: Message) -> Message:
    ins = decode_instruction(message.content)
    factors = {
        "layer": LoraFactors(A=torch.ones(ins.rank, 5), B=torch.zeros(6, ins.rank)),
    }
    update = ClientUpdate(ins.client_id, 10, ins.rank, ins.scaling, factors, dict(ins.extras))
    return Message(encode_reply(TrainReply(update, 0.5, 2, 0.1)), reply_to=message)


def _train_error(message: Message) -> Message:
    return Message(Error(code=1, reason="boom"), reply_to=message)


def _superlink_error(message: Message) -> Message:
    reply = Message(Error(code=5, reason="Node Unavailable"), reply_to=message)
    reply.metadata.__dict__["_src_node_id"] = 0  # the SuperLink's own error replies
    return reply


def _malformed(message: Message) -> Message:
    reply = _train_ok(message)
    del reply.content["hlora.factors"]
    return reply


def _instructions(n: int) -> list[TrainInstruction]:
    return [
        TrainInstruction(
            client_id=f"client{k:02d}",
            round_num=1,
            rank=2,
            scaling=2.0,
            factors=None,
            extras={"head": torch.zeros(2)},
            init_seed=1,
            train_seed=k,
        )
        for k in range(n)
    ]


def test_transport_turns_errors_silence_and_bad_replies_into_failures(
    task_identity: None,
) -> None:
    from hlora.engines.flower.transport import FlowerTransport

    grid = FakeGrid(
        {
            10: _train_ok,
            11: _train_error,
            12: lambda m: None,
            13: _malformed,
            14: _superlink_error,
            15: _train_ok,
        },
        refused=frozenset({15}),  # its key was unregistered: the SuperLink takes no message
    )
    done: list[tuple[str, int, float | None]] = []
    transport = FlowerTransport(
        grid,  # type: ignore[arg-type]
        {f"client{k:02d}": 10 + k for k in range(6)},
        timeout=5,
        on_client_done=lambda c, r, loss: done.append((c, r, loss)),
    )
    result = transport.run_round(_instructions(6))
    assert [r.update.client_id for r in result.replies] == ["client00"]
    assert result.replies[0].loss == 0.5
    reasons = {f.client_id: f.reason for f in result.failures}
    assert reasons["client01"] == "node 11: error 1: boom"
    assert reasons["client02"] == "node 12: no reply within 5 s"
    assert reasons["client03"].startswith("node 13: malformed reply")
    assert reasons["client04"] == "node 14: error 5: Node Unavailable"
    assert reasons["client05"] == f"node 15: error 5: {REFUSED}"
    assert [m.metadata.group_id for m in grid.sent] == ["1"] * 6
    assert [m.metadata.message_type for m in grid.sent] == [MessageType.TRAIN] * 6
    assert done[0] == ("client00", 2, 0.5) and [d[2] for d in done[1:]] == [None] * 5
    assert transport.wire_bytes["client00"][1] > 0 and transport.wire_bytes["client01"][1] == 0


def _evaluate_ok(message: Message) -> Message:
    from hlora.engines.flower.codec import decode_eval_instruction, encode_eval_reply
    from hlora.metrics import EvalCounts
    from hlora.protocol import EvalReply

    ins = decode_eval_instruction(message.content)
    assert set(ins.layers) == {"layer"} and torch.equal(ins.layers["layer"].left, torch.ones(6, 3))
    counts = EvalCounts(((3, 1), (0, 2 + ins.round_num)), 4.0, 6 + ins.round_num)
    reply = EvalReply(ins.client_id, 6 + ins.round_num, counts, 0.1)
    return Message(encode_eval_reply(reply), reply_to=message)


def test_a_federated_evaluation_asks_the_nodes_with_held_out_data_and_checks_their_counts(
    task_identity: None,
) -> None:
    """Nodes that declared no held-out data are not asked; silence, errors and counts that do
    not match the join-time declaration are failures with their reasons, not results."""
    from hlora.aggregation import LowRankDelta
    from hlora.engines.flower.transport import FlowerTransport
    from hlora.protocol import EvalInstruction

    grid = FakeGrid({10: _evaluate_ok, 11: _evaluate_ok, 12: _train_error, 13: lambda m: None})
    for node in (14, 15):
        grid.behaviour[node] = _evaluate_ok
    held_out = {"client00": 9, "client01": 0, "client02": 9, "client03": 9, "client04": 99}
    held_out["client05"] = 9
    transport = FlowerTransport(
        grid,  # type: ignore[arg-type]
        {f"client{k:02d}": 10 + k for k in range(6)},
        timeout=5,
        held_out=held_out,
        num_labels=2,
    )
    layers = {"layer": LowRankDelta(torch.ones(6, 3), torch.ones(3, 5), 0.5)}
    instructions = [
        EvalInstruction(f"client{k:02d}", 3, layers, {"head": torch.zeros(2)}) for k in range(6)
    ]
    replies, failures = transport.evaluate_round(instructions)
    assert [r.client_id for r in replies] == ["client00", "client05"]
    assert replies[0].counts.confusion == ((3, 1), (0, 5)) and replies[0].num_examples == 9
    assert {f.client_id: f.reason for f in failures} == {
        "client02": "node 12: error 1: boom",
        "client03": "node 13: no reply within 5 s",
        "client04": "node 14: evaluated 9 examples, declared 99 at join time",
    }
    assert [m.metadata.dst_node_id for m in grid.sent] == [10, 12, 13, 14, 15]
    assert {m.metadata.message_type for m in grid.sent} == {MessageType.EVALUATE}


def _moments_ok(message: Message) -> Message:
    from hlora.calibration import ClassMoments
    from hlora.engines.flower.codec import decode_eval_instruction, encode_moments_reply
    from hlora.protocol import MomentsReply

    ins = decode_eval_instruction(message.content)  # the global model, as for an evaluation
    assert set(ins.layers) == {"layer"} and torch.equal(ins.extras["head"], torch.zeros(2))
    x = torch.arange(12.0).reshape(4, 3)
    moments = ClassMoments.of(x, torch.tensor([0, 1, 0, 1]), 2)
    return Message(
        encode_moments_reply(MomentsReply(ins.client_id, moments, 0.1)), reply_to=message
    )


def _moments_malformed(message: Message) -> Message:
    reply = _moments_ok(message)
    del reply.content["hlora.moments-arrays"]
    return reply


def test_feature_moments_travel_as_a_query_and_failures_keep_their_reasons(
    task_identity: None,
) -> None:
    from hlora.aggregation import LowRankDelta
    from hlora.engines.flower.transport import MOMENTS_MESSAGE, FlowerTransport
    from hlora.protocol import EvalInstruction

    grid = FakeGrid({10: _moments_ok, 11: _train_error, 12: lambda m: None, 13: _moments_malformed})
    transport = FlowerTransport(
        grid,  # type: ignore[arg-type]
        {f"client{k:02d}": 10 + k for k in range(4)},
        timeout=5,
    )
    layers = {"layer": LowRankDelta(torch.ones(6, 3), torch.ones(3, 5), 0.5)}
    instructions = [
        EvalInstruction(f"client{k:02d}", 2, layers, {"head": torch.zeros(2)}) for k in range(4)
    ]
    replies, failures = transport.feature_moments(instructions)
    assert [r.client_id for r in replies] == ["client00"]
    assert replies[0].moments.count.tolist() == [2.0, 2.0]
    assert {f.client_id: f.reason for f in failures} == {
        "client01": "node 11: error 1: boom",
        "client02": "node 12: no reply within 5 s",
        "client03": "node 13: malformed moments: message has no 'hlora.moments-arrays' record "
        "(has: ['hlora.moments'])",
    }
    assert MOMENTS_MESSAGE == "query.moments"
    assert {m.metadata.message_type for m in grid.sent} == {MOMENTS_MESSAGE}


def _query_answer(partition: int, rank: int = 0, memory_mb: float = 0.0) -> Callable:
    def answer(message: Message) -> Message:
        info = ConfigRecord(
            {
                "data-mode": "simulated-partition",
                "partition-id": partition,
                "num-partitions": 3,
                "num-examples": 10 + partition,
                "label-counts": [4, 6 + partition],
                "rank": rank,
                "memory-mb": memory_mb,
            }
        )
        return Message(RecordDict({"hlora.node": info}), reply_to=message)

    return answer


def test_replies_are_pulled_every_poll_until_all_came_or_the_timeout(
    task_identity: None, fake_time: FakeTime
) -> None:
    from hlora.engines.flower.transport import send_and_receive

    late = {"pulls": 3}

    class SlowGrid(FakeGrid):  # node 2's reply arrives at the third pull
        def pull_messages(self, message_ids: set[str]) -> list[Message]:
            out = super().pull_messages(message_ids)
            if self.pulls < late["pulls"]:
                held = [m for m in out if m.metadata.src_node_id == 2]
                for m in held:
                    self.pending[m.metadata.reply_to_message_id] = m
                out = [m for m in out if m not in held]
            return out

    def answer(message: Message) -> Message:
        reply = Message(RecordDict({}), reply_to=message)
        reply.metadata.__dict__["_src_node_id"] = message.metadata.dst_node_id
        return reply

    grid = SlowGrid({1: answer, 2: answer, 3: lambda m: None})
    messages = [
        Message(RecordDict({}), dst_node_id=n, message_type=MessageType.QUERY) for n in (1, 2)
    ]
    replies = send_and_receive(grid, messages, None, poll_s=0.25)  # type: ignore[arg-type]
    assert sorted(r.metadata.src_node_id for r in replies) == [1, 2]
    assert grid.pulls == 3 and fake_time.sleeps == [0.25, 0.25]
    fake_time.sleeps.clear()
    silent = [Message(RecordDict({}), dst_node_id=3, message_type=MessageType.QUERY)]
    assert send_and_receive(grid, silent, 1.0, poll_s=0.3) == []  # type: ignore[arg-type]
    assert fake_time.sleeps == pytest.approx([0.3, 0.3, 0.3, 0.1])  # never past the timeout
    # A message the SuperLink does not take is not waited for, even without a timeout.
    fake_time.sleeps.clear()
    grid.refused = frozenset({3})
    (refused,) = send_and_receive(grid, silent, None, poll_s=0.3)  # type: ignore[arg-type]
    assert refused.has_error() and refused.error.code == 5
    assert refused.metadata.reply_to_message_id == silent[0].metadata.message_id
    assert fake_time.sleeps == []


def _footprint(rank: int) -> Footprint:
    """100 MiB of weights, 50 of activations, 1 MiB of training state per rank unit."""
    return Footprint(100 * 2**20, 50 * 2**20, rank * 2**20)


def test_query_maps_nodes_to_clients_and_ranks(task_identity: None) -> None:
    from hlora.engines.flower.identity import node_rank, query_nodes

    grid = FakeGrid(
        {
            7: _query_answer(2, memory_mb=155.0),
            5: _query_answer(0, rank=8),
            9: _query_answer(1),
        }
    )
    roster = query_nodes(grid, 3, wait_s=1, timeout=None)  # type: ignore[arg-type]
    infos = roster.accepted
    assert roster.dropped == []
    assert [(i.node_id, i.client_id, i.num_examples) for i in infos] == [
        (5, "client00", 10),
        (9, "client01", 11),
        (7, "client02", 12),
    ]
    config = load_config(None, ("federation.num_clients=3", "federation.ranks=[2, 4, 8]"))
    rule = [2, 4, 8]  # cycle
    # declared rank wins; no declaration: the rule; 155 MiB fits 150 + r MiB up to rank 4
    assert [node_rank(config, _footprint, i, rule) for i in infos] == [8, 4, 4]


def test_query_drops_duplicate_partitions_and_goes_on(task_identity: None) -> None:
    from hlora.engines.flower.identity import NodeDrop, query_nodes
    from hlora.server import FederationError

    grid = FakeGrid({1: _query_answer(0), 2: _query_answer(0), 3: _query_answer(1)})
    roster = query_nodes(grid, 3, wait_s=1, timeout=None)  # type: ignore[arg-type]
    assert [(i.node_id, i.client_id) for i in roster.accepted] == [(3, "client01")]
    reason = "partition-id 0 is declared by nodes 1, 2"
    assert roster.dropped == [NodeDrop(1, reason), NodeDrop(2, reason)]
    with pytest.raises(FederationError, match=r"only 1 nodes accepted.*node 1: partition-id 0"):
        query_nodes(grid, 3, wait_s=1, timeout=None, min_clients=2)  # type: ignore[arg-type]


def _query_reply(record: dict) -> Callable:
    def answer(message: Message) -> Message:
        return Message(RecordDict({"hlora.node": ConfigRecord(record)}), reply_to=message)

    return answer


GOOD = {
    "data-mode": "simulated-partition",
    "partition-id": 0,
    "num-partitions": 3,
    "num-examples": 10,
    "label-counts": [3, 7],
    "rank": 0,
    "memory-mb": 0.0,
}
OWN_ANSWER = {
    "data-mode": "own",
    "num-examples": 7,
    "label-counts": [7, 0],
    "rank": 0,
    "memory-mb": 0.0,
}


@pytest.mark.parametrize(
    ("behaviour", "reason"),
    [
        (lambda m: None, "no reply to the query within 5 s"),
        (_train_error, "failed the query: error 1: boom"),
        (
            lambda m: Message(RecordDict({}), reply_to=m),
            "malformed query reply: no 'hlora.node' record",
        ),
        (_query_reply({**GOOD, "num-examples": 0}), "'num-examples' is 0, expected >= 1"),
        (_query_reply({**GOOD, "label-counts": [3, 8]}), r"'label-counts' is \[3, 8\], expected"),
        (_query_reply({**GOOD, "label-counts": [-1, 11]}), "'label-counts' is"),
        (_query_reply({k: v for k, v in GOOD.items() if k != "label-counts"}), "'label-co"),
        (_query_reply({**GOOD, "num-examples": 2.5}), "'num-examples' is 2.5, expected an integer"),
        (_query_reply({k: v for k, v in GOOD.items() if k != "rank"}), "'rank' is None"),
        (_query_reply({**GOOD, "memory-mb": -1.0}), "'memory-mb' is -1.0"),
        (_query_reply({**GOOD, "eval-examples": -2}), "'eval-examples' is -2, expected >= 0"),
        (_query_reply({**GOOD, "eval-examples": "9"}), "'eval-examples' is '9', expected an"),
        (_query_reply({**GOOD, "partition-id": 3}), r"declares partition-id 3 of 3: expected"),
        (_query_reply({"refused": "this node's model 'x' is not"}), "^refused: this node's model"),
        (_query_reply({**GOOD, "partition-id": 2, "num-partitions": 4}), "partition-id 2 of 4"),
        (_query_reply({k: v for k, v in GOOD.items() if k != "data-mode"}), "'data-mode' is None"),
        (_query_reply({**GOOD, "data-mode": "mine"}), "'data-mode' is 'mine', expected one of"),
        (_query_reply(OWN_ANSWER), "node data mode 'own', the run's nodes use 'simulated-part"),
    ],
)
def test_a_bad_query_answer_drops_the_node_and_the_run_goes_on(
    task_identity: None, behaviour: Callable, reason: str
) -> None:
    from hlora.engines.flower.identity import query_nodes

    grid = FakeGrid({1: _query_answer(1), 2: _query_answer(2), 9: behaviour})
    roster = query_nodes(grid, 3, wait_s=1, timeout=5)  # type: ignore[arg-type]
    assert [i.client_id for i in roster.accepted] == ["client01", "client02"]
    (drop,) = roster.dropped
    assert drop.node_id == 9 and drop.when == "query"
    assert re.search(reason, drop.reason), drop.reason


def test_own_data_nodes_become_clients_in_node_id_order(task_identity: None) -> None:
    """Mode ``own``: no partition; clients by ascending node id, the example count as declared,
    nodes beyond federation.num_clients and nodes of the other mode left out with the reason."""
    from hlora.engines.flower.identity import assign_slots, query_nodes
    from hlora.engines.flower.server_app import declared_label_prior
    from hlora.server import ClientSlot, FederationError

    grid = FakeGrid(
        {
            40: _query_reply({**OWN_ANSWER, "num-examples": 40, "label-counts": [40, 0]}),
            12: _query_reply(
                {**OWN_ANSWER, "num-examples": 12, "label-counts": [2, 10], "rank": 4}
            ),
            31: _query_reply({**OWN_ANSWER, "num-examples": 31, "label-counts": [30, 1]}),
            50: _query_reply({**OWN_ANSWER, "num-examples": 50, "label-counts": [0, 50]}),
            20: _query_reply(GOOD),
        }
    )
    roster = query_nodes(grid, 3, wait_s=1, timeout=None, mode="own")  # type: ignore[arg-type]
    assert [(i.node_id, i.client_id, i.num_examples) for i in roster.accepted] == [
        (12, "client00", 12),
        (31, "client01", 31),
        (40, "client02", 40),
    ]
    assert [d.node_id for d in roster.dropped] == [20, 50]
    assert "node data mode 'simulated-partition', the run's nodes use 'own'" in (
        roster.dropped[0].reason
    )
    assert "federation.num_clients = 3 clients are taken" in roster.dropped[1].reason
    config = load_config(None, ("federation.num_clients=3", "federation.ranks=[2, 4, 8]"))
    shapes = _footprint
    slots, _ = assign_slots(config, shapes, roster)
    assert slots == [  # declared rank wins; else the rule's cycle for client k
        ClientSlot("client00", 4, 12),
        ClientSlot("client01", 4, 31),
        ClientSlot("client02", 8, 40),
    ]
    # The label prior of a server without training labels: the declared counts, smoothed
    # as label_log_prior smooths the in-process engine's training labels.
    prior = declared_label_prior(roster.accepted, 2)
    assert prior == pytest.approx(((1 + 72) / 85, (1 + 11) / 85))
    with pytest.raises(ConfigError, match=r"node 12 declares label counts \[2, 10\]: expected 3"):
        declared_label_prior(roster.accepted, 3)
    three = dataclasses.replace(
        roster, accepted=[dataclasses.replace(roster.accepted[0], label_counts=(1, 1, 10))]
    )
    with pytest.raises(FederationError, match="node 12 declares 3 label counts: task 'mrpc' has 2"):
        assign_slots(config, shapes, three)


def test_a_rank_the_run_cannot_serve_drops_the_node(task_identity: None) -> None:
    from hlora.engines.flower.identity import NodeInfo, Roster, assign_slots
    from hlora.server import ClientSlot, FederationError

    config = load_config(None, ("federation.num_clients=3", "federation.ranks=[2, 4]"))
    shapes = _footprint
    roster = Roster(
        [
            NodeInfo(5, 0, 3, 10),
            NodeInfo(6, 1, 3, 11, rank=16),
            NodeInfo(7, 2, 3, 12, memory_mb=1e-6),
        ]
    )
    slots, kept = assign_slots(config, shapes, roster)
    assert slots == [ClientSlot("client00", 2, 10)]
    assert [i.node_id for i in kept.accepted] == [5]
    assert [d.node_id for d in kept.dropped] == [6, 7]
    assert "declares rank 16" in kept.dropped[0].reason
    assert "memory_budgets_mb" in kept.dropped[1].reason
    many = replace(config, federation={"min_clients": 2})
    with pytest.raises(FederationError, match=r"fewer than federation\.min_clients = 2"):
        assign_slots(many, shapes, roster)


def test_a_node_past_the_timeout_misses_the_round_and_may_return(task_identity: None) -> None:
    from hlora.engines.flower.transport import FlowerTransport

    silent = {"round": 1}

    def slow_in_round_1(message: Message) -> Message | None:
        return None if message.metadata.group_id == str(silent["round"]) else _train_ok(message)

    grid = FakeGrid({10: _train_ok, 11: slow_in_round_1})
    transport = FlowerTransport(grid, {"client00": 10, "client01": 11}, timeout=30)  # type: ignore[arg-type]
    first = transport.run_round(_instructions(2))
    assert [r.update.client_id for r in first.replies] == ["client00"]
    assert [(f.client_id, f.reason) for f in first.failures] == [
        ("client01", "node 11: no reply within 30 s")
    ]
    second = transport.run_round([dataclasses.replace(i, round_num=2) for i in _instructions(2)])
    assert [r.update.client_id for r in second.replies] == ["client00", "client01"]
    assert second.failures == []


def test_a_node_that_joins_late_is_left_out_with_its_reason(task_identity: None) -> None:
    from hlora.engines.flower.transport import FlowerTransport

    grid = FakeGrid({10: _train_ok, 11: _train_ok})
    dropped: list[tuple[int, str, int]] = []
    transport = FlowerTransport(
        grid,  # type: ignore[arg-type]
        {"client00": 10, "client01": 11},
        timeout=30,
        on_node_dropped=lambda n, reason, r: dropped.append((n, reason, r)),
    )
    transport.run_round(_instructions(2))
    grid.behaviour[12] = _train_ok  # connects after the QUERY round
    for round_num in (2, 3):
        result = transport.run_round(
            [dataclasses.replace(i, round_num=round_num) for i in _instructions(2)]
        )
        assert len(result.replies) == 2
    assert [(n, r) for n, _, r in dropped] == [(12, 2)]  # reported once
    assert "connected after the QUERY round" in dropped[0][1]
    assert {m.metadata.dst_node_id for m in grid.sent} == {10, 11}  # it never gets a message


def test_run_config_settings_are_parsed_once_and_checked() -> None:
    from hlora.engines.flower.settings import DEFAULT_ROUND_TIMEOUT_S, AppSettings

    default = AppSettings.from_run_config({})
    assert default.round_timeout == DEFAULT_ROUND_TIMEOUT_S > 0
    assert AppSettings.from_run_config({"round-timeout": 0}).round_timeout is None
    assert default.node_data == "own" and default.eval_data == ""
    assert default.reply_poll == 0.25
    assert AppSettings.from_run_config({"reply-poll": 3}).reply_poll == 3.0
    with pytest.raises(ConfigError, match=r"'reply-poll' must be > 0, got 0\.0"):
        AppSettings.from_run_config({"reply-poll": 0})
    sim = AppSettings.from_run_config({"node-data": "simulated-partition", "eval-data": "/e.csv"})
    assert (sim.node_data, sim.eval_data) == ("simulated-partition", "/e.csv")
    with pytest.raises(ConfigError, match="'node-data' must be one of own, simulated-partition"):
        AppSettings.from_run_config({"node-data": "shared"})
    parsed = AppSettings.from_run_config({"round-timeout": 90, "node-wait": 5, "run-dir": "r"})
    assert (parsed.round_timeout, parsed.node_wait, parsed.run_dir) == (90.0, 5.0, "r")
    with pytest.raises(ConfigError, match=r"'round-timeout' must be finite and >= 0, got -1"):
        AppSettings.from_run_config({"round-timeout": -1})
    with pytest.raises(ConfigError, match=r"'node-wait' must be a number of seconds, got 'x'"):
        AppSettings.from_run_config({"node-wait": "x"})
    with pytest.raises(ConfigError, match="has no 'hlora-config' key"):
        default.load_config()
    assert default.evaluation == "server"
    assert AppSettings.from_run_config({"evaluation": "federated"}).evaluation == "federated"
    with pytest.raises(ConfigError, match="'evaluation' must be one of server, federated, both"):
        AppSettings.from_run_config({"evaluation": "nodes"})


def test_a_federated_evaluation_needs_a_transport_that_can_and_nodes_with_held_out_data(
    tiny_bert_dir: Path, glue_dir: Path, tmp_path: Path
) -> None:
    from hlora.engines.flower.identity import NodeInfo
    from hlora.engines.flower.server_app import require_held_out
    from hlora.federation import make_loop
    from hlora.report import RoundProgress
    from hlora.server import FederationError

    federation = build_federation(tiny_config(tiny_bert_dir, glue_dir, tmp_path))
    with pytest.raises(FederationError, match="a transport whose clients evaluate it"):
        make_loop(federation, tmp_path, RoundProgress(1, enabled=False), evaluation="federated")
    with pytest.raises(FederationError, match="evaluation 'nodes' is not one of"):
        make_loop(federation, tmp_path, RoundProgress(1, enabled=False), evaluation="nodes")
    nodes = [NodeInfo(node_id=k, partition_id=-1, num_partitions=0, num_examples=5) for k in (1, 2)]
    require_held_out(nodes, "server")
    with pytest.raises(ConfigError, match="no node declared held-out data: give the nodes"):
        require_held_out(nodes, "both")
    require_held_out([*nodes, dataclasses.replace(nodes[0], eval_examples=3)], "federated")


def test_declared_rank_outside_the_config_is_an_error() -> None:
    from hlora.engines.flower.identity import NodeInfo, node_rank

    config = load_config(None, ("federation.num_clients=3", "federation.ranks=[2, 4]"))
    info = NodeInfo(node_id=1, partition_id=0, num_partitions=3, num_examples=5, rank=16)
    with pytest.raises(ConfigError, match="declares rank 16"):
        node_rank(config, _footprint, info, [2, 4, 2])


def test_simulation_refuses_centralized_and_used_run_folders(tmp_path: Path) -> None:
    from hlora.engines.flower.simulation import run_flower_simulation

    config = load_config(None, ("federation.strategy=centralized",))
    with pytest.raises(ConfigError, match="centralized"):
        run_flower_simulation(config, tmp_path / "a", progress=False)
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "config.toml").write_text("")
    with pytest.raises(ConfigError, match="already holds a run"):
        run_flower_simulation(load_config(), tmp_path / "b", progress=False)


def test_cli_engine_option_dispatches_to_the_simulation(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import hlora.engines.flower.simulation as simulation
    from hlora.cli import build_parser, main
    from hlora.federation import RunResult

    assert build_parser().parse_args(["run"]).engine == "inprocess"
    calls = []

    def fake(
        config: RunConfig,
        run_dir: Path,
        *,
        progress: bool,
        node_cpus: float | None,
        node_gpus: float | None,
    ) -> RunResult:
        calls.append((config.federation.num_clients, run_dir, progress, node_cpus, node_gpus))
        return RunResult(run_dir, {"final": {"accuracy": 0.5}})

    monkeypatch.setattr(simulation, "run_flower_simulation", fake)
    args = ["run", "--engine", "flower-sim", "--no-progress", "--output", str(tmp_path)]
    assert main([*args, "--set", "federation.num_clients=3", "--set", "output.name=x"]) == 0
    assert main([*args, "--set", "output.name=y", "--node-cpus", "2", "--node-gpus", "0.5"]) == 0
    assert calls == [(3, tmp_path / "x", False, None, None), (10, tmp_path / "y", False, 2.0, 0.5)]
    # The node shares belong to the simulation: the in-process engine refuses them.
    assert main(["run", "--node-cpus", "2", "--output", str(tmp_path)]) == 2
    assert not (tmp_path / "hlora").exists() and len(calls) == 2
    # --resume with the simulation goes on in the simulation, with the folder's configuration.
    stopped = tmp_path / "stopped"
    stopped.mkdir()
    (stopped / "config.toml").write_text(to_toml(load_config(None, ("federation.num_clients=4",))))
    resume = ["run", "--resume", str(stopped), "--engine", "flower-sim", "--no-progress"]
    assert main([*resume, "--node-gpus", "0"]) == 0
    assert calls[2:] == [(4, stopped, False, None, 0.0)]
    capsys.readouterr()
    assert main(["run", "--resume", str(tmp_path / "nothing"), "--engine", "flower-sim"]) == 2
    assert "is not a run folder" in capsys.readouterr().err and len(calls) == 3


def _shares(device: str = "auto", **kwargs: float | None) -> dict[str, object]:
    from hlora.engines.flower.simulation import backend_config

    config = load_config(None, (f'train.device="{device}"',))
    return backend_config(config, **kwargs)  # type: ignore[arg-type]


def test_virtual_nodes_get_a_cpu_each_and_a_gpu_when_the_run_trains_on_cuda() -> None:
    on_cpus = _shares(cpus=2, gpus=0)
    assert on_cpus == {
        "client_resources": {"num_cpus": 1.0, "num_gpus": 0.0},
        "init_args": {"num_cpus": 2, "num_gpus": 0},
    }
    one_at_a_time = _shares(node_cpus=2, cpus=2, gpus=0)
    assert one_at_a_time["client_resources"] == {"num_cpus": 2, "num_gpus": 0.0}
    # A GPU machine: "auto" trains on CUDA, so each node holds a GPU (else Ray hides it).
    on_gpus = _shares(cpus=16, gpus=2)
    assert on_gpus == {
        "client_resources": {"num_cpus": 1.0, "num_gpus": 1.0},
        "init_args": {"num_cpus": 16, "num_gpus": 2},
    }
    assert _shares(node_gpus=0.25, cpus=16, gpus=1)["client_resources"] == {
        "num_cpus": 1.0,
        "num_gpus": 0.25,
    }
    assert _shares("cpu", cpus=16, gpus=1)["client_resources"] == {"num_cpus": 1.0, "num_gpus": 0.0}


@pytest.mark.parametrize(
    ("device", "shares", "message"),
    [
        ("auto", {"node_cpus": 0.0}, "node CPUs must be > 0 and at most this machine's 2, got 0.0"),
        ("auto", {"node_cpus": 3.0}, "node CPUs must be > 0 and at most this machine's 2, got 3.0"),
        ("auto", {"node_gpus": 1.5, "gpus": 1}, "GPU share must be between 0 and 1, got 1.5"),
        ("auto", {"node_gpus": -0.5}, "GPU share must be between 0 and 1, got -0.5"),
        (
            "auto",
            {"node_gpus": 0.5},
            r"share per node \(0.5\) needs a CUDA GPU; this machine has none",
        ),
        ("cuda", {}, r"share per node \(1.0\) needs a CUDA GPU; this machine has none"),
        ("cpu", {"node_gpus": 0.5, "gpus": 1}, 'with train.device = "cpu": no node would use it'),
        (
            "auto",
            {"node_gpus": 0.0, "gpus": 1},
            "sees no GPU: give each node a share, or set train.device",
        ),
    ],
)
def test_node_shares_the_machine_or_the_run_cannot_use_are_refused(
    device: str, shares: dict[str, float], message: str
) -> None:
    with pytest.raises(ConfigError, match=message):
        _shares(device, **{"cpus": 2, "gpus": 0, **shares})


def test_the_simulation_refuses_a_bad_share_before_it_writes_anything(tmp_path: Path) -> None:
    from hlora.engines.flower.simulation import run_flower_simulation

    with pytest.raises(ConfigError, match="node CPUs must be > 0"):
        run_flower_simulation(load_config(), tmp_path / "run", progress=False, node_cpus=0)
    assert not (tmp_path / "run").exists()


@pytest.mark.distributed
@pytest.mark.parametrize(
    ("strategy", "calibration", "options"),
    [
        ("hlora", "none", {}),
        ("flora", "ccvr", {"train.decorrelation": 1.0}),
        # Adam on server factors stepped along the clients' factor steps, each client's
        # components beyond its rank frozen into its base weights (sent as a base delta): the
        # server state carries across rounds as in-process; in round 2 the rank-2 client
        # trains components 2-3 of the rank-4 update (the rolling window). (This tiny model's
        # loss barely feels the residual; test_own_data checks that a node trains at it.)
        (
            "hlora",
            "none",
            {
                "server.optimizer": '"adam"',
                "server.learning_rate": 0.05,
                "server.hlora_space": '"factor-steps"',
                "server.residual": '"frozen"',
                "server.window": '"rolling"',
            },
        ),
    ],
    ids=["hlora", "flora-ccvr-decorr", "hlora-adam-factor-steps-frozen-rolling"],
)
def test_flower_simulation_matches_inprocess(
    strategy: str,
    calibration: str,
    options: dict[str, object],
    tiny_bert_dir: Path,
    glue_dir: Path,
    tmp_path: Path,
    flower_env: Path,
) -> None:
    from hlora.engines.flower.simulation import run_flower_simulation

    config = tiny_config(
        tiny_bert_dir,
        glue_dir,
        tmp_path,
        **{
            "federation.strategy": strategy,
            "server.head_calibration": f'"{calibration}"',
            **options,
        },
    )
    reference = run(replace(config, output={"name": "inprocess"}), progress=False)
    flower = run_flower_simulation(
        replace(config, output={"name": "flower"}),
        tmp_path / "flower",
        progress=False,
        evaluation="both",
    )

    ref_clients = json.loads((reference.run_dir / "clients.json").read_text())
    fl_clients = json.loads((flower.run_dir / "clients.json").read_text())
    assert [{k: c[k] for k in ("client_id", "rank", "num_examples")} for c in fl_clients] == (
        ref_clients
    )

    ref, got = read_records(reference.run_dir), read_records(flower.run_dir)
    assert [r["round"] for r in got] == [1, 2]
    for a, b in zip(ref, got, strict=True):
        assert b["dropped"] == []
        # Same payload per client: only factors and head travel, at the same ranks.
        for ca, cb in zip(a["clients"], b["clients"], strict=True):
            assert cb["client_id"] == ca["client_id"] and cb["accepted"]
            assert cb["bytes_sent"] == ca["bytes_sent"] > 0
            assert cb["bytes_received"] == ca["bytes_received"] > 0
            assert math.isclose(cb["loss"], ca["loss"], rel_tol=1e-4, abs_tol=1e-5)
        # Same seeds, same data: the metrics agree up to float summation order (threads).
        assert b["eval"]["accuracy"] == a["eval"]["accuracy"]
        assert b["eval"]["f1"] == a["eval"]["f1"]
        assert math.isclose(b["eval"]["loss"], a["eval"]["loss"], rel_tol=1e-4, abs_tol=1e-5)
        # The nodes' shares of dev make up the whole of it: their summed counts give the
        # server's metrics (flora: through the merged base the nodes rebuild).
        federated = b["federated_eval"]
        assert federated["failed"] == [] and sorted(federated["clients"]) == [
            "client00",
            "client01",
            "client02",
        ]
        overall = federated["overall"]
        assert overall["num_examples"] == sum(
            c["num_examples"] for c in federated["clients"].values()
        )
        assert overall["num_examples"] == len(
            load_task("mrpc", glue_dir, dev_limit=config.data.dev_limit).dev
        )
        assert overall["accuracy"] == b["eval"]["accuracy"] and overall["f1"] == b["eval"]["f1"]
        assert math.isclose(overall["loss"], b["eval"]["loss"], rel_tol=1e-4, abs_tol=1e-5)
    if calibration != "none":  # the nodes' moments recalibrated the head as in-process ones do
        for records in (ref, got):
            done = records[-1]["head_calibration"]
            assert done["applied"] and done["clients"] == 3 and done["failed"] == []
        assert (
            got[-1]["head_calibration"]["eval_uncalibrated"]["accuracy"]
            == (ref[-1]["head_calibration"]["eval_uncalibrated"]["accuracy"])
        )
    assert (flower.run_dir / "summary.json").is_file()
    # under a frozen residual every client holds the whole update: one adapter, the largest rank
    exported = ["r4"] if options.get("server.residual") else ["r2", "r4"]
    assert sorted(p.name for p in (flower.run_dir / "adapters").glob("r*")) == exported


@pytest.mark.distributed
def test_flower_simulation_with_own_data(
    tiny_bert_dir: Path, glue_dir: Path, tmp_path: Path, flower_env: Path
) -> None:
    """Each virtual node trains on all of its own file and evaluates the global model on its
    own held-out file; the server reads no data at all (a federated evaluation)."""
    from hlora.engines.flower.simulation import run_flower_simulation
    from test_own_data import write_jsonl

    config = tiny_config(tiny_bert_dir, tmp_path / "no-shared-task", tmp_path)
    own, _ = own_files(glue_dir, tmp_path / "own", [10, 16, 22])
    dev = load_task("mrpc", glue_dir).dev
    held_out = [
        write_jsonl(tmp_path / "own" / f"held{k}.jsonl", list(dev[8 * k : 8 * k + 5 + k]))
        for k in range(3)
    ]
    result = run_flower_simulation(
        config,
        tmp_path / "flower",
        progress=False,
        own_data=[str(p) for p in own],
        own_eval_data=[str(p) for p in held_out],
        evaluation="federated",
    )
    clients = json.loads((result.run_dir / "clients.json").read_text())
    assert [c["client_id"] for c in clients] == ["client00", "client01", "client02"]
    assert [c["node_id"] for c in clients] == sorted(c["node_id"] for c in clients)
    assert sorted(c["num_examples"] for c in clients) == [10, 16, 22]
    assert {c["data_mode"] for c in clients} == {"own"}
    records = read_records(result.run_dir)
    assert [r["round"] for r in records] == [1, 2]
    for record in records:
        assert record["dropped"] == []
        assert all(c["accepted"] for c in record["clients"])
        assert {c["num_examples"] for c in record["clients"]} <= {10, 16, 22}
        federated = record["federated_eval"]
        by_size = sorted(c["num_examples"] for c in federated["clients"].values())
        assert by_size == [5, 6, 7] and federated["overall"]["num_examples"] == 18
        assert record["eval"] == {
            k: v for k, v in federated["overall"].items() if k not in ("num_examples", "confusion")
        }
        assert "eval_by_rank" not in record  # truncations are the server's evaluation
    assert sorted(c["eval_examples"] for c in clients) == [5, 6, 7]
    labels = [e.label for k in range(3) for e in dev[8 * k : 8 * k + 5 + k]]
    majority = max(set(labels), key=labels.count)
    summary = json.loads((result.run_dir / "summary.json").read_text())
    assert summary["majority_class"]["accuracy"] == labels.count(majority) / 18
    assert json.loads((result.run_dir / "dropped_nodes.json").read_text()) == []
    with pytest.raises(ConfigError, match="own_data names 2 paths, expected one per client"):
        run_flower_simulation(config, tmp_path / "x", progress=False, own_data=["a", "b"])


# -- a restarted server resumes ------------------------------------------------------------------


@pytest.mark.distributed
def test_flower_simulation_resumes_a_stopped_run(
    tiny_bert_dir: Path,
    glue_dir: Path,
    tmp_path: Path,
    flower_env: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from hlora.cli import main
    from hlora.engines.flower.simulation import run_flower_simulation
    from hlora.report import RoundProgress

    config = tiny_config(tiny_bert_dir, glue_dir, tmp_path, **{"federation.rounds": 3})
    reference = run(replace(config, output={"name": "inprocess"}), progress=False)
    flower = replace(config, output={"name": "flower"})
    run_dir = tmp_path / "flower"

    end_round = RoundProgress.end_round

    def stop_after_round_1(self: RoundProgress, record: dict) -> None:
        end_round(self, record)
        if record["round"] == 1:  # round 1 is logged and checkpointed: the server dies
            raise RuntimeError("server stopped after round 1")

    with monkeypatch.context() as patch:
        patch.setattr(RoundProgress, "end_round", stop_after_round_1)
        with pytest.raises(RuntimeError, match="after round 1"):
            run_flower_simulation(flower, run_dir, progress=False)
    assert [r["round"] for r in read_records(run_dir)] == [1]
    assert not (run_dir / "summary.json").exists()
    # Another configuration is refused; the folder's own resumes, here from the command line.
    with pytest.raises(ConfigError, match="already holds a run"):
        run_flower_simulation(replace(flower, federation={"rounds": 4}), run_dir, progress=False)
    resume = ["run", "--resume", str(run_dir), "--engine", "flower-sim", "--no-progress"]
    assert main(resume) == 0

    ref, got = read_records(reference.run_dir), read_records(run_dir)
    assert [r["round"] for r in got] == [1, 2, 3]
    for a, b in zip(ref, got, strict=True):
        assert b["dropped"] == []
        for ca, cb in zip(a["clients"], b["clients"], strict=True):
            assert cb["client_id"] == ca["client_id"] and cb["accepted"]
            assert cb["bytes_received"] == ca["bytes_received"] > 0
            assert math.isclose(cb["loss"], ca["loss"], rel_tol=1e-4, abs_tol=1e-5)
        assert b["eval"]["accuracy"] == a["eval"]["accuracy"]
        assert math.isclose(b["eval"]["loss"], a["eval"]["loss"], rel_tol=1e-4, abs_tol=1e-5)
    assert json.loads((run_dir / "summary.json").read_text())
