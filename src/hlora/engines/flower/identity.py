"""The server's QUERY round: which Flower node is which hlora client, at which rank.

Before round 1 the server asks every connected node its data mode, number of training
examples and declared ``rank`` / ``memory-mb`` (the node's answer is
:func:`hlora.engines.flower.node.node_info`). Which node becomes which client:

* data mode ``own`` (each node its own data): the nodes in ascending Flower node id order
  become ``client00``, ``client01``, ... (at most ``federation.num_clients``; the rank rule's
  client ``k`` is the ``k``-th). With SuperNode authentication a node's id is fixed by its
  registered key, so the mapping is the same every time the run starts or resumes;
* data mode ``simulated-partition``: node ``partition-id = k`` becomes client ``client{k:02d}``
  (as in the in-process engine).

Nothing a node declares is taken on trust: a node that fails the query or does not answer it,
refuses the run (its model is not the run's, its data cannot be read), answers with a malformed
record, declares a partition out of range or one another node also
declares, or a rank the run does not have, is dropped with its reason (:class:`NodeDrop`), and
the run goes on while ``federation.min_clients`` nodes remain. The example count a node declares
here is the one its later replies must repeat (see :mod:`hlora.trust`).
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from flwr.app import ConfigRecord, Message, MessageType, RecordDict
from flwr.serverapp import Grid

from hlora.config import RunConfig, replace
from hlora.data.glue import get_task
from hlora.engines.flower.codec import NODE_INFO, RUN
from hlora.engines.flower.settings import DATA_MODES, DEFAULT_REPLY_POLL_S, OWN, SIMULATED
from hlora.engines.flower.transport import match_replies, send_and_receive
from hlora.errors import ConfigError, HloraError
from hlora.federation import assign_ranks
from hlora.memory import FootprintFn
from hlora.server import ClientSlot, FederationError


@dataclass(frozen=True)
class NodeInfo:
    """What one node declared in the QUERY round.

    Attributes:
        node_id: Flower's node id.
        partition_id: The node's partition ``k`` (mode ``simulated-partition``; -1 in ``own``).
        num_partitions: Partitions the node split the data into (0 in mode ``own``).
        num_examples: Training examples of the node (its own data, or its partition).
        rank: Declared LoRA rank (0: none declared).
        memory_mb: Declared adapter memory budget in MiB (0: none declared).
        data_mode: ``own`` or ``simulated-partition``.
        label_counts: Declared training examples per label (they sum to ``num_examples``).
        eval_examples: Declared held-out examples, for a federated evaluation (0: none).
        client_index: The client ``k`` the server made of it (:func:`admit`; -1 before).
    """

    node_id: int
    partition_id: int
    num_partitions: int
    num_examples: int
    rank: int = 0
    memory_mb: float = 0.0
    data_mode: str = SIMULATED
    label_counts: tuple[int, ...] = ()
    eval_examples: int = 0
    client_index: int = -1

    @property
    def index(self) -> int:
        """The client ``k`` of this node: its client index, else its partition id."""
        return self.client_index if self.client_index >= 0 else self.partition_id

    @property
    def client_id(self) -> str:
        """The hlora client id of this node (``client{k:02d}``)."""
        return f"client{self.index:02d}"


@dataclass(frozen=True)
class NodeDrop:
    """A node the server does not take into the run (or not into a round).

    Attributes:
        node_id: Flower's node id.
        reason: Why, in words.
        when: ``"query"`` (before round 1) or ``"round N"``.
    """

    node_id: int
    reason: str
    when: str = "query"


@dataclass(frozen=True)
class Roster:
    """The outcome of the QUERY round.

    Attributes:
        accepted: The nodes taken into the run, by client index.
        dropped: The nodes left out, with their reasons, by node id.
    """

    accepted: list[NodeInfo]
    dropped: list[NodeDrop] = field(default_factory=list)


def _int(record: Mapping[str, object], key: str, low: int) -> int:
    value = record.get(key)
    if isinstance(value, bool) or not isinstance(value, int):
        raise HloraError(f"'{key}' is {value!r}, expected an integer")
    if value < low:
        raise HloraError(f"'{key}' is {value}, expected >= {low}")
    return value


def _label_counts(value: object, num_examples: int) -> tuple[int, ...]:
    counts = tuple(value) if isinstance(value, list) else ()
    valid = all(isinstance(c, int) and not isinstance(c, bool) and c >= 0 for c in counts)
    if not counts or not valid or sum(counts) != num_examples:
        raise HloraError(
            f"'label-counts' is {value!r}, expected integers >= 0 summing to num-examples "
            f"= {num_examples}"
        )
    return counts


def parse_node_info(node_id: int, reply: Message | None, timeout: float | None) -> NodeInfo:
    """One node's QUERY reply as a :class:`NodeInfo`.

    Raises:
        HloraError: Why the node is dropped: no reply, an error reply, a missing record, a
            missing key or a value of the wrong type or range.
    """
    if reply is None:
        limit = f" within {timeout:g} s" if timeout else ""
        raise HloraError(f"no reply to the query{limit}")
    if reply.has_error():
        raise HloraError(f"failed the query: error {reply.error.code}: {reply.error.reason}")
    content: RecordDict = reply.content
    record = content.get(NODE_INFO) if NODE_INFO in content else None
    if not isinstance(record, ConfigRecord):
        raise HloraError(f"malformed query reply: no '{NODE_INFO}' record")
    if "refused" in record:
        raise HloraError(f"refused: {record['refused']!s:.500}")
    try:
        memory = record.get("memory-mb")
        if isinstance(memory, bool) or not isinstance(memory, int | float):
            raise HloraError(f"'memory-mb' is {memory!r}, expected a number")
        if not math.isfinite(memory) or memory < 0:
            raise HloraError(f"'memory-mb' is {memory!r}, expected a finite number >= 0")
        mode = record.get("data-mode")
        if mode not in DATA_MODES:
            raise HloraError(f"'data-mode' is {mode!r}, expected one of {', '.join(DATA_MODES)}")
        simulated = mode == SIMULATED
        num_examples = _int(record, "num-examples", 1)
        counts = _label_counts(record.get("label-counts"), num_examples)
        return NodeInfo(
            node_id=node_id,
            partition_id=_int(record, "partition-id", 0) if simulated else -1,
            num_partitions=_int(record, "num-partitions", 1) if simulated else 0,
            num_examples=num_examples,
            rank=_int(record, "rank", 0),
            memory_mb=float(memory),
            data_mode=str(mode),
            label_counts=counts,
            eval_examples=_int(record, "eval-examples", 0) if "eval-examples" in record else 0,
        )
    except HloraError as err:
        raise HloraError(f"malformed query reply: {err}") from err


def admit(infos: Sequence[NodeInfo], expected: int, mode: str = SIMULATED) -> Roster:
    """Keep the nodes whose identity is consistent; drop the others with their reasons.

    A node of another data mode than the run's is left out. In the ``own`` mode the nodes in
    ascending node id order become clients ``0, 1, ...``; nodes beyond ``expected`` are left
    out. In the ``simulated-partition`` mode a partition id out of ``[0, expected)``, a
    ``num-partitions`` other than ``expected``, or a partition id declared by several nodes
    (all of them are dropped: the server cannot tell which one is genuine) leaves the node out.

    Args:
        infos: Parsed QUERY replies.
        expected: ``federation.num_clients``.
        mode: The run's node data mode (run config ``node-data``).
    """
    dropped: list[NodeDrop] = []
    same = []
    for info in infos:
        if info.data_mode != mode:
            dropped.append(
                NodeDrop(
                    info.node_id,
                    f"node data mode '{info.data_mode}', the run's nodes use '{mode}' (run "
                    "config node-data)",
                )
            )
        else:
            same.append(info)
    if mode == OWN:
        ordered = sorted(same, key=lambda i: i.node_id)
        accepted = [_as_client(info, k) for k, info in enumerate(ordered[:expected])]
        for info in ordered[expected:]:
            dropped.append(
                NodeDrop(
                    info.node_id,
                    f"the run's federation.num_clients = {expected} clients are taken by nodes "
                    "with smaller ids",
                )
            )
        return Roster(accepted, sorted(dropped, key=lambda d: d.node_id))
    claimants: dict[int, list[int]] = {}
    valid = []
    for info in same:
        if not 0 <= info.partition_id < expected or info.num_partitions != expected:
            dropped.append(
                NodeDrop(
                    info.node_id,
                    f"declares partition-id {info.partition_id} of {info.num_partitions}: "
                    f"expected partition-id in [0, {expected}) of federation.num_clients = "
                    f"{expected}",
                )
            )
            continue
        claimants.setdefault(info.partition_id, []).append(info.node_id)
        valid.append(info)
    accepted = []
    for info in valid:
        nodes = claimants[info.partition_id]
        if len(nodes) > 1:
            others = ", ".join(str(n) for n in sorted(nodes))
            dropped.append(
                NodeDrop(
                    info.node_id, f"partition-id {info.partition_id} is declared by nodes {others}"
                )
            )
        else:
            accepted.append(_as_client(info, info.partition_id))
    accepted.sort(key=lambda i: i.client_index)
    dropped.sort(key=lambda d: d.node_id)
    return Roster(accepted, dropped)


def _as_client(info: NodeInfo, client_index: int) -> NodeInfo:
    """``info`` as client ``client_index``."""
    return dataclasses.replace(info, client_index=client_index)


def node_rank(
    config: RunConfig, footprint: FootprintFn, info: NodeInfo, rule_ranks: Sequence[int]
) -> int:
    """The rank of one node: declared rank, else rank for its memory budget, else the config rule.

    Args:
        config: The run configuration.
        footprint: What a client of each rank needs in memory (for memory budgets).
        info: The node's declaration.
        rule_ranks: :func:`hlora.federation.assign_ranks` for the whole federation.

    Raises:
        ConfigError: A declared rank outside ``federation.ranks``, or a budget too small.
    """
    ranks = config.federation.ranks
    if info.rank:
        if info.rank not in ranks:
            raise ConfigError(
                f"node {info.node_id} ({info.client_id}) declares rank {info.rank}: "
                f"expected one of federation.ranks = {list(ranks)}"
            )
        return info.rank
    if info.memory_mb:
        one = replace(
            config,
            federation={
                "rank_rule": "memory",
                "memory_budgets_mb": (info.memory_mb,),
                "num_clients": 1,
                "clients_per_round": 0,
            },
        )
        return assign_ranks(one, footprint)[0]
    return rule_ranks[info.index]


def assign_slots(
    config: RunConfig, footprint: FootprintFn, roster: Roster
) -> tuple[list[ClientSlot], Roster]:
    """Each accepted node's client slot (id, rank, example count); a node whose declared rank or
    memory budget the run cannot serve, or whose label counts do not fit the task, is dropped
    with the reason.

    Raises:
        FederationError: Fewer than ``federation.min_clients`` nodes remain.
    """
    rule_ranks = assign_ranks(config, footprint)
    slots, accepted, dropped = [], [], list(roster.dropped)
    num_labels = get_task(config.data.task).num_labels
    for info in roster.accepted:
        try:
            if info.label_counts and len(info.label_counts) != num_labels:
                raise ConfigError(
                    f"node {info.node_id} declares {len(info.label_counts)} label counts: task "
                    f"'{config.data.task}' has {num_labels} labels"
                )
            rank = node_rank(config, footprint, info, rule_ranks)
        except ConfigError as err:
            dropped.append(NodeDrop(info.node_id, str(err)))
            continue
        slots.append(ClientSlot(info.client_id, rank, info.num_examples))
        accepted.append(info)
    roster = Roster(accepted, sorted(dropped, key=lambda d: d.node_id))
    require_nodes(roster, config.federation.min_clients)
    return slots, roster


def require_nodes(roster: Roster, min_clients: int) -> None:
    """Raise unless at least ``min_clients`` nodes were accepted.

    Raises:
        FederationError: Naming every dropped node and its reason.
    """
    if len(roster.accepted) >= min_clients:
        return
    reasons = "; ".join(f"node {d.node_id}: {d.reason}" for d in roster.dropped) or "none"
    raise FederationError(
        f"only {len(roster.accepted)} nodes accepted, fewer than federation.min_clients = "
        f"{min_clients} (dropped: {reasons})"
    )


def query_nodes(
    grid: Grid,
    expected: int,
    *,
    wait_s: float,
    timeout: float | None,
    min_clients: int = 1,
    run_record: ConfigRecord | None = None,
    mode: str = SIMULATED,
    poll_s: float = DEFAULT_REPLY_POLL_S,
) -> Roster:
    """Wait for ``expected`` nodes, ask each who it is, keep those whose answer holds.

    The server waits up to ``wait_s`` seconds for ``expected`` nodes; with fewer by then it goes
    on with those connected when they are at least ``min_clients``.

    Args:
        grid: The ServerApp's grid.
        expected: ``federation.num_clients``.
        wait_s: Seconds to wait for the nodes to connect.
        timeout: Seconds to wait for the QUERY replies (None: no limit).
        min_clients: ``federation.min_clients``.
        run_record: The run's manifest (``hlora.run``), sent with the query.
        mode: The run's node data mode (run config ``node-data``).
        poll_s: Seconds between the pulls for replies.

    Returns:
        The accepted nodes by client index and the dropped ones with their reasons.

    Raises:
        FederationError: Fewer than ``min_clients`` nodes connected or accepted.
    """
    deadline = time.monotonic() + wait_s
    node_ids = sorted(grid.get_node_ids())
    while len(node_ids) < expected and time.monotonic() < deadline:
        time.sleep(1.0)
        node_ids = sorted(grid.get_node_ids())
    if len(node_ids) < min(expected, min_clients):
        raise FederationError(
            f"only {len(node_ids)} of federation.num_clients = {expected} nodes connected "
            f"within {wait_s:.0f} s (federation.min_clients = {min_clients})"
        )
    content = {RUN: run_record} if run_record is not None else {}
    messages = [
        Message(
            RecordDict(dict(content)),
            dst_node_id=n,
            message_type=MessageType.QUERY,
            group_id="query",
        )
        for n in node_ids
    ]
    answers = match_replies(messages, send_and_receive(grid, messages, timeout, poll_s))
    infos: list[NodeInfo] = []
    dropped: list[NodeDrop] = []
    for node, reply in zip(node_ids, answers, strict=True):
        try:
            infos.append(parse_node_info(node, reply, timeout))
        except HloraError as err:
            dropped.append(NodeDrop(node, str(err)))
    roster = admit(infos, expected, mode)
    roster = Roster(roster.accepted, sorted([*dropped, *roster.dropped], key=lambda d: d.node_id))
    require_nodes(roster, min_clients)
    return roster
