"""The Flower engine: hlora's round loop over Flower's Message API (simulation or deployment).

The server side is :class:`hlora.server.RoundLoop` (written once) over a
:class:`FlowerTransport`, which sends one ``TRAIN`` message per node and turns the replies into
:class:`~hlora.protocol.TrainReply` and errors, timeouts and malformed replies into
:class:`~hlora.protocol.ClientFailure`. Before round 1 a ``QUERY`` round asks every node its
``partition-id``, number of training examples and declared ``rank`` / ``memory-mb``; node
``partition-id = k`` becomes client ``client{k:02d}`` (as in the in-process engine).

The client side is a thin shell: decode the instruction, get this process's
:class:`~hlora.runtime.ModelRuntime` and this node's partition (both cached per process, keyed by
the configuration), train, encode the reply. A node derives its partition exactly as
:func:`hlora.federation.build_federation` does, so both engines train on the same examples.

Settings reach the apps through ``context.run_config`` (``[tool.flwr.app.config]``):

* ``hlora-config``: absolute path of the hlora TOML run configuration (read by the server and
  every node; a relative path resolves against each process's working folder).
* ``run-dir``: the server's run folder (empty: ``output.dir/output.name`` as ``hlora run``).
* ``round-timeout``: seconds to wait for a round's replies (0: no limit).
* ``node-wait``: seconds the server waits for ``federation.num_clients`` nodes to connect.

Per-node settings come from ``context.node_config`` (``flower-supernode --node-config``):
``partition-id``, ``num-partitions`` (both set by Flower itself in simulation) and optionally
``data-dir`` (this node's GLUE folder), ``rank`` (wins over the config's rank rule) or
``memory-mb`` (rank by ``federation.rank_rule = "memory"`` semantics with this budget).

:func:`run_flower_simulation` runs a whole federation in Flower's simulation runtime (Ray); the
module-level ``server_app`` / ``client_app`` are the entry points of a deployment
(``flwr run``).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from flwr.app import ConfigRecord, Context, Message, MessageType, RecordDict
from flwr.clientapp import ClientApp
from flwr.common.logger import log as flwr_log
from flwr.serverapp import Grid, ServerApp

from hlora.adapters import LayerShape, LoraBank
from hlora.aggregation import InvalidUpdateError
from hlora.checkpoint import ServerState, load_state
from hlora.config import CONFIG_FILE, RunConfig, load_config, replace, to_toml
from hlora.data.collate import DynamicPaddingCollator, tokenize_pairs
from hlora.data.glue import get_task
from hlora.engines.flower_codec import (
    content_bytes,
    decode_instruction,
    decode_reply,
    encode_instruction,
    encode_reply,
)
from hlora.errors import ConfigError, HloraError
from hlora.federation import (
    CHECKPOINT_FILE,
    Federation,
    RunResult,
    assign_ranks,
    build_federation,
    client_partitions,
    fingerprint,
    finish,
    load_run_task,
    make_loop,
    new_run_dir,
    pair_examples,
)
from hlora.io import write_text_atomic
from hlora.models import Backbone, load_backbone
from hlora.protocol import ClientFailure, RoundResult, TrainInstruction, TrainReply
from hlora.report import MetricsLog, RoundProgress, write_json
from hlora.runtime import Features, ModelRuntime, resolve_device
from hlora.server import ClientSlot, FederationError, RoundLoop

logger = logging.getLogger(__name__)

CONFIG_KEY = "hlora-config"
RUN_DIR_KEY = "run-dir"
ROUND_TIMEOUT_KEY = "round-timeout"
NODE_WAIT_KEY = "node-wait"
DEFAULT_NODE_WAIT_S = 120.0


def match_replies(messages: Sequence[Message], replies: Iterable[Message]) -> list[Message | None]:
    """The reply to each sent message, or None where none came.

    Replies are matched by ``reply_to_message_id``, not by ``src_node_id``: the error replies
    the SuperLink itself makes for an unavailable node carry node id 0.
    """
    by_request = {r.metadata.reply_to_message_id: r for r in replies}
    return [by_request.get(m.metadata.message_id) for m in messages]


# -- node identity (QUERY round) -----------------------------------------------------------------


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
        cfg = reply.content["hlora.node"]
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


# -- the transport -------------------------------------------------------------------------------


class FlowerTransport:
    """Sends each instruction to its node as a ``TRAIN`` message and collects the replies.

    Args:
        grid: The ServerApp's grid.
        node_of: Client id -> Flower node id.
        timeout: Seconds to wait for a round's replies (None: until every node answers).
        on_client_done: Called as ``(client_id, rank, loss)`` per client (progress).
    """

    def __init__(
        self,
        grid: Grid,
        node_of: Mapping[str, int],
        timeout: float | None = None,
        on_client_done: Callable[[str, int, float | None], None] | None = None,
    ) -> None:
        self.grid = grid
        self.node_of = dict(node_of)
        self.timeout = timeout
        self.on_client_done = on_client_done
        self.wire_bytes: dict[str, tuple[int, int]] = {}
        """Client id -> (array bytes sent, received) of the last round, ``.npy`` headers in."""

    def run_round(self, instructions: Sequence[TrainInstruction]) -> RoundResult:
        """One round: a message per node, then replies, failures for the rest."""
        messages = []
        sent: dict[str, int] = {}
        for instruction in instructions:
            content = encode_instruction(instruction)
            sent[instruction.client_id] = content_bytes(content)
            messages.append(
                Message(
                    content,
                    dst_node_id=self.node_of[instruction.client_id],
                    message_type=MessageType.TRAIN,
                    group_id=str(instruction.round_num),
                )
            )
        answers = match_replies(
            messages, self.grid.send_and_receive(messages, timeout=self.timeout)
        )
        replies: list[TrainReply] = []
        failures: list[ClientFailure] = []
        self.wire_bytes = {}
        for instruction, answer in zip(instructions, answers, strict=True):
            cid = instruction.client_id
            node = self.node_of[cid]
            reply, failure = self._one(cid, node, answer)
            if reply is not None:
                replies.append(reply)
            if failure is not None:
                logger.warning("client %s (node %d) dropped: %s", cid, node, failure.reason)
                failures.append(failure)
            got = content_bytes(answer.content) if answer is not None and reply else 0
            self.wire_bytes[cid] = (sent[cid], got)
            logger.info("client %s (node %d): sent %d B, received %d B", cid, node, sent[cid], got)
            if self.on_client_done:
                self.on_client_done(cid, instruction.rank, reply.loss if reply else None)
        return RoundResult(replies=replies, failures=failures)

    def _one(
        self, client_id: str, node: int, message: Message | None
    ) -> tuple[TrainReply | None, ClientFailure | None]:
        if message is None:
            limit = f"within {self.timeout:g} s" if self.timeout else ""
            return None, ClientFailure(client_id, f"node {node}: no reply {limit}".strip())
        if message.has_error():
            err = message.error
            return None, ClientFailure(client_id, f"node {node}: error {err.code}: {err.reason}")
        try:
            return decode_reply(message.content, client_id), None
        except InvalidUpdateError as err:
            return None, ClientFailure(client_id, f"node {node}: {err.reason}")


# -- the server ----------------------------------------------------------------------------------


def _make_loop(
    federation: Federation, run_dir: Path, progress: RoundProgress, transport: FlowerTransport
) -> RoundLoop:
    transport.on_client_done = progress.client_done
    return make_loop(federation, run_dir, progress, transport)


def check_runnable(config: RunConfig, run_dir: Path) -> ServerState | None:
    """Refuse what the Flower engine cannot run, before anything starts.

    A run folder that already holds ``config.toml`` is refused unless it also holds a
    checkpoint of this same configuration: then the run resumes from it.

    Returns:
        The checkpointed state to resume from, or None for a new run.

    Raises:
        ConfigError: The ``centralized`` reference mode, or a run folder already in use (by
            another configuration, or without a checkpoint).
        CheckpointError: A corrupt checkpoint.
    """
    if config.federation.strategy == "centralized":
        raise ConfigError(
            "strategy 'centralized' has one client and no federation: use --engine inprocess"
        )
    if not (run_dir / CONFIG_FILE).exists():
        return None
    checkpoint = run_dir / CHECKPOINT_FILE
    if checkpoint.exists() and fingerprint(load_config(run_dir / CONFIG_FILE)) == fingerprint(
        config
    ):
        return load_state(checkpoint, fingerprint(config))
    raise ConfigError(
        f"run folder '{run_dir}' already holds a run (of another configuration, or with no "
        "finished round to resume from): choose another output.name"
    )


def serve(
    grid: Grid,
    config: RunConfig,
    run_dir: Path,
    *,
    progress: bool,
    round_timeout: float | None = None,
    node_wait_s: float = DEFAULT_NODE_WAIT_S,
) -> RunResult:
    """The whole server side of a Flower run: query nodes, run the rounds, write the run folder.

    A run folder holding a checkpoint of the same configuration resumes after the checkpoint's
    round (see :func:`check_runnable`): ``metrics.jsonl`` is cut back to that round and the nodes
    must map to the same clients, ranks and example counts as in ``clients.json``.

    Raises:
        HloraError: Bad input, missing nodes, or a round that cannot go on.
    """
    resumed = check_runnable(config, run_dir)
    federation = build_federation(config)  # the server's model: evaluation and the update spec
    infos = query_nodes(
        grid, config.federation.num_clients, wait_s=node_wait_s, timeout=round_timeout
    )
    shapes = federation.runtime.bank.layer_shapes()
    rule_ranks = assign_ranks(config, shapes)
    slots = [
        ClientSlot(i.client_id, node_rank(config, shapes, i, rule_ranks), i.num_examples)
        for i in infos
    ]
    federation = dataclasses.replace(federation, clients=slots)
    if resumed is not None:
        before = json.loads((run_dir / "clients.json").read_text(encoding="utf-8"))
        now = [s.__dict__ for s in slots]
        if [{k: c[k] for k in now[0]} for c in before] != now:
            raise FederationError(
                f"cannot resume '{run_dir}': the nodes now declare {now}, the run had {before}"
            )
        MetricsLog(run_dir / "metrics.jsonl").truncate_to_round(resumed.round_num)
        logger.info("resuming %s after round %d", run_dir, resumed.round_num)
    run_dir.mkdir(parents=True, exist_ok=True)
    write_text_atomic(run_dir / CONFIG_FILE, to_toml(config))
    write_json(
        run_dir / "clients.json",
        [{**s.__dict__, "node_id": i.node_id} for s, i in zip(slots, infos, strict=True)],
    )
    transport = FlowerTransport(grid, {i.client_id: i.node_id for i in infos}, round_timeout)
    with RoundProgress(config.federation.rounds, enabled=progress) as bar:
        state = _make_loop(federation, run_dir, bar, transport).run(resumed)
    return finish(federation, run_dir, state)


def make_server_app(
    config: RunConfig | None = None,
    run_dir: Path | None = None,
    *,
    progress: bool = False,
    results: list[RunResult] | None = None,
    errors: list[BaseException] | None = None,
) -> ServerApp:
    """A ServerApp running :func:`serve`.

    Args:
        config: The configuration; None: read ``context.run_config["hlora-config"]``.
        run_dir: The run folder; None: ``run-dir`` from the run config, else a new one.
        progress: Show progress bars.
        results: The finished run's :class:`RunResult` is appended here (simulation).
        errors: An exception of the server is appended here instead of propagating.
    """
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        """The whole run (see :func:`serve`)."""
        settings = dict(context.run_config)
        try:
            cfg = config if config is not None else _config_from(settings)
            target = run_dir or Path(str(settings.get(RUN_DIR_KEY) or new_run_dir(cfg)))
            timeout = float(settings.get(ROUND_TIMEOUT_KEY, 0) or 0) or None
            wait = float(settings.get(NODE_WAIT_KEY, DEFAULT_NODE_WAIT_S))
            result = serve(
                grid, cfg, target, progress=progress, round_timeout=timeout, node_wait_s=wait
            )
            flwr_log(logging.INFO, "hlora run finished: %s", result.run_dir)
            if results is not None:
                results.append(result)
        except BaseException as err:
            if errors is None:
                raise
            errors.append(err)

    return app


def _config_from(settings: Mapping[str, Any]) -> RunConfig:
    path = settings.get(CONFIG_KEY)
    if not path:
        raise ConfigError(
            f"the Flower run config has no '{CONFIG_KEY}' key: set it in "
            "[tool.flwr.app.config] or with flwr run --run-config"
        )
    return load_config(str(path))


# -- the client ------------------------------------------------------------------------------


_RUNTIMES: dict[tuple[str, ...], tuple[ModelRuntime, Backbone]] = {}
_PARTITIONS: dict[tuple[str, ...], Features] = {}


def partition_features(
    config: RunConfig, backbone: Backbone, partition_id: int, num_partitions: int
) -> Features:
    """This node's tokenized training examples, derived as :func:`build_federation` does.

    Same :func:`~hlora.federation.load_run_task` and
    :func:`~hlora.federation.client_partitions` (seeded by ``federation.seed``), then the
    examples of partition ``partition_id`` tokenized with the backbone's tokenizer.

    Args:
        config: The run configuration (``data.data_dir`` already resolved for this node).
        backbone: The backbone (its tokenizer and architecture).
        partition_id: The node's partition, in ``[0, num_partitions)``.
        num_partitions: Number of partitions (``federation.num_clients``).

    Raises:
        ConfigError: A partition id out of range.
        HloraError: Missing or bad data.
    """
    if not 0 <= partition_id < num_partitions:
        raise ConfigError(f"partition-id {partition_id} is not in [0, {num_partitions})")
    task = load_run_task(config)
    parts = client_partitions(config, task, num_partitions)
    mine = [task.train[i] for i in parts[partition_id]]
    return tokenize_pairs(
        backbone.tokenizer, pair_examples(mine, backbone), config.model.max_length
    )


def client_runtime(config: RunConfig, extra_rank: int = 0) -> tuple[ModelRuntime, Backbone]:
    """This process's model, cached per configuration (one serves every node of a process).

    Args:
        config: The run configuration.
        extra_rank: A node-declared rank the LoRA bank must hold besides ``federation.ranks``.

    Returns:
        The runtime and its backbone.
    """
    ranks = sorted(set(config.federation.ranks) | ({extra_rank} if extra_rank else set()))
    key = (fingerprint(config), ",".join(map(str, ranks)))
    if key not in _RUNTIMES:
        backbone = load_backbone(
            config.model.name, get_task(config.data.task).num_labels, seed=config.federation.seed
        )
        bank = LoraBank(
            backbone,
            ranks,
            scaling=config.model.lora_scaling,
            target_modules=config.model.target_modules or None,
            dropout=config.model.lora_dropout,
        )
        runtime = ModelRuntime(
            bank,
            DynamicPaddingCollator(backbone.tokenizer),
            config.train,
            resolve_device(config.train.device),
        )
        _RUNTIMES[key] = (runtime, backbone)
    return _RUNTIMES[key]


def _node_setup(config: RunConfig, node: Mapping[str, Any]) -> tuple[ModelRuntime, Features, int]:
    """This process's runtime, this node's features (both cached) and its partition id."""
    partition_id = int(node.get("partition-id", -1))
    num_partitions = int(node.get("num-partitions", 0))
    if partition_id < 0 or num_partitions < 1:
        raise ConfigError(
            "this node has no 'partition-id' / 'num-partitions': start it with "
            "flower-supernode --node-config 'partition-id=K num-partitions=N'"
        )
    if node.get("data-dir"):
        config = replace(config, data={"data_dir": str(node["data-dir"])})
    runtime, backbone = client_runtime(config, int(node.get("rank", 0) or 0))
    key = (fingerprint(config), str(partition_id), str(num_partitions))
    if key not in _PARTITIONS:
        _PARTITIONS[key] = partition_features(config, backbone, partition_id, num_partitions)
    return runtime, _PARTITIONS[key], partition_id


def make_client_app(config: RunConfig | None = None) -> ClientApp:
    """A ClientApp answering ``QUERY`` (who am I) and ``TRAIN`` (one round of local training).

    Args:
        config: The configuration; None: read ``context.run_config["hlora-config"]``.
    """
    app = ClientApp()

    def cfg(context: Context) -> RunConfig:
        """The hlora configuration of this run."""
        return config if config is not None else _config_from(dict(context.run_config))

    @app.query()
    def query(msg: Message, context: Context) -> Message:
        """This node's partition id, number of examples and declared rank / memory budget."""
        node = dict(context.node_config)
        _, features, partition_id = _node_setup(cfg(context), node)
        info = ConfigRecord(
            {
                "partition-id": partition_id,
                "num-partitions": int(node["num-partitions"]),
                "num-examples": len(features),
                "rank": int(node.get("rank", 0) or 0),
                "memory-mb": float(node.get("memory-mb", 0) or 0),
            }
        )
        return Message(RecordDict({"hlora.node": info}), reply_to=msg)

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        """One round of local training on this node's partition (errors go back as errors)."""
        instruction = decode_instruction(msg.content)
        runtime, features, partition_id = _node_setup(cfg(context), dict(context.node_config))
        if instruction.client_id != f"client{partition_id:02d}":
            raise HloraError(
                f"node with partition-id {partition_id} got {instruction.client_id}'s instruction"
            )
        reply = runtime.train_client(instruction, features)
        return Message(encode_reply(reply), reply_to=msg)

    return app


# -- simulation ---------------------------------------------------------------------------------


def run_flower_simulation(config: RunConfig, run_dir: Path, *, progress: bool) -> RunResult:
    """Run a whole federation in Flower's simulation runtime (Ray), one virtual node per client.

    Each virtual node gets 1 CPU and no GPU; Ray runs as many client actors as there are CPUs.

    Raises:
        HloraError: Bad input, or a round that cannot go on.
    """
    from flwr.simulation import run_simulation

    check_runnable(config, run_dir)
    results: list[RunResult] = []
    errors: list[BaseException] = []
    n = config.federation.num_clients
    backend_config: dict[str, Any] = {
        "client_resources": {"num_cpus": 1, "num_gpus": 0.0},
        "init_args": {"num_cpus": max(1, min(n, os.cpu_count() or 1)), "num_gpus": 0},
    }
    flwr_logger = logging.getLogger("flwr")  # Flower logs through its own handler: no echo
    propagate, flwr_logger.propagate = flwr_logger.propagate, False
    try:
        run_simulation(
            server_app=make_server_app(
                config, run_dir, progress=progress, results=results, errors=errors
            ),
            client_app=make_client_app(config),
            num_supernodes=n,
            backend_config=backend_config,
        )
    finally:
        flwr_logger.propagate = propagate
    if errors:
        raise errors[0]
    if not results:
        raise FederationError("the Flower simulation ended without a result (see its log)")
    return results[0]


# Entry points of a deployment (``[tool.flwr.app.components]`` in pyproject.toml).
server_app = make_server_app(progress=False)
client_app = make_client_app()
