"""The ServerApp and its main: query the nodes, run the rounds, write the run folder.

The server side is :class:`hlora.server.RoundLoop` (written once) over a
:class:`~hlora.engines.flower.transport.FlowerTransport`. Before round 1 a ``QUERY`` round
(:mod:`~hlora.engines.flower.identity`) maps every node to its client and rank.

With nodes on their own data (run config ``node-data = "own"``) the server reads only the
evaluation data (:func:`evaluation_task`); with simulated partitions it builds the whole
federation as the in-process engine does.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from collections.abc import Sequence
from pathlib import Path

from flwr.app import Context
from flwr.common.logger import log as flwr_log
from flwr.serverapp import Grid, ServerApp

from hlora.aggregation import UpdateSpec
from hlora.checkpoint import CHECKPOINT_FILE, ServerState, load_state
from hlora.config import CONFIG_FILE, RunConfig, fingerprint, load_config, to_toml
from hlora.data.files import read_own_data
from hlora.data.glue import TaskData, get_task, read_task_tsv, task_tsv_path
from hlora.engines.flower.identity import NodeDrop, NodeInfo, assign_slots, query_nodes
from hlora.engines.flower.manifest import RunManifest, model_sha256
from hlora.engines.flower.settings import (
    DEFAULT_NODE_WAIT_S,
    DEFAULT_REPLY_POLL_S,
    DEFAULT_ROUND_TIMEOUT_S,
    OWN,
    SIMULATED,
    AppSettings,
)
from hlora.engines.flower.transport import FlowerTransport
from hlora.errors import ConfigError
from hlora.federation import (
    Federation,
    RunResult,
    build_federation,
    finish,
    load_run_task,
    make_loop,
    new_run_dir,
)
from hlora.io import write_text_atomic
from hlora.memory import footprint_fn
from hlora.metrics import METRIC_NAMES
from hlora.report import MetricsLog, RoundProgress, write_json
from hlora.runtime import label_log_prior
from hlora.server import FEDERATED_EVAL, SERVER_EVAL, FederationError
from hlora.stack import build_stack

logger = logging.getLogger(__name__)

DROPPED_NODES_FILE = "dropped_nodes.json"


def evaluation_task(config: RunConfig, eval_data: str = "") -> TaskData:
    """The server's evaluation examples when the nodes train on their own data.

    Args:
        config: The run configuration (its task, ``data.dev_limit``).
        eval_data: A GLUE-layout folder (its ``dev.tsv`` is read) or one TSV / CSV / JSONL file
            (all rows, :mod:`hlora.data.files`); '' : the task's dev split as ``hlora run``
            loads it (``data.data_dir``, ``HLORA_DATA_DIR``, the hub).

    Returns:
        The task with the evaluation examples as ``dev`` and no training examples.

    Raises:
        DataError: Missing or malformed evaluation data (naming the file and the line).
    """
    task = get_task(config.data.task)
    if not eval_data:
        loaded = load_run_task(config)
        return TaskData(task, (), loaded.dev, f"{loaded.source} (evaluation only)")
    where = Path(eval_data).expanduser()
    if where.is_dir():
        dev = read_task_tsv(task_tsv_path(where, task.name, "dev"), task.name)
    else:
        dev = read_own_data(where, task.name).train
    if config.data.dev_limit:
        dev = dev[: config.data.dev_limit]
    return TaskData(task, (), dev, str(where))


def evaluation_federation(config: RunConfig, task: TaskData) -> Federation:
    """The server's side of a federation of nodes on their own data: model and evaluation set.

    The same model, LoRA bank and update spec as :func:`hlora.federation.build_federation`
    builds, and no training data (the clients are set from the QUERY round).
    """
    stack = build_stack(config, config.federation.ranks)
    bank = stack.bank
    dev = stack.objective.eval_features(task.dev)
    extras = bank.get_extras(bank.ranks[0])
    spec = UpdateSpec(
        layers={n: (s.out_features, s.in_features) for n, s in bank.layer_shapes().items()},
        extras={n: tuple(t.shape) for n, t in extras.items()},
    )
    return Federation(config, task, stack.backbone, stack.runtime, [], {}, dev, spec, extras)


def declared_label_prior(infos: Sequence[NodeInfo], num_labels: int) -> tuple[float, ...]:
    """The federation's label distribution from the label counts the nodes declared at join
    time, Laplace-smoothed as :func:`hlora.runtime.label_log_prior` smooths training labels.

    Raises:
        ConfigError: A node declared no label counts, or counts of another length.
    """
    totals = [0] * num_labels
    for info in infos:
        if len(info.label_counts) != num_labels:
            raise ConfigError(
                f"node {info.node_id} declares label counts {list(info.label_counts)}: "
                f"expected {num_labels}"
            )
        totals = [t + c for t, c in zip(totals, info.label_counts, strict=True)]
    labels = [label for label, n in enumerate(totals) for _ in range(n)]
    return tuple(float(p) for p in label_log_prior(labels, num_labels).exp())


def require_held_out(infos: Sequence[NodeInfo], evaluation: str) -> None:
    """Refuse a federated evaluation (``evaluation`` other than ``server``) that no node can do.

    Raises:
        ConfigError: No node declared held-out examples.
    """
    if evaluation != SERVER_EVAL and not any(i.eval_examples for i in infos):
        raise ConfigError(
            f"evaluation = {evaluation!r} but no node declared held-out data: give the nodes "
            "'eval-data' (or a GLUE folder with dev.tsv as 'own-data')"
        )


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
    round_timeout: float | None = DEFAULT_ROUND_TIMEOUT_S,
    node_wait_s: float = DEFAULT_NODE_WAIT_S,
    node_data: str = SIMULATED,
    eval_data: str = "",
    reply_poll_s: float = DEFAULT_REPLY_POLL_S,
    evaluation: str = SERVER_EVAL,
) -> RunResult:
    """The whole server side of a Flower run: query nodes, run the rounds, write the run folder.

    The QUERY message and every TRAIN message carry the run's manifest (its portable
    configuration and fingerprint, :mod:`~hlora.engines.flower.manifest`); nodes train with it.
    Nodes that refuse it, or whose QUERY answer does not hold (see
    :mod:`~hlora.engines.flower.identity`), are left out with their reasons, in
    ``dropped_nodes.json`` (with nodes that connect later), and the run goes on while
    ``federation.min_clients`` nodes remain.

    A run folder holding a checkpoint of the same configuration resumes after the checkpoint's
    round (see :func:`check_runnable`): ``metrics.jsonl`` is cut back to that round and the nodes
    must map to the same clients, ranks and example counts as in ``clients.json``.

    Args:
        grid: The ServerApp's grid.
        config: The run configuration.
        run_dir: The run folder.
        progress: Show progress bars.
        round_timeout: Seconds to wait for a round's replies (None: no limit).
        node_wait_s: Seconds to wait for the nodes to connect.
        node_data: The nodes' data mode, ``own`` or ``simulated-partition``.
        eval_data: The server's evaluation data in the ``own`` mode (:func:`evaluation_task`).
        reply_poll_s: Seconds between the pulls for replies.
        evaluation: Where the global model is evaluated (:data:`hlora.server.EVALUATIONS`).
            ``federated`` and ``both`` send it to every node that declared held-out data,
            which answers with counts (:meth:`hlora.server.RoundLoop.evaluate_federated`);
            with ``federated`` and the nodes on their own data the server reads no data.

    Raises:
        HloraError: Bad input, missing nodes, or a round that cannot go on.
    """
    resumed = check_runnable(config, run_dir)
    if node_data == OWN:  # the server's model, evaluation set and update spec; no training data
        if evaluation == FEDERATED_EVAL:
            task = get_task(config.data.task)
            data = TaskData(task, (), (), "none: the nodes evaluate on their own held-out data")
        else:
            data = evaluation_task(config, eval_data)
        federation = evaluation_federation(config, data)
    else:
        federation = build_federation(config)
    fed = config.federation
    manifest = RunManifest.of(config, model_sha256(config))
    logger.info("run manifest: %s", manifest.summary())
    run_record = manifest.to_record()
    roster = query_nodes(
        grid,
        fed.num_clients,
        wait_s=node_wait_s,
        timeout=round_timeout,
        min_clients=fed.min_clients,
        run_record=run_record,
        mode=node_data,
        poll_s=reply_poll_s,
    )
    slots, roster = assign_slots(config, footprint_fn(federation.runtime, config), roster)
    infos = roster.accepted
    for drop in roster.dropped:
        logger.warning("node %d left out of the run: %s", drop.node_id, drop.reason)
    federation = dataclasses.replace(federation, clients=slots)
    require_held_out(infos, evaluation)
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
        [
            {
                **s.__dict__,
                "node_id": i.node_id,
                "data_mode": i.data_mode,
                "eval_examples": i.eval_examples,
            }
            for s, i in zip(slots, infos, strict=True)
        ],
    )
    dropped_nodes = [dataclasses.asdict(d) for d in roster.dropped]
    write_json(run_dir / DROPPED_NODES_FILE, dropped_nodes)

    def node_dropped(node_id: int, reason: str, round_num: int) -> None:
        dropped_nodes.append(dataclasses.asdict(NodeDrop(node_id, reason, f"round {round_num}")))
        write_json(run_dir / DROPPED_NODES_FILE, dropped_nodes)

    task = federation.task.task
    transport = FlowerTransport(
        grid,
        {i.client_id: i.node_id for i in infos},
        round_timeout,
        on_node_dropped=node_dropped,
        run_record=run_record,
        poll_s=reply_poll_s,
        held_out={i.client_id: i.eval_examples for i in infos},
        num_labels=task.num_labels,
        counted=any(m in METRIC_NAMES for m in task.metrics),
    )
    with RoundProgress(config.federation.rounds, enabled=progress) as bar:
        transport.on_client_done = bar.client_done
        loop = make_loop(federation, run_dir, bar, transport, evaluation=evaluation)
        if (
            node_data == OWN
            and config.train.logit_adjustment > 0
            and federation.runtime.objective.supports_logit_adjustment
        ):
            # The server holds no training labels: the prior comes from the nodes' counts.
            prior = declared_label_prior(infos, federation.task.task.num_labels)
            loop.settings = dataclasses.replace(loop.settings, label_prior=prior)
        state = loop.run(resumed)
    return finish(federation, run_dir, state)


def make_server_app(
    config: RunConfig | None = None,
    run_dir: Path | None = None,
    *,
    progress: bool = False,
    results: list[RunResult] | None = None,
    errors: list[BaseException] | None = None,
    node_data: str | None = None,
    eval_data: str = "",
    evaluation: str | None = None,
) -> ServerApp:
    """A ServerApp running :func:`serve`.

    Args:
        config: The configuration; None: read ``context.run_config["hlora-config"]``.
        run_dir: The run folder; None: ``run-dir`` from the run config, else a new one.
        node_data: The nodes' data mode; None: ``node-data`` from the run config.
        eval_data: The server's evaluation data in the ``own`` mode; '': ``eval-data`` from the
            run config.
        evaluation: Where the global model is evaluated; None: ``evaluation`` from the run
            config.
        progress: Show progress bars.
        results: The finished run's :class:`RunResult` is appended here (simulation).
        errors: An exception of the server is appended here instead of propagating.
    """
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        """The whole run (see :func:`serve`)."""
        try:
            settings = AppSettings.from_run_config(dict(context.run_config))
            cfg = config if config is not None else settings.load_config()
            target = run_dir or Path(settings.run_dir or new_run_dir(cfg))
            result = serve(
                grid,
                cfg,
                target,
                progress=progress,
                round_timeout=settings.round_timeout,
                node_wait_s=settings.node_wait,
                node_data=node_data or settings.node_data,
                eval_data=eval_data or settings.eval_data,
                reply_poll_s=settings.reply_poll,
                evaluation=evaluation or settings.evaluation,
            )
            flwr_log(logging.INFO, "hlora run finished: %s", result.run_dir)
            if results is not None:
                results.append(result)
        except BaseException as err:
            if errors is None:
                raise
            errors.append(err)

    return app


# The entry point of a deployment (``[tool.flwr.app.components]`` in pyproject.toml).
server_app = make_server_app(progress=False)
