"""The node task behind the ClientApp: this node's model, data and training.

A node trains in one of two data modes (:class:`NodeData`, from its ``--node-config``):

* ``own`` (``own-data=PATH``): the node trains on **all** of its own examples, a GLUE-layout
  folder or one TSV / CSV / JSONL file (:mod:`hlora.data.files`); it reads no one else's. The
  server learns its example count from the QUERY answer, once.
* ``simulated-partition`` (``partition-id`` and ``num-partitions``, as Flower's simulation sets
  them): for simulations and tests, the node loads a shared task and keeps partition
  ``partition-id`` of it, derived exactly as :func:`hlora.federation.build_federation` does, so
  both engines train on the same examples.

The model and the features are cached per process, keyed by the configuration: in simulation
a Ray actor keeps them across rounds; a deployed SuperNode starts a new ClientApp process per
message (Flower's stateless design), which loads the model again and reads the tokenized
features from the node's disk cache (:mod:`~hlora.engines.flower.features`).

The configuration a node trains with is the server's (the ``hlora.run`` record of its messages,
:mod:`~hlora.engines.flower.manifest`), with this node's own paths; a node refuses the run in
one line (the QUERY answer's ``refused`` key) when its model is not the run's or its data
cannot be read.

Per-node settings come from ``context.node_config`` (``flower-supernode --node-config``):
``own-data``, or ``partition-id`` and ``num-partitions`` (both set by Flower itself in
simulation) with ``data-dir`` (the shared GLUE folder); optionally ``model-dir`` (this node's
copy of a model folder), ``cache-dir`` (the features cache; ``none``: off), ``rank`` (wins
over the config's rank rule) or ``memory-mb`` (rank by ``federation.rank_rule = "memory"``
semantics with this budget).
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from flwr.app import ConfigRecord, RecordDict

from hlora.config import RunConfig, fingerprint, replace
from hlora.data.files import read_own_data
from hlora.data.glue import INSTRUCTIONS, get_task, resolve_data_dir, task_tsv_path
from hlora.data.instructions import read_instructions
from hlora.engines.flower.codec import (
    NODE_INFO,
    CodecError,
    decode_eval_instruction,
    decode_instruction,
    encode_eval_reply,
    encode_moments_reply,
    encode_reply,
)
from hlora.engines.flower.features import cached_features, features_key, resolve_cache_dir
from hlora.engines.flower.manifest import (
    RunManifest,
    backbone_sha256,
    check_model,
    model_sha256,
    node_run_config,
)
from hlora.engines.flower.settings import DATA_MODES, OWN, SIMULATED
from hlora.errors import ConfigError, HloraError
from hlora.federation import client_partitions, load_run_task
from hlora.models import Backbone
from hlora.protocol import EvalReply, MomentsReply
from hlora.runtime import Features, ModelRuntime
from hlora.stack import build_stack, load_run_backbone, run_objective

_RUNTIMES: dict[tuple[str, ...], tuple[ModelRuntime, Backbone]] = {}
_PARTITIONS: dict[tuple[str, ...], Features] = {}
_HELD_OUT: dict[tuple[str, ...], Features] = {}
_MODEL_SHA: dict[str, str] = {}  # fingerprint(config) -> backbone_sha256 before LoRA was added


def _node_int(node: Mapping[str, Any], key: str) -> int:
    value = node.get(key)
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lstrip("-").isdigit():
        return int(value.strip())
    raise ConfigError(f"node config '{key}' must be an integer, got {value!r}")


@dataclass(frozen=True)
class NodeData:
    """Where a node's training examples come from (its ``--node-config``), parsed once.

    ``own-data`` wins over ``partition-id``: Flower's simulation sets ``partition-id`` on every
    node, so a simulated node given its own data trains on that data.

    Attributes:
        mode: ``own`` or ``simulated-partition`` (:data:`DATA_MODES`).
        own_data: The node's own GLUE folder or TSV / CSV / JSONL file (mode ``own``).
        partition_id: The node's partition of the shared task (mode ``simulated-partition``).
        num_partitions: The number of partitions (mode ``simulated-partition``).
        cache_dir: The features cache folder ('' : the default; ``none``: no cache).
    """

    mode: str = field(metadata={"help": "own | simulated-partition"})
    own_data: str = field(default="", metadata={"help": "the node's own data (mode own)"})
    partition_id: int = field(default=-1, metadata={"help": "partition of the shared task"})
    num_partitions: int = field(default=0, metadata={"help": "number of partitions"})
    cache_dir: str = field(default="", metadata={"help": "features cache ('none': off)"})
    eval_data: str = field(default="", metadata={"help": "the node's own held-out data"})

    def __post_init__(self) -> None:
        if self.mode not in DATA_MODES:
            raise ConfigError(f"node data mode {self.mode!r} is not one of {DATA_MODES}")
        if self.mode == OWN and not self.own_data:
            raise ConfigError("node data mode 'own' needs 'own-data'")
        if self.mode == SIMULATED and not 0 <= self.partition_id < self.num_partitions:
            raise ConfigError(
                f"node config partition-id {self.partition_id} is not in "
                f"[0, num-partitions = {self.num_partitions})"
            )

    @staticmethod
    def from_node_config(node: Mapping[str, Any]) -> NodeData:
        """Parse ``context.node_config``.

        Raises:
            ConfigError: Neither ``own-data`` nor ``partition-id`` / ``num-partitions``, or a
                partition that is not an integer in range.
        """
        cache = str(node.get("cache-dir") or "")
        held_out = str(node.get("eval-data") or "").strip()
        own = str(node.get("own-data") or "").strip()
        if own:
            return NodeData(OWN, own_data=own, cache_dir=cache, eval_data=held_out)
        if "partition-id" not in node or "num-partitions" not in node:
            raise ConfigError(
                "this node declares no data: start it with flower-supernode --node-config "
                "'own-data=PATH' (its own data), or 'partition-id=K num-partitions=N' (a "
                "simulated partition of a shared task)"
            )
        return NodeData(
            SIMULATED,
            partition_id=_node_int(node, "partition-id"),
            num_partitions=_node_int(node, "num-partitions"),
            cache_dir=cache,
            eval_data=held_out,
        )


def own_features(config: RunConfig, backbone: Backbone, path: str) -> Features:
    """All of a node's own training examples, tokenized (:func:`hlora.data.files.read_own_data`).

    Args:
        config: The run configuration (its task, ``model.max_length``).
        backbone: The backbone (its tokenizer and architecture).
        path: The node's GLUE-layout folder or TSV / CSV / JSONL file.

    Raises:
        DataError: Missing or malformed data (naming the file and the line).
    """
    if config.data.task == INSTRUCTIONS:  # every example one class: categories are the server's
        mine: tuple[Any, ...] = read_instructions(path, category_field=config.data.category_field)
    else:
        mine = read_own_data(path, config.data.task).train
    return run_objective(config, backbone).train_features(mine)


def held_out_examples(config: RunConfig, data: NodeData) -> tuple[Any, ...]:
    """This node's held-out examples for a federated evaluation (see :class:`NodeData`).

    ``eval-data`` (a file read whole, or a GLUE folder's ``dev.tsv``); else the ``dev.tsv`` of
    an ``own-data`` folder (none for a file or an instruction file); else, for a simulated
    partition, every ``num_partitions``-th example of the shared dev split from
    ``partition_id`` on (the nodes' shares make up the whole dev split).

    Raises:
        DataError: Missing or malformed data (naming the file and the line).
    """
    task = config.data.task
    if data.eval_data:
        if task == INSTRUCTIONS:
            return read_instructions(data.eval_data, category_field=config.data.category_field)
        read = read_own_data(data.eval_data, task)
        return read.held_out if Path(data.eval_data).expanduser().is_dir() else read.train
    if data.mode == OWN:
        return () if task == INSTRUCTIONS else read_own_data(data.own_data, task).held_out
    dev = load_run_task(config).dev
    return tuple(dev[data.partition_id :: data.num_partitions])


def own_data_files(path: str, task: str) -> list[Path]:
    """The files a node's own data is read from (for the features cache key)."""
    where = Path(path).expanduser()
    if task == INSTRUCTIONS or not where.is_dir():
        return [where]
    return [task_tsv_path(where, task, "train")]


def node_features(config: RunConfig, backbone: Backbone, data: NodeData) -> Features:
    """This node's tokenized training examples, through the on-disk features cache.

    Raises:
        HloraError: Missing or bad data.
    """
    cache = resolve_cache_dir(data.cache_dir)
    setting = [
        f"task={config.data.task}",
        f"max_length={config.model.max_length}",
        f"architecture={backbone.architecture}",
        f"task_type={config.model.task_type}",
        f"system_prompt={config.data.system_prompt}",
    ]
    if data.mode == OWN:
        files = own_data_files(data.own_data, config.data.task)
        if not all(f.is_file() for f in files):
            return own_features(config, backbone, data.own_data)  # raises naming the path
        key = features_key(files, backbone.tokenizer, [OWN, *setting])
        return cached_features(cache, key, lambda: own_features(config, backbone, data.own_data))
    folder = resolve_data_dir(config.data.data_dir or None)
    parts = [
        SIMULATED,
        f"fingerprint={fingerprint(config)}",
        f"data_dir={folder}",
        f"partition={data.partition_id}/{data.num_partitions}",
        *setting,
    ]
    shared: list[Path] = []
    if folder is not None and config.data.task != "qqp-sample":
        shared = [task_tsv_path(folder, config.data.task, s) for s in ("train", "dev")]

    def make() -> Features:
        return partition_features(config, backbone, data.partition_id, data.num_partitions)

    if not shared or not all(f.is_file() for f in shared):
        return make()  # hub or qqp-sample data, or none: not keyed by file hashes, not cached
    return cached_features(cache, features_key(shared, backbone.tokenizer, parts), make)


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
    return run_objective(config, backbone).train_features(mine)


def client_runtime(
    config: RunConfig, extra_rank: int = 0, *, hash_model: bool = False
) -> tuple[ModelRuntime, Backbone]:
    """This process's model, cached per configuration (one serves every node of a process).

    Args:
        config: The run configuration.
        extra_rank: A node-declared rank the LoRA bank must hold besides ``federation.ranks``.
        hash_model: Also record :func:`node_model_sha256` of the model as loaded.

    Returns:
        The runtime and its backbone.
    """
    ranks = sorted(set(config.federation.ranks) | ({extra_rank} if extra_rank else set()))
    key = (fingerprint(config), ",".join(map(str, ranks)))
    if key not in _RUNTIMES:
        backbone = load_run_backbone(config)
        if hash_model:
            _MODEL_SHA[fingerprint(config)] = backbone_sha256(backbone)
        stack = build_stack(config, ranks, backbone=backbone)
        _RUNTIMES[key] = (stack.runtime, backbone)
    return _RUNTIMES[key]


def node_model_sha256(config: RunConfig) -> str:
    """:func:`~hlora.engines.flower.manifest.backbone_sha256` of this node's model (cached)."""
    key = fingerprint(config)
    if key not in _MODEL_SHA:
        _MODEL_SHA[key] = model_sha256(config)
    return _MODEL_SHA[key]


def run_config(
    local: RunConfig | None, node: Mapping[str, Any], content: RecordDict
) -> tuple[RunConfig, RunManifest | None]:
    """The configuration this node trains with, and the server's manifest if it sent one.

    Args:
        local: This node's own copy of the configuration, if any (the only one when the server
            sends none).
        node: The node's ``context.node_config``.
        content: The message's content.

    Raises:
        HloraError: No configuration at all, a malformed manifest, or a model folder this node
            has no copy of.
    """
    try:
        manifest = RunManifest.from_content(content)
    except CodecError as err:
        raise HloraError(f"malformed run configuration from the server: {err}") from err
    if manifest is not None:
        return node_run_config(manifest, local, node), manifest
    if local is None:
        raise ConfigError(
            "the server sent no run configuration and this node has none: set 'hlora-config' "
            "in the Flower run config"
        )
    return local, None


def node_data(config: RunConfig, node: Mapping[str, Any]) -> tuple[RunConfig, NodeData]:
    """This node's data declaration, and the configuration with its own shared-task folder
    (``data-dir``, mode ``simulated-partition``).

    Raises:
        ConfigError: A node config declaring no data, or a bad partition.
    """
    data = NodeData.from_node_config(node)
    if data.mode == SIMULATED and node.get("data-dir"):
        config = replace(config, data={"data_dir": str(node["data-dir"])})
    return config, data


def node_setup(
    config: RunConfig, node: Mapping[str, Any], *, hash_model: bool = False
) -> tuple[ModelRuntime, Features, NodeData]:
    """This process's runtime, this node's features (both cached) and its data declaration.

    Args:
        config: The run configuration.
        node: The node's ``context.node_config``.
        hash_model: Also record the model's hash (the QUERY round).

    Raises:
        ConfigError: A node config declaring no data, or a bad partition.
        HloraError: Missing or bad data or model.
    """
    config, data = node_data(config, node)
    runtime, backbone = client_runtime(config, int(node.get("rank", 0) or 0), hash_model=hash_model)
    key = (
        fingerprint(config),
        data.mode,
        data.own_data,
        f"{data.partition_id}/{data.num_partitions}",
        data.cache_dir,
    )
    if key not in _PARTITIONS:
        _PARTITIONS[key] = node_features(config, backbone, data)
    if not _PARTITIONS[key]:
        raise HloraError(f"this node's data ({data.own_data or data.mode}) has no examples")
    return runtime, _PARTITIONS[key], data


def node_held_out(config: RunConfig, node: Mapping[str, Any], runtime: ModelRuntime) -> Features:
    """This node's held-out examples (:func:`held_out_examples`), tokenized; cached per
    process.

    Raises:
        HloraError: Missing or bad data.
    """
    config, data = node_data(config, node)
    key = (fingerprint(config), data.mode, data.own_data, data.eval_data, str(data.partition_id))
    if key not in _HELD_OUT:
        _HELD_OUT[key] = runtime.objective.eval_features(held_out_examples(config, data))
    return _HELD_OUT[key]


def node_info(local: RunConfig | None, node: Mapping[str, Any], content: RecordDict) -> RecordDict:
    """The QUERY answer: data mode, number of examples and of each label, number of held-out
    examples (for a federated evaluation), declared rank / memory budget and, in the
    ``simulated-partition`` mode, the partition.

    A node that cannot take part (its model is not the run's, its data cannot be read, its node
    config declares no data) answers only ``refused``: the first line of the reason.

    Args:
        local: This node's own copy of the configuration, if any.
        node: The node's ``context.node_config``.
        content: The QUERY message's content (the server's ``hlora.run`` manifest).
    """
    try:
        config, manifest = run_config(local, node, content)
        runtime, features, data = node_setup(config, node, hash_model=manifest is not None)
        if manifest is not None:
            check_model(manifest, config, node_model_sha256(config))
        held_out = node_held_out(config, node, runtime)
    except HloraError as err:
        line = (str(err).strip().splitlines() or [type(err).__name__])[0]
        return RecordDict({NODE_INFO: ConfigRecord({"refused": line})})
    counts = [0] * get_task(config.data.task).num_labels
    for feature in features:
        counts[runtime.objective.label(feature)] += 1
    answer: dict[str, Any] = {
        "data-mode": data.mode,
        "num-examples": len(features),
        "label-counts": counts,
        "eval-examples": len(held_out),
        "rank": int(node.get("rank", 0) or 0),
        "memory-mb": float(node.get("memory-mb", 0) or 0),
    }
    if data.mode == SIMULATED:
        answer.update({"partition-id": data.partition_id, "num-partitions": data.num_partitions})
    return RecordDict({NODE_INFO: ConfigRecord(answer)})


def train(local: RunConfig | None, node: Mapping[str, Any], content: RecordDict) -> RecordDict:
    """One round of local training on all of this node's examples (its own data, or its
    simulated partition).

    In the ``own`` mode the server names the client (by node id, fixed at the QUERY round); in
    the ``simulated-partition`` mode the instruction must be for ``client{partition-id:02d}``.

    Args:
        local: This node's own copy of the configuration, if any.
        node: The node's ``context.node_config``.
        content: The ``TRAIN`` message's content (an encoded instruction and the server's
            ``hlora.run`` manifest).

    Returns:
        The encoded reply.

    Raises:
        HloraError: An instruction for another client, bad data or a failed training.
    """
    instruction = decode_instruction(content)
    config, _ = run_config(local, node, content)
    runtime, features, data = node_setup(config, node)
    _check_client(data, instruction.client_id)
    return encode_reply(runtime.train_client(instruction, features))


def _check_client(data: NodeData, client_id: str) -> None:
    """A node on a simulated partition serves only ``client{partition-id:02d}``."""
    if data.mode == SIMULATED and client_id != f"client{data.partition_id:02d}":
        raise HloraError(f"node with partition-id {data.partition_id} got {client_id}'s message")


def evaluate(local: RunConfig | None, node: Mapping[str, Any], content: RecordDict) -> RecordDict:
    """A federated evaluation: the global model of the ``EVALUATE`` message on this node's
    held-out examples (:func:`node_held_out`); the reply holds counts, not metrics
    (:func:`~hlora.engines.flower.codec.encode_eval_reply`).

    Raises:
        HloraError: A malformed message, bad data or no held-out examples.
    """
    start = time.perf_counter()
    instruction = decode_eval_instruction(content)
    config, _ = run_config(local, node, content)
    runtime, _, _ = node_setup(config, node)
    held_out = node_held_out(config, node, runtime)
    if not held_out:
        raise HloraError("this node has no held-out data to evaluate on")
    counts = runtime.evaluation_counts(
        instruction.layers,
        instruction.extras,
        held_out,
        config.server.eval_batch_size,
        base_version=instruction.base_version,
        base_delta=instruction.base_delta,
    )
    reply = EvalReply(instruction.client_id, len(held_out), counts, time.perf_counter() - start)
    return encode_eval_reply(reply)


def moments(local: RunConfig | None, node: Mapping[str, Any], content: RecordDict) -> RecordDict:
    """The ``query.moments`` answer: per-class moments of the features entering the head's
    final linear layer, under the message's global model, on this node's training examples
    (:meth:`~hlora.runtime.ModelRuntime.feature_moments`).

    Raises:
        HloraError: A malformed message, bad data, or a model without a calibratable head.
    """
    start = time.perf_counter()
    instruction = decode_eval_instruction(content)
    config, _ = run_config(local, node, content)
    runtime, features, data = node_setup(config, node)
    _check_client(data, instruction.client_id)
    m = runtime.feature_moments(
        instruction.layers,
        instruction.extras,
        features,
        config.server.eval_batch_size,
        base_version=instruction.base_version,
        base_delta=instruction.base_delta,
    )
    reply = MomentsReply(instruction.client_id, m, time.perf_counter() - start)
    return encode_moments_reply(reply)
