"""The server's QUERY round: which Flower node is which hlora client, at which rank.

Before round 1 the server asks every connected node its ``partition-id``, number of training
examples and declared ``rank`` / ``memory-mb`` (the node's answer is
:func:`hlora.engines.flower.node.node_info`); node ``partition-id = k`` becomes client
``client{k:02d}`` (as in the in-process engine).
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from flwr.app import Message, MessageType, RecordDict
from flwr.serverapp import Grid

from hlora.adapters import LayerShape
from hlora.config import RunConfig, replace
from hlora.engines.flower.codec import NODE_INFO
from hlora.engines.flower.transport import match_replies
from hlora.errors import ConfigError
from hlora.federation import assign_ranks
from hlora.server import FederationError


@dataclass(frozen=True)
class NodeInfo:
    """What one node declared in the QUERY round.

    Attributes:
        node_id: Flower's node id.
        partition_id: The node's partition ``k`` (its client id is ``client{k:02d}``).
        num_partitions: Partitions the node split the data into.
        num_examples: Training examples of its partition.
        rank: Declared LoRA rank (0: none declared).
        memory_mb: Declared adapter memory budget in MiB (0: none declared).
    """

    node_id: int
    partition_id: int
    num_partitions: int
    num_examples: int
    rank: int = 0
    memory_mb: float = 0.0

    @property
    def client_id(self) -> str:
        """The hlora client id of this node."""
        return f"client{self.partition_id:02d}"


def node_rank(
    config: RunConfig, shapes: Mapping[str, LayerShape], info: NodeInfo, rule_ranks: Sequence[int]
) -> int:
    """The rank of one node: declared rank, else rank for its memory budget, else the config rule.

    Args:
        config: The run configuration.
        shapes: Adapted layer shapes (for memory budgets).
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
        return assign_ranks(one, dict(shapes))[0]
    return rule_ranks[info.partition_id]


def query_nodes(
    grid: Grid, expected: int, *, wait_s: float, timeout: float | None
) -> list[NodeInfo]:
    """Wait for ``expected`` nodes, ask each who it is, return the answers by partition id.

    Raises:
        FederationError: Too few nodes in ``wait_s`` seconds, a node that fails the query, or
            two nodes with the same partition id.
    """
    deadline = time.monotonic() + wait_s
    node_ids = sorted(grid.get_node_ids())
    while len(node_ids) < expected and time.monotonic() < deadline:
        time.sleep(1.0)
        node_ids = sorted(grid.get_node_ids())
    if len(node_ids) < expected:
        raise FederationError(
            f"only {len(node_ids)} of federation.num_clients = {expected} nodes connected "
            f"within {wait_s:.0f} s"
        )
    messages = [
        Message(RecordDict(), dst_node_id=n, message_type=MessageType.QUERY, group_id="query")
        for n in node_ids
    ]
    infos = []
    answers = match_replies(messages, grid.send_and_receive(messages, timeout=timeout))
    for node, reply in zip(node_ids, answers, strict=True):
        if reply is None:
            continue  # counted below
        if reply.has_error():
            raise FederationError(f"node {node} failed the query: {reply.error.reason}")
        cfg = reply.content[NODE_INFO]
        infos.append(
            NodeInfo(
                node_id=node,
                partition_id=int(cfg["partition-id"]),  # type: ignore[arg-type]
                num_partitions=int(cfg["num-partitions"]),  # type: ignore[arg-type]
                num_examples=int(cfg["num-examples"]),  # type: ignore[arg-type]
                rank=int(cfg["rank"]),  # type: ignore[arg-type]
                memory_mb=float(cfg["memory-mb"]),  # type: ignore[arg-type]
            )
        )
    infos.sort(key=lambda i: i.partition_id)
    seen: dict[int, int] = {}
    for info in infos:
        if info.partition_id in seen:
            raise FederationError(
                f"nodes {seen[info.partition_id]} and {info.node_id} both declare "
                f"partition-id {info.partition_id}"
            )
        if not 0 <= info.partition_id < expected or info.num_partitions != expected:
            raise FederationError(
                f"node {info.node_id} declares partition-id {info.partition_id} of "
                f"{info.num_partitions}: expected num-partitions = federation.num_clients = "
                f"{expected}"
            )
        seen[info.partition_id] = info.node_id
    if len(infos) < expected:
        raise FederationError(f"only {len(infos)} of {expected} nodes answered the query")
    return infos
