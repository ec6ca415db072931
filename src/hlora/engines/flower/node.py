"""The node task behind the ClientApp: this node's model, data and training.

A node derives its partition exactly as :func:`hlora.federation.build_federation` does, so both
engines train on the same examples. The model and the partition are cached per process, keyed
by the configuration: in simulation a Ray actor keeps them across rounds; a deployed SuperNode
starts a new ClientApp process per message (Flower's stateless design), which loads them again.

The configuration a node trains with is the server's (the ``hlora.run`` record of its messages,
:mod:`~hlora.engines.flower.manifest`), with this node's own paths; a node refuses the run in
one line (the QUERY answer's ``refused`` key) when its model is not the run's or its data
cannot be read.

Per-node settings come from ``context.node_config`` (``flower-supernode --node-config``):
``partition-id``, ``num-partitions`` (both set by Flower itself in simulation) and optionally
``data-dir`` (this node's GLUE folder), ``model-dir`` (this node's copy of a model folder),
``rank`` (wins over the config's rank rule) or ``memory-mb`` (rank by
``federation.rank_rule = "memory"`` semantics with this budget).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from flwr.app import ConfigRecord, RecordDict

from hlora.adapters import LoraBank
from hlora.config import RunConfig, replace
from hlora.data.collate import DynamicPaddingCollator, tokenize_pairs
from hlora.data.glue import get_task
from hlora.engines.flower.codec import NODE_INFO, CodecError, decode_instruction, encode_reply
from hlora.engines.flower.manifest import (
    RunManifest,
    backbone_sha256,
    check_model,
    model_sha256,
    node_run_config,
)
from hlora.errors import ConfigError, HloraError
from hlora.federation import client_partitions, fingerprint, load_run_task, pair_examples
from hlora.models import Backbone, load_backbone
from hlora.runtime import Features, ModelRuntime, resolve_device

_RUNTIMES: dict[tuple[str, ...], tuple[ModelRuntime, Backbone]] = {}
_PARTITIONS: dict[tuple[str, ...], Features] = {}
_MODEL_SHA: dict[str, str] = {}  # fingerprint(config) -> backbone_sha256 before LoRA was added


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
        backbone = load_backbone(
            config.model.name, get_task(config.data.task).num_labels, seed=config.federation.seed
        )
        if hash_model:
            _MODEL_SHA[fingerprint(config)] = backbone_sha256(backbone)
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


def node_setup(
    config: RunConfig, node: Mapping[str, Any], *, hash_model: bool = False
) -> tuple[ModelRuntime, Features, int]:
    """This process's runtime, this node's features (both cached) and its partition id.

    Args:
        config: The run configuration.
        node: The node's ``context.node_config``.

    Raises:
        ConfigError: A node without ``partition-id`` / ``num-partitions``.
        HloraError: Missing or bad data or model.
    """
    partition_id = int(node.get("partition-id", -1))
    num_partitions = int(node.get("num-partitions", 0))
    if partition_id < 0 or num_partitions < 1:
        raise ConfigError(
            "this node has no 'partition-id' / 'num-partitions': start it with "
            "flower-supernode --node-config 'partition-id=K num-partitions=N'"
        )
    if node.get("data-dir"):
        config = replace(config, data={"data_dir": str(node["data-dir"])})
    runtime, backbone = client_runtime(config, int(node.get("rank", 0) or 0), hash_model=hash_model)
    key = (fingerprint(config), str(partition_id), str(num_partitions))
    if key not in _PARTITIONS:
        _PARTITIONS[key] = partition_features(config, backbone, partition_id, num_partitions)
    return runtime, _PARTITIONS[key], partition_id


def node_info(local: RunConfig | None, node: Mapping[str, Any], content: RecordDict) -> RecordDict:
    """The QUERY answer: partition id, number of examples and declared rank / memory budget.

    A node that cannot take part (its model is not the run's, its data cannot be read, its node
    config lacks its partition) answers only ``refused``: the first line of the reason.

    Args:
        local: This node's own copy of the configuration, if any.
        node: The node's ``context.node_config``.
        content: The QUERY message's content (the server's ``hlora.run`` manifest).
    """
    try:
        config, manifest = run_config(local, node, content)
        _, features, partition_id = node_setup(config, node, hash_model=manifest is not None)
        if manifest is not None:
            check_model(manifest, config, node_model_sha256(config))
    except HloraError as err:
        line = (str(err).strip().splitlines() or [type(err).__name__])[0]
        return RecordDict({NODE_INFO: ConfigRecord({"refused": line})})
    info = ConfigRecord(
        {
            "partition-id": partition_id,
            "num-partitions": int(node["num-partitions"]),
            "num-examples": len(features),
            "rank": int(node.get("rank", 0) or 0),
            "memory-mb": float(node.get("memory-mb", 0) or 0),
        }
    )
    return RecordDict({NODE_INFO: info})


def train(local: RunConfig | None, node: Mapping[str, Any], content: RecordDict) -> RecordDict:
    """One round of local training on this node's partition.

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
    runtime, features, partition_id = node_setup(config, node)
    if instruction.client_id != f"client{partition_id:02d}":
        raise HloraError(
            f"node with partition-id {partition_id} got {instruction.client_id}'s instruction"
        )
    return encode_reply(runtime.train_client(instruction, features))
