"""The Flower engine end to end: simulation (Ray) against the in-process engine.

Tiny random BERT, real MRPC slices, 3 clients x 2 rounds. Flower, Ray, uv and torch write only
into temporary folders; every process started is stopped.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch
from flwr.app import ConfigRecord, Error, Message, MessageType, RecordDict

from hlora.aggregation import ClientUpdate, LoraFactors
from hlora.config import RunConfig, load_config, replace, to_toml
from hlora.data.glue import load_task
from hlora.engines.flower.codec import decode_instruction, encode_reply
from hlora.engines.flower.transport import REFUSED
from hlora.errors import ConfigError
from hlora.federation import build_federation, run
from hlora.memory import Footprint
from hlora.protocol import TrainInstruction, TrainReply
from tiny_models import tiny_overrides

APP_DIR = Path(__file__).resolve().parents[1]  # the Flower App: pyproject.toml [tool.flwr.app]


def _records(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture
def flower_env(monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """Temporary homes for Flower, Ray, uv and torch; no telemetry. Yields the folder."""
    # Ray's socket paths must stay short: a folder directly under /tmp, not pytest's tmp_path.
    home = Path(tempfile.mkdtemp(prefix="hlora-flwr-", dir="/tmp"))
    for name, sub in [
        ("FLWR_HOME", "flwr"),
        ("RAY_TMPDIR", "ray"),
        ("UV_CACHE_DIR", "uv"),
        ("TORCHINDUCTOR_CACHE_DIR", "inductor"),
    ]:
        (home / sub).mkdir()
        monkeypatch.setenv(name, str(home / sub))
    monkeypatch.setenv("FLWR_TELEMETRY_ENABLED", "0")
    monkeypatch.setenv("RAY_DEDUP_LOGS", "0")
    try:
        yield home
    finally:
        shutil.rmtree(home, ignore_errors=True)


def _tiny_config(tiny_bert_dir: Path, glue_dir: Path, out: Path, **extra: object) -> RunConfig:
    return load_config(None, tuple(tiny_overrides(tiny_bert_dir, glue_dir, out, **extra)))


def test_node_partitions_match_build_federation(
    tiny_bert_dir: Path, glue_dir: Path, tmp_path: Path
) -> None:
    from hlora.engines.flower.node import client_runtime, partition_features

    config = _tiny_config(tiny_bert_dir, glue_dir, tmp_path)
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

    federation = build_federation(_tiny_config(tiny_bert_dir, glue_dir, tmp_path))
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
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    import hlora.engines.flower.simulation as simulation
    from hlora.cli import build_parser, main
    from hlora.federation import RunResult

    assert build_parser().parse_args(["run"]).engine == "inprocess"
    calls = []

    def fake(config: RunConfig, run_dir: Path, *, progress: bool) -> RunResult:
        calls.append((config.federation.num_clients, run_dir, progress))
        return RunResult(run_dir, {"final": {"accuracy": 0.5}})

    monkeypatch.setattr(simulation, "run_flower_simulation", fake)
    args = ["run", "--engine", "flower-sim", "--no-progress", "--output", str(tmp_path)]
    assert main([*args, "--set", "federation.num_clients=3", "--set", "output.name=x"]) == 0
    assert calls == [(3, tmp_path / "x", False)]


@pytest.mark.distributed
@pytest.mark.parametrize("strategy", ["hlora", "flora"])
def test_flower_simulation_matches_inprocess(
    strategy: str, tiny_bert_dir: Path, glue_dir: Path, tmp_path: Path, flower_env: Path
) -> None:
    from hlora.engines.flower.simulation import run_flower_simulation

    config = _tiny_config(tiny_bert_dir, glue_dir, tmp_path, **{"federation.strategy": strategy})
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

    ref, got = _records(reference.run_dir), _records(flower.run_dir)
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
    assert (flower.run_dir / "summary.json").is_file()
    assert sorted(p.name for p in (flower.run_dir / "adapters").glob("r*")) == ["r2", "r4"]


@pytest.mark.distributed
def test_flower_simulation_with_own_data(
    tiny_bert_dir: Path, glue_dir: Path, tmp_path: Path, flower_env: Path
) -> None:
    """Each virtual node trains on all of its own file and evaluates the global model on its
    own held-out file; the server reads no data at all (a federated evaluation)."""
    from hlora.engines.flower.simulation import run_flower_simulation
    from test_own_data import write_jsonl

    config = _tiny_config(tiny_bert_dir, tmp_path / "no-shared-task", tmp_path)
    own, _ = _own_files(glue_dir, tmp_path / "own", [10, 16, 22])
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
    records = _records(result.run_dir)
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


# -- deployment on 127.0.0.1 --------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _wait_for_port(port: int, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.3)
    raise TimeoutError(f"nothing listens on 127.0.0.1:{port} after {timeout:.0f} s")


def _stop(*procs: subprocess.Popen, kill: bool = False) -> None:
    """Stop processes we started and every process below them, each by its PID.

    All of ``procs`` are signalled before any is waited for: their shutdowns overlap.
    """
    psutil = pytest.importorskip("psutil")
    family = []
    for proc in procs:
        with contextlib.suppress(psutil.NoSuchProcess):
            family.extend(psutil.Process(proc.pid).children(recursive=True))
    running = [proc for proc in procs if proc.poll() is None]
    for proc in running:
        (proc.kill if kill else proc.terminate)()
    for proc in running:
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=15)
    for child in family:
        with contextlib.suppress(psutil.NoSuchProcess):
            (child.kill if kill else child.terminate)()
    _, alive = psutil.wait_procs(family, timeout=15)
    for child in alive:
        with contextlib.suppress(psutil.NoSuchProcess):
            child.kill()
    psutil.wait_procs(alive, timeout=15)


_SHORT_HEARTBEAT_SUPERNODE = """
import sys

import flwr.common.constant as constant
import flwr.supercore.heartbeat as heartbeat
import flwr.supernode.fleet_http_connection as connection
from flwr.supernode.cli import flower_supernode

for module in (constant, heartbeat, connection):
    assert hasattr(module, "HEARTBEAT_DEFAULT_INTERVAL"), module.__name__
    module.HEARTBEAT_DEFAULT_INTERVAL = constant.HEARTBEAT_MIN_INTERVAL
sys.exit(flower_supernode())
"""
"""``flower-supernode`` with Flower's shortest heartbeat interval (the SuperNode has no option
for it): the interval it declares to the SuperLink and the one its heartbeat thread keeps."""


_HOSTILE_NODE = """
# A hostile SuperNode, for tests: Python imports this module at the start of the SuperNode and of
# every ClientApp process it starts (PYTHONPATH). HLORA_HOSTILE names what its TRAIN reply does
# in each round, comma-separated; the round's honest reply is computed first.
import dataclasses
import os

import torch

from hlora.aggregation import LoraFactors
from hlora.engines.flower import codec, node

_honest_train = node.train


def _lie(kind, update):
    if kind == "huge-count":
        return dataclasses.replace(update, num_examples=2**62)
    if kind == "other-scaling":
        return dataclasses.replace(update, scaling=update.scaling * 4)
    if kind == "nan":
        extras = {k: torch.full_like(v, float("nan")) for k, v in update.extras.items()}
        return dataclasses.replace(update, extras=extras)
    if kind == "oversized":
        big = {n: LoraFactors(A=f.A * 1e3, B=f.B * 1e3) for n, f in update.factors.items()}
        return dataclasses.replace(update, factors=big)
    if kind == "wrong-rank":  # consistent factors of another rank
        wider = {
            n: LoraFactors(
                A=torch.cat([f.A, torch.zeros(2, f.A.shape[1])]),
                B=torch.cat([f.B, torch.zeros(f.B.shape[0], 2)], dim=1),
            )
            for n, f in update.factors.items()
        }
        return dataclasses.replace(update, rank=update.rank + 2, factors=wider)
    if kind == "as-client00":
        return dataclasses.replace(update, client_id="client00")
    raise ValueError(kind)


def hostile_train(local, node_config, content):
    instruction = codec.decode_instruction(content)
    reply = codec.decode_reply(_honest_train(local, node_config, content), instruction.client_id)
    kind = os.environ["HLORA_HOSTILE"].split(",")[instruction.round_num - 1]
    return codec.encode_reply(dataclasses.replace(reply, update=_lie(kind, reply.update)))


node.train = hostile_train
"""


class _WithoutClients:
    """The in-process transport, with ``absent`` clients failing every round (the reference of
    a federation whose hostile nodes are all dropped)."""

    def __init__(self, inner: object, absent: set[str]) -> None:
        self.inner = inner
        self.absent = absent

    def run_round(self, instructions: list[TrainInstruction]) -> object:
        from hlora.protocol import ClientFailure, RoundResult

        kept = [i for i in instructions if i.client_id not in self.absent]
        result = self.inner.run_round(kept)  # type: ignore[attr-defined]
        gone = [ClientFailure(i.client_id, "absent") for i in instructions if i not in kept]
        return RoundResult(result.replies, [*result.failures, *gone])


class LocalDeployment:
    """A SuperLink and ``num_nodes`` SuperNodes on 127.0.0.1, each its own process.

    Args:
        home: Folder for ``FLWR_HOME``, logs and state.
        num_nodes: SuperNodes; node ``i`` declares ``partition-id=i`` unless ``node_configs``.
        node_configs: Each node's ``--node-config`` string.
    """

    FEDERATION = "hlora-local"

    def __init__(self, home: Path, num_nodes: int, node_configs: list[str] | None = None) -> None:
        self.home = home
        self.num_nodes = num_nodes
        self.node_configs = node_configs or [
            f"partition-id={i} num-partitions={num_nodes}" for i in range(num_nodes)
        ]
        self.port = _free_port()
        self.env = dict(os.environ)
        self.env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{self.env.get('PATH', '')}"
        self.superlink: subprocess.Popen | None = None
        self.nodes: list[subprocess.Popen] = []
        self.logs: list[Path] = []

    def _spawn(
        self, name: str, args: list[str], env: dict[str, str] | None = None
    ) -> subprocess.Popen:
        log = self.home / f"{name}.log"
        self.logs.append(log)
        with log.open("wb") as out:
            return subprocess.Popen(
                args,
                stdout=out,
                stderr=subprocess.STDOUT,
                env={**self.env, **(env or {})},
                cwd=self.home,
                start_new_session=True,
            )

    def start_tls(self, certs: Path) -> None:
        """A SuperLink over TLS with SuperNode authentication; the CLI trusts ``certs/ca.crt``."""
        (Path(self.env["FLWR_HOME"]) / "config.toml").write_text(
            f'[superlink]\ndefault = "{self.FEDERATION}"\n\n'
            f"[superlink.{self.FEDERATION}]\n"
            f'address = "127.0.0.1:{self.port}"\n'
            f'root-certificates = "{certs / "ca.crt"}"\n'
        )
        self.superlink = self._spawn(
            "superlink",
            [
                str(Path(sys.executable).parent / "flower-superlink"),
                "--port",
                str(self.port),
                "--disable-runtime-dependency-installation",
                "--ssl-ca-certfile",
                str(certs / "ca.crt"),
                "--ssl-certfile",
                str(certs / "server.pem"),
                "--ssl-keyfile",
                str(certs / "server.key"),
                "--enable-supernode-auth",
            ],
        )
        _wait_for_port(self.port)

    def tls_supernode(
        self,
        name: str,
        certs: Path,
        key: Path,
        node_config: str,
        *,
        short_heartbeat: bool = False,
    ) -> subprocess.Popen:
        """A SuperNode that reaches the TLS SuperLink and signs with ``key`` (not waited for).

        With ``short_heartbeat`` it declares Flower's shortest heartbeat interval (10 s, not
        30 s): killed, the SuperLink marks it offline after 20 s instead of 60 s.
        """
        command = (
            [sys.executable, "-c", _SHORT_HEARTBEAT_SUPERNODE]
            if short_heartbeat
            else [str(Path(sys.executable).parent / "flower-supernode")]
        )
        return self._spawn(
            name,
            [
                *command,
                "--superlink",
                f"127.0.0.1:{self.port}",
                "--root-certificates",
                str(certs / "ca.crt"),
                "--auth-supernode-private-key",
                str(key),
                "--port",
                str(_free_port()),
                "--node-config",
                node_config,
            ],
        )

    def start(
        self, database: Path | None = None, node_env: dict[int, dict[str, str]] | None = None
    ) -> None:
        """The SuperLink (its state in ``database``, else in memory), then the SuperNodes;
        node ``i`` gets ``node_env[i]`` on top of the environment."""
        flwr_home = Path(self.env["FLWR_HOME"])
        (flwr_home / "config.toml").write_text(
            f'[superlink]\ndefault = "{self.FEDERATION}"\n\n[superlink.{self.FEDERATION}]\n'
            f'address = "127.0.0.1:{self.port}"\ninsecure = true\n'
        )
        self.start_superlink(database=database)
        bin_dir = Path(sys.executable).parent
        for i in range(self.num_nodes):
            self.nodes.append(
                self._spawn(
                    f"node{i}",
                    [
                        str(bin_dir / "flower-supernode"),
                        "--insecure",
                        "--superlink",
                        f"127.0.0.1:{self.port}",
                        "--port",
                        str(_free_port()),
                        "--node-config",
                        self.node_configs[i],
                    ],
                    (node_env or {}).get(i),
                )
            )

    def start_superlink(self, name: str = "superlink", database: Path | None = None) -> None:
        """An insecure SuperLink on ``self.port``, waited for; its state in ``database`` (an
        SQLite file that outlives it), else in memory."""
        state = ["--database", str(database)] if database is not None else []
        self.superlink = self._spawn(
            name,
            [
                str(Path(sys.executable).parent / "flower-superlink"),
                "--insecure",
                "--port",
                str(self.port),
                "--disable-runtime-dependency-installation",
                *state,
            ],
        )
        _wait_for_port(self.port)

    def kill_superlink(self) -> None:
        """SIGKILL the SuperLink and everything below it (the ServerApp process of a run)."""
        if self.superlink is not None:
            _stop(self.superlink, kill=True)

    def run(self, app_dir: Path, run_config: str, name: str = "flwr-run") -> subprocess.Popen:
        """``flwr run APP FEDERATION --stream --run-config ...`` (not waited for)."""
        bin_dir = Path(sys.executable).parent
        return self._spawn(
            name,
            [
                str(bin_dir / "flwr"),
                "run",
                str(app_dir),
                self.FEDERATION,
                "--stream",
                "--run-config",
                run_config,
            ],
        )

    def stop(self) -> None:
        """The SuperNodes (together; each deactivates itself), then the SuperLink (killed: no
        test looks at its shutdown, which waits seconds for connections to close)."""
        _stop(*self.nodes)
        if self.superlink is not None:
            _stop(self.superlink, kill=True)

    def tail(self, lines: int = 30) -> str:
        out = []
        for log in self.logs:
            text = log.read_text(errors="replace").splitlines() if log.exists() else []
            out.append(f"== {log.name}\n" + "\n".join(text[-lines:]))
        return "\n".join(out)


def _write_config(config: RunConfig, path: Path) -> Path:
    path.write_text(to_toml(config), encoding="utf-8")
    return path


def _run_config(
    config_path: Path,
    run_dir: Path,
    round_timeout: int,
    node_data: str = "simulated-partition",
    eval_data: str = "",
) -> str:
    return (
        f'hlora-config="{config_path}" run-dir="{run_dir}" round-timeout={round_timeout} '
        f'node-data="{node_data}" eval-data="{eval_data}"'
    )


def _wait(proc: subprocess.Popen, deployment: LocalDeployment, timeout: float) -> None:
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        pytest.fail(f"flwr run did not finish in {timeout:.0f} s\n{deployment.tail()}")


HOSTILE_ROUNDS = {
    "client02": ("huge-count", "wrong-rank", "oversized"),
    "client03": ("nan", "as-client00", "other-scaling"),
}
"""What each hostile node's TRAIN reply does in rounds 1, 2 and 3."""
HOSTILE_REASONS = {
    "huge-count": "claims 4611686018427387904 training examples",
    "wrong-rank": "differs",
    "oversized": "exceeds trust.update_norm_bound = 50",
    "nan": "non-finite",
    "as-client00": "malformed reply: reply is for client 'client00'",
    "other-scaling": "is not the run's",
}


@pytest.mark.distributed
def test_a_deployment_drops_hostile_nodes_and_resumes_after_its_superlink_is_killed(
    tiny_bert_dir: Path, glue_dir: Path, tmp_path: Path, flower_env: Path
) -> None:
    """Four SuperNodes on loopback, three rounds; two of them are hostile (``HOSTILE_ROUNDS``:
    each round another lie). Once round 1 is checkpointed the SuperLink is SIGKILLed with the
    ServerApp below it (and the ``flwr run`` that streams its log); a new SuperLink starts on
    the same port and database, the running SuperNodes reconnect to it, and ``flwr run`` on the
    same run folder resumes from the checkpoint.

    Lost: nothing. Every hostile reply is dropped with its reason, and every round equals an
    in-process run in which the two hostile clients never answer."""
    from hlora.engines.inprocess import InProcessTransport
    from hlora.federation import make_loop
    from hlora.report import RoundProgress

    config = _tiny_config(
        tiny_bert_dir,
        glue_dir,
        tmp_path,
        **{
            "federation.num_clients": 4,
            "federation.rounds": 3,
            "data.train_limit": 64,
            "data.partition": '"iid"',
            "trust.update_norm_bound": 50.0,
        },
    )
    config_path = _write_config(config, tmp_path / "run.toml")
    run_dir = tmp_path / "deployed"
    hostile_path = tmp_path / "hostile"
    hostile_path.mkdir()
    (hostile_path / "sitecustomize.py").write_text(_HOSTILE_NODE)
    pythonpath = os.pathsep.join(p for p in (str(hostile_path), os.environ.get("PYTHONPATH")) if p)
    node_env = {
        int(cid[-1]): {"PYTHONPATH": pythonpath, "HLORA_HOSTILE": ",".join(kinds)}
        for cid, kinds in HOSTILE_ROUNDS.items()
    }
    deployment = LocalDeployment(flower_env, num_nodes=4)
    runs: list[subprocess.Popen] = []
    try:
        database = flower_env / "superlink-state.db"
        deployment.start(database, node_env)
        runs.append(deployment.run(APP_DIR, _run_config(config_path, run_dir, 300)))
        # The reference runs in process while the deployment starts up.
        federation = build_federation(replace(config, output={"name": "inprocess"}))
        reference_dir = tmp_path / "inprocess"
        reference_dir.mkdir()
        transport = InProcessTransport(federation.runtime, federation.train_features)
        make_loop(
            federation,
            reference_dir,
            RoundProgress(3, enabled=False),
            _WithoutClients(transport, set(HOSTILE_ROUNDS)),  # type: ignore[arg-type]
        ).run()
        deadline = time.monotonic() + 600
        while not ((run_dir / "checkpoint.safetensors").exists() and _records(run_dir)):
            if runs[0].poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"round 1 never finished\n{deployment.tail()}")
            time.sleep(0.2)  # poll interval of a wait on a condition with a deadline
        deployment.kill_superlink()
        _stop(runs[0], kill=True)
        before = (run_dir / "metrics.jsonl").read_text().splitlines()
        assert len(before) == 1, "the run went past round 1 before it could be killed"
        deployment.start_superlink("superlink-restarted", database)
        runs.append(deployment.run(APP_DIR, _run_config(config_path, run_dir, 300), "rerun"))
        _wait(runs[1], deployment, 600)
        assert (run_dir / "summary.json").is_file(), deployment.tail()
    finally:
        _stop(*runs)
        deployment.stop()
    # Resumed, not redone: the round finished before the kill is the same line, timings in.
    after = (run_dir / "metrics.jsonl").read_text().splitlines()
    assert after[: len(before)] == before
    ref, got = _records(reference_dir), _records(run_dir)
    assert [r["round"] for r in got] == [1, 2, 3]
    clients = json.loads((run_dir / "clients.json").read_text())
    assert [c["client_id"] for c in clients] == [f"client{k:02d}" for k in range(4)]
    assert json.loads((run_dir / "dropped_nodes.json").read_text()) == []
    for a, b in zip(ref, got, strict=True):
        dropped = {d["client_id"]: d["reason"] for d in b["dropped"]}
        assert sorted(dropped) == sorted(HOSTILE_ROUNDS), b["dropped"]
        for cid, kinds in HOSTILE_ROUNDS.items():
            assert HOSTILE_REASONS[kinds[b["round"] - 1]] in dropped[cid], dropped[cid]
        accepted = {c["client_id"]: c["accepted"] for c in b["clients"]}
        assert accepted == {f"client{k:02d}": k < 2 for k in range(4)}
        assert [c["bytes_received"] for c in b["clients"][:2]] == [
            c["bytes_received"] for c in a["clients"][:2]
        ]
        assert b["eval"]["accuracy"] == a["eval"]["accuracy"]
        assert math.isclose(b["eval"]["loss"], a["eval"]["loss"], rel_tol=1e-4, abs_tol=1e-5)
        assert math.isclose(b["train_loss"], a["train_loss"], rel_tol=1e-4, abs_tol=1e-5)


def _own_files(glue_dir: Path, folder: Path, sizes: list[int]) -> tuple[list[Path], Path]:
    """Disjoint slices of MRPC train written as each node's own JSONL file, and a dev file."""
    from test_own_data import write_jsonl

    task = load_task("mrpc", glue_dir)
    folder.mkdir(parents=True, exist_ok=True)
    files, start = [], 0
    for k, size in enumerate(sizes):
        files.append(write_jsonl(folder / f"node{k}.jsonl", list(task.train[start : start + size])))
        start += size
    return files, write_jsonl(folder / "dev.jsonl", list(task.dev[:24]))


# -- TLS and SuperNode authentication on 127.0.0.1 -----------------------------------------------


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=60)


def _make_certificates(folder: Path) -> None:
    """A CA (``ca.crt``) and a server certificate for 127.0.0.1 it signed (``server.pem``)."""
    curve = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    _openssl(
        "req",
        "-x509",
        *curve,
        "-days",
        "2",
        "-keyout",
        "ca.key",
        "-out",
        "ca.crt",
        "-subj",
        "/CN=hlora-test-ca",
        cwd=folder,
    )
    _openssl(
        "req",
        *curve,
        "-keyout",
        "server.key",
        "-out",
        "server.csr",
        "-subj",
        "/CN=superlink",
        cwd=folder,
    )
    (folder / "san.ext").write_text("subjectAltName=DNS:localhost,IP:127.0.0.1\n")
    _openssl(
        "x509",
        "-req",
        "-in",
        "server.csr",
        "-CA",
        "ca.crt",
        "-CAkey",
        "ca.key",
        "-CAcreateserial",
        "-days",
        "2",
        "-extfile",
        "san.ext",
        "-out",
        "server.pem",
        cwd=folder,
    )


def _make_node_key(path: Path) -> None:
    """An ECDSA P-384 key pair in OpenSSH format: ``path`` (private), ``path.pub``."""
    if shutil.which("ssh-keygen"):
        subprocess.run(
            ["ssh-keygen", "-q", "-t", "ecdsa", "-b", "384", "-N", "", "-f", str(path)],
            check=True,
            capture_output=True,
            timeout=60,
        )
        return
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    key = ec.generate_private_key(ec.SECP384R1())
    path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.OpenSSH,
            serialization.NoEncryption(),
        )
    )
    path.chmod(0o600)
    Path(f"{path}.pub").write_bytes(
        key.public_key().public_bytes(
            serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
        )
    )


def _flwr_cli(deployment: LocalDeployment, *args: str) -> subprocess.CompletedProcess[str]:
    """``flwr ARGS`` against the deployment's SuperLink (bounded: 60 s)."""
    return subprocess.run(
        [str(Path(sys.executable).parent / "flwr"), *args],
        env=deployment.env,
        cwd=deployment.home,
        capture_output=True,
        text=True,
        timeout=60,
    )


def _listed_nodes(deployment: LocalDeployment) -> dict[str, str]:
    """Node id -> status, from ``flwr supernode list --format json``."""
    out = _flwr_cli(deployment, "supernode", "list", deployment.FEDERATION, "--format", "json")
    assert out.returncode == 0, out.stdout + out.stderr
    listing = json.loads(out.stdout[out.stdout.index("{") :])
    assert listing["success"], listing
    return {str(n["node-id"]): str(n["status"]) for n in listing["nodes"]}


def _register(deployment: LocalDeployment, public_key: Path) -> str:
    """Register a SuperNode key with ``flwr supernode register``; the node id it was given."""
    args = ["supernode", "register", str(public_key), deployment.FEDERATION, "--format", "json"]
    deadline = time.monotonic() + 60
    while True:
        reg = _flwr_cli(deployment, *args)
        if reg.returncode == 0 or time.monotonic() > deadline:
            break
        time.sleep(1.0)  # the port may open before the Control API answers
    assert reg.returncode == 0, reg.stdout + reg.stderr + deployment.tail()
    answer = json.loads(reg.stdout[reg.stdout.index("{") :])
    assert answer["success"], answer
    return str(answer["node-id"])


def _wait_for_line(
    log: Path, text: str, deployment: LocalDeployment, timeout: float, *, watch: subprocess.Popen
) -> None:
    """Poll ``log`` until it holds ``text``; fail when ``watch`` exits first or on timeout."""
    deadline = time.monotonic() + timeout
    while not (log.exists() and text in log.read_text(errors="replace")):
        if time.monotonic() > deadline or watch.poll() is not None:
            pytest.fail(f"{log.name} has no {text!r} after {timeout:.0f} s\n{deployment.tail()}")
        time.sleep(0.2)


@pytest.mark.distributed
def test_flower_tls_auth_run_with_a_supernode_killed_mid_round_and_restarted(
    tiny_bert_dir: Path, glue_dir: Path, tmp_path: Path, flower_env: Path
) -> None:
    """A whole training run over TLS with SuperNode authentication, nodes on their own data
    (no shared task anywhere: the config's data folder does not exist). One deployment for:

    - authentication: three keys registered with ``flwr supernode register`` over TLS are
      listed as registered; the registered SuperNodes come online under the ids registration
      gave them. Once round 1 runs, a SuperNode with an unknown key tries to join: it is refused
      and exits non-zero, never a node.
    - a node dying mid-round: the node on 22 examples is killed (SIGKILL, with its ClientApp)
      while it trains round 2. The run goes on without it: that client is dropped with the
      reason in round 2 and in round 3, whose message was sent while the SuperLink knew it
      offline; the node on 10 examples loses nothing (accepted in every round).
    - its restart: started again with the same key once round 3 was sent, it keeps its node id,
      so it is the same client (never a late node), and takes part again up to the last round.
    - a node removed mid-run: once round 4 is sent, the node on 16 examples has its key
      unregistered (``flwr supernode unregister``). It took part in rounds 1-3; round 5 drops
      it with the reason, and the run ends with the other two.

    The killed node declares a 10 s heartbeat (the others Flower's 30 s): the SuperLink marks it
    offline, and round 2 ends, 20 s after the kill instead of 60 s.
    """
    if shutil.which("openssl") is None:
        pytest.skip("the openssl command-line tool is not installed")
    config = _tiny_config(
        tiny_bert_dir, tmp_path / "no-shared-task", tmp_path, **{"federation.rounds": 5}
    )
    config_path = _write_config(config, tmp_path / "run.toml")
    own, dev = _own_files(glue_dir, tmp_path / "own", [10, 16, 22])
    certs = tmp_path / "certs"
    certs.mkdir()
    _make_certificates(certs)
    for name in ("key0", "key1", "key2", "stranger"):
        _make_node_key(tmp_path / name)
    deployment = LocalDeployment(flower_env, num_nodes=0)

    def supernode(name: str, key: str, k: int, short_heartbeat: bool = False) -> subprocess.Popen:
        proc = deployment.tls_supernode(
            name, certs, tmp_path / key, f'own-data="{own[k]}"', short_heartbeat=short_heartbeat
        )
        deployment.nodes.append(proc)
        return proc

    run_dir = tmp_path / "deployed"
    flwr_run = None
    try:
        deployment.start_tls(certs)
        # The CLI talks to the SuperLink over TLS (root-certificates in FLWR_HOME/config.toml).
        ids = [_register(deployment, tmp_path / f"key{k}.pub") for k in range(3)]
        listed = _listed_nodes(deployment)
        assert listed == dict.fromkeys(ids, "registered") and len(set(ids)) == 3, listed

        nodes = [supernode(f"node{k}", f"key{k}", k, short_heartbeat=k == 2) for k in range(3)]
        # The registered ones are online, under the ids registration gave them.
        for k, node in enumerate(nodes):
            _wait_for_line(
                flower_env / f"node{k}.log", f"SuperNode ID: {ids[k]}", deployment, 90, watch=node
            )
        assert _listed_nodes(deployment) == dict.fromkeys(ids, "online")

        flwr_run = deployment.run(APP_DIR, _run_config(config_path, run_dir, 300, "own", str(dev)))
        # Mid-run, a SuperNode with an unknown key tries to join (checked once the run ends).
        _wait_for_line(flower_env / "node0.log", "ROUND 1]", deployment, 400, watch=flwr_run)
        stranger = supernode("stranger", "stranger", 0)
        # Kill node 2 while it trains round 2: its SuperNode logs the round-2 message.
        _wait_for_line(flower_env / "node2.log", "ROUND 2]", deployment, 400, watch=flwr_run)
        _stop(nodes[2], kill=True)
        # Round 2 ends once the SuperLink marks node 2 offline; round 3 is sent while it is.
        _wait_for_line(flower_env / "node0.log", "ROUND 3]", deployment, 400, watch=flwr_run)
        listed = _listed_nodes(deployment)
        assert listed[ids[2]] == "offline", listed
        restarted_node = supernode("node2-restarted", "key2", 2)  # same key: same node id
        _wait_for_line(
            flower_env / "node2-restarted.log",
            f"SuperNode ID: {ids[2]}",
            deployment,
            90,
            watch=restarted_node,
        )
        listed = _listed_nodes(deployment)
        assert listed == dict.fromkeys(ids, "online"), listed  # the stranger never became one
        # Remove node 1 from the federation once round 4 is sent.
        _wait_for_line(flower_env / "node0.log", "ROUND 4]", deployment, 400, watch=flwr_run)
        removed = _flwr_cli(deployment, "supernode", "unregister", ids[1], deployment.FEDERATION)
        assert removed.returncode == 0, removed.stdout + removed.stderr
        _wait(flwr_run, deployment, 600)
        assert (run_dir / "summary.json").is_file(), deployment.tail()
        assert _listed_nodes(deployment)[ids[1]] == "unregistered"
        # The unknown key was refused: that SuperNode gave up and exited non-zero.
        try:
            code = stranger.wait(timeout=90)
        except subprocess.TimeoutExpired:
            pytest.fail(f"the unregistered SuperNode still runs after 90 s\n{deployment.tail()}")
        log = (flower_env / "stranger.log").read_text(errors="replace")
        assert code != 0, log
        assert "Failed to activate SuperNode" in log, log
        assert "No SuperNode found with the given public key" in (
            flower_env / "superlink.log"
        ).read_text(errors="replace")
    finally:
        if flwr_run is not None:
            _stop(flwr_run)
        deployment.stop()
    clients = json.loads((run_dir / "clients.json").read_text())
    # Clients in node id order, each with all of its own file's examples, accepted at join
    # time, under the registered node ids only.
    assert [c["client_id"] for c in clients] == ["client00", "client01", "client02"]
    assert [c["node_id"] for c in clients] == sorted(c["node_id"] for c in clients)
    assert sorted(str(c["node_id"]) for c in clients) == sorted(ids)
    assert sorted(c["num_examples"] for c in clients) == [10, 16, 22]
    assert {c["data_mode"] for c in clients} == {"own"}
    killed = next(c for c in clients if str(c["node_id"]) == ids[2])
    assert killed["num_examples"] == 22
    restarted = killed["client_id"]
    kept = next(c for c in clients if str(c["node_id"]) == ids[0])["client_id"]
    gone = next(c for c in clients if str(c["node_id"]) == ids[1])["client_id"]
    records = _records(run_dir)
    assert [r["round"] for r in records] == [1, 2, 3, 4, 5]
    assert records[0]["dropped"] == []
    accepted = [{c["client_id"]: c["accepted"] for c in r["clients"]} for r in records]
    assert all(a[kept] for a in accepted)  # node 0 loses nothing
    assert [a[gone] for a in accepted[:3]] == [True, True, True]
    assert accepted[0][restarted]
    for record in records[1:3]:  # round 2: killed during it; round 3: known offline
        dropped = record["dropped"]
        assert [d["client_id"] for d in dropped] == [restarted]
        assert f"node {ids[2]}" in dropped[0]["reason"]
        assert accepted[record["round"] - 1] == {c["client_id"]: c is not killed for c in clients}
    back = [r for r, a in enumerate(accepted, start=1) if r > 3 and a[restarted]]
    assert back and back[-1] == 5, accepted  # it takes part again, to the last round
    # Round 5 was sent after node 1's key was unregistered: the SuperLink did not take its
    # message, so the round dropped it at once, with that reason (no wait for a timeout).
    (dropped,) = records[4]["dropped"]
    assert dropped == {"client_id": gone, "reason": f"node {ids[1]}: error 5: {REFUSED}"}
    assert accepted[4] == {kept: True, gone: False, restarted: True}
    for record in records:
        assert {d["client_id"] for d in record["dropped"]} <= {restarted, gone}
        assert record["bytes_received"] > 0 and "eval" in record
    # Neither the stranger nor the restarted node (back under its registered id) is a late node.
    assert json.loads((run_dir / "dropped_nodes.json").read_text()) == []


# -- a restarted server resumes ------------------------------------------------------------------


@pytest.mark.distributed
def test_flower_simulation_resumes_a_stopped_run(
    tiny_bert_dir: Path,
    glue_dir: Path,
    tmp_path: Path,
    flower_env: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from hlora.engines.flower.simulation import run_flower_simulation
    from hlora.report import RoundProgress

    config = _tiny_config(tiny_bert_dir, glue_dir, tmp_path, **{"federation.rounds": 3})
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
    assert [r["round"] for r in _records(run_dir)] == [1]
    assert not (run_dir / "summary.json").exists()
    # The same configuration resumes; another one is still refused.
    with pytest.raises(ConfigError, match="already holds a run"):
        run_flower_simulation(replace(flower, federation={"rounds": 4}), run_dir, progress=False)
    result = run_flower_simulation(flower, run_dir, progress=False)

    ref, got = _records(reference.run_dir), _records(result.run_dir)
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
