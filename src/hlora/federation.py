"""Build a whole federation from a :class:`RunConfig` and run it (the ``hlora run`` job).

Everything that can fail on bad input (config, data, model, ranks) is checked before the run
folder is created, so a bad invocation leaves nothing half-written.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import random
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from hlora.aggregation import AggregationOptions, UpdateSpec, get_strategy
from hlora.checkpoint import CHECKPOINT_FILE, ServerState, load_state
from hlora.config import CONFIG_FILE, RunConfig, fingerprint, load_run_config, to_toml
from hlora.data.glue import INSTRUCTIONS, TaskData, load_task
from hlora.data.instructions import load_instruction_task
from hlora.data.partition import partition_indices
from hlora.engines.inprocess import InProcessTransport
from hlora.errors import ConfigError
from hlora.export import rank_factors
from hlora.generation import GENERATIONS_FILE, generate_with_update
from hlora.io import run_folder_lock, write_text_atomic
from hlora.memory import FootprintFn, footprint_fn
from hlora.metrics import majority_baseline
from hlora.models import Backbone
from hlora.objectives import CausalLanguageModeling
from hlora.protocol import Transport
from hlora.report import MetricsLog, RoundProgress, plot_convergence, summarize, write_json
from hlora.runtime import Features, ModelRuntime, label_log_prior
from hlora.server import SERVER_EVAL, ClientSlot, LoopSettings, RoundLoop
from hlora.server_opt import ServerOptimizer
from hlora.stack import build_stack
from hlora.tasktypes import CAUSAL_LM
from hlora.trust import TrustPolicy

logger = logging.getLogger(__name__)

SUMMARY_FILE = "summary.json"
PLOT_FILE = "convergence.png"


def assign_ranks(config: RunConfig, footprint: FootprintFn) -> list[int]:
    """Each client's LoRA rank, by ``federation.rank_rule`` (see :class:`FederationConfig`).

    Args:
        config: The run configuration.
        footprint: What a client of each rank needs in memory (:mod:`hlora.memory`); asked only
            by the ``memory`` rule.

    Raises:
        ConfigError: A memory budget too small for the smallest rank.
    """
    fed = config.federation
    n = fed.num_clients
    if fed.rank_rule == "list":
        return list(fed.ranks)
    if fed.rank_rule == "cycle":
        return [fed.ranks[k % len(fed.ranks)] for k in range(n)]
    ranks = []
    for k in range(n):
        budget = fed.memory_budgets_mb[k % len(fed.memory_budgets_mb)]
        fits = [r for r in fed.ranks if footprint(r).total <= budget * 2**20]
        if not fits:
            raise ConfigError(
                f"invalid value for 'federation.memory_budgets_mb': client {k} has {budget} MiB, "
                f"the smallest rank {min(fed.ranks)} needs {footprint(min(fed.ranks)).describe()}"
            )
        ranks.append(max(fits))
    return ranks


VALIDATION_SEED = 20_261_201  # the held-out draw never depends on federation.seed


def load_run_task(config: RunConfig) -> TaskData:
    """The run's task, with the configured data folder, limits and validation split.

    With ``data.validation_fraction > 0`` a fixed seeded share of the training examples becomes
    the evaluation set (in place of dev) and the rest the training set, so settings can be
    chosen without looking at dev; the draw is the same for every strategy and seed.
    """
    data = config.data
    if data.task == INSTRUCTIONS:
        task = load_instruction_task(
            data.train_file,
            data.eval_file or None,
            category_field=data.category_field,
            train_limit=data.train_limit or None,
            dev_limit=data.dev_limit or None,
        )
    else:
        task = load_task(
            data.task,
            data.data_dir or None,
            train_limit=data.train_limit or None,
            dev_limit=data.dev_limit or None,
        )
    fraction = config.data.validation_fraction
    if fraction <= 0:
        return task
    order = list(range(len(task.train)))
    random.Random(VALIDATION_SEED).shuffle(order)
    held = set(order[: round(fraction * len(order))])
    if not held or len(held) == len(order):
        raise ConfigError(
            f"invalid value for 'data.validation_fraction': {fraction} leaves no examples on "
            f"one side of {len(order)} training examples"
        )
    return TaskData(
        task=task.task,
        train=tuple(e for i, e in enumerate(task.train) if i not in held),
        dev=tuple(e for i, e in enumerate(task.train) if i in held),
        source=f"{task.source} (validation: {len(held)} held-out training examples)",
    )


def client_partitions(config: RunConfig, task: TaskData, num_clients: int) -> list[list[int]]:
    """Each client's train indices: seeded, disjoint, at least ``min_client_examples`` each.

    Every engine derives partitions here, so they train on the same examples.
    """
    labels = [e.label for e in task.train]
    return partition_indices(
        labels,
        num_clients,
        config.data.partition,
        alpha=config.data.alpha,
        seed=config.federation.seed,
        min_size=max(1, min(config.data.min_client_examples, len(labels) // num_clients)),
    )


@dataclass
class Federation:
    """Everything a run needs, built and checked."""

    config: RunConfig
    task: TaskData
    backbone: Backbone
    runtime: ModelRuntime
    clients: list[ClientSlot]
    train_features: Mapping[str, Features]
    dev_features: Features
    spec: UpdateSpec
    initial_extras: dict[str, torch.Tensor]


def build_federation(config: RunConfig) -> Federation:
    """Load data and model, partition, assign ranks, tokenize (no files written).

    Raises:
        HloraError: Any bad input (config, data, model, ranks).
    """
    fed = config.federation
    task = load_run_task(config)
    centralized = fed.strategy == "centralized"
    if centralized:
        parts = [list(range(len(task.train)))]
        ranks = [fed.centralized_rank or max(fed.ranks)]
        ids = ["central"]
    else:
        parts = client_partitions(config, task, fed.num_clients)
        ids = [f"client{k:02d}" for k in range(fed.num_clients)]
        ranks = []  # filled after the bank knows the shapes
    stack = build_stack(config, ranks or fed.ranks)
    backbone, bank, runtime = stack.backbone, stack.bank, stack.runtime
    if not centralized:
        ranks = assign_ranks(config, footprint_fn(runtime, config))
    train_all = stack.objective.train_features(task.train)
    dev = stack.objective.eval_features(task.dev)
    clients = [
        ClientSlot(cid, rank, len(part)) for cid, rank, part in zip(ids, ranks, parts, strict=True)
    ]
    features = {cid: [train_all[i] for i in part] for cid, part in zip(ids, parts, strict=True)}
    if config.server.head_calibration != "none" or config.train.decorrelation > 0:
        # a head whose features these cannot use fails now, not in round 1
        runtime.head_features({}, bank.get_extras(bank.ranks[0]), train_all[:1], 1)
    shapes = bank.layer_shapes()
    first_rank = bank.ranks[0]
    extras = bank.get_extras(first_rank)
    spec = UpdateSpec(
        layers={n: (s.out_features, s.in_features) for n, s in shapes.items()},
        extras={n: tuple(t.shape) for n, t in extras.items()},
    )
    return Federation(config, task, backbone, runtime, clients, features, dev, spec, extras)


def loop_settings(config: RunConfig) -> LoopSettings:
    """The round loop's settings for a config (reference modes mapped onto strategies)."""
    fed = config.federation
    mode = fed.strategy
    srv = config.server
    optimizer = None
    if srv.optimizer != "none" and fed.strategy not in ("centralized", "local"):
        optimizer = ServerOptimizer(
            srv.optimizer,
            learning_rate=srv.learning_rate,
            momentum=srv.momentum,
            beta2=srv.beta2,
            epsilon=srv.epsilon,
            state=srv.optimizer_state,
            state_rank=srv.state_rank,
            global_rank=srv.global_rank or None,
            schedule=srv.lr_schedule,
            warmup_ratio=srv.warmup_ratio,
            space=srv.hlora_space if fed.strategy == "hlora" else None,
        )
    if mode == "centralized":
        mode = "hlora"  # one client: aggregation is the identity
    elif mode != "local":
        get_strategy(mode)
    return LoopSettings(
        mode=mode,
        rounds=fed.rounds,
        clients_per_round=0 if fed.strategy == "centralized" else fed.clients_per_round,
        scaling=config.model.lora_scaling,
        seed=fed.seed,
        min_clients=1 if fed.strategy == "centralized" else fed.min_clients,
        eval_every=config.server.eval_every,
        eval_truncations=config.server.eval_truncations,
        options=AggregationOptions(
            global_rank=config.server.global_rank or None,
            svd_method=config.server.svd_method,
            seed=fed.seed,
            factor_split=config.server.factor_split,
        ),
        lr_schedule=config.train.lr_schedule,
        learning_rate=config.train.learning_rate,
        warmup_ratio=config.train.warmup_ratio,
        server_optimizer=optimizer,
        freeze_head=config.train.freeze_head,
        residual=srv.residual,
        window=srv.window,
        head_calibration=srv.head_calibration,
        calibration_samples=srv.calibration_samples,
        trust=TrustPolicy(
            max_client_examples=config.trust.max_client_examples,
            norm_bound=config.trust.update_norm_bound,
            norm_policy=config.trust.norm_policy,
        ),
    )


def make_loop(
    federation: Federation,
    run_dir: Path,
    progress: RoundProgress,
    transport: Transport | None = None,
    evaluation: str = SERVER_EVAL,
) -> RoundLoop:
    """The round loop over ``transport`` (default: the in-process engine).

    The server's evaluation of the global model runs on this process's model
    (``federation.runtime``) whatever the transport; ``evaluation`` (:data:`EVALUATIONS`) may
    add or substitute the clients' evaluation on their own held-out data.
    """
    config = federation.config
    runtime = federation.runtime
    metric_names = federation.task.task.metrics

    def evaluate(
        deltas: Any, extras: Any, *, base_version: int, base_delta: Any
    ) -> dict[str, float]:
        return runtime.evaluate(
            deltas,
            extras,
            federation.dev_features,
            metric_names,
            config.server.eval_batch_size,
            base_version=base_version,
            base_delta=base_delta,
        )

    if transport is None:
        transport = InProcessTransport(
            runtime,
            federation.train_features,
            progress.client_done,
            batch_size=config.server.eval_batch_size,
        )
    settings = dataclasses.replace(
        loop_settings(config), evaluation=evaluation, metric_names=tuple(metric_names)
    )
    if config.server.head_calibration != "none":
        settings = dataclasses.replace(
            settings,
            head_linear=runtime.bank.head_linear()[0],
            num_labels=federation.task.task.num_labels,
        )
    if config.train.logit_adjustment > 0 and runtime.objective.supports_logit_adjustment:
        labels = [e.label for e in federation.task.train]
        prior = label_log_prior(labels, federation.task.task.num_labels).exp()
        settings = dataclasses.replace(settings, label_prior=tuple(float(p) for p in prior))
    return RoundLoop(
        settings,
        federation.clients,
        federation.spec,
        federation.initial_extras,
        transport,
        evaluate,
        MetricsLog(run_dir / "metrics.jsonl"),
        run_dir / CHECKPOINT_FILE,
        fingerprint(config),
        progress,
    )


def new_run_dir(config: RunConfig) -> Path:
    """A fresh run folder path (not created)."""
    name = config.output.name or (
        f"{config.data.task}-{config.federation.strategy}-{time.strftime('%Y%m%d-%H%M%S')}"
    )
    return Path(config.output.dir) / name


@dataclass(frozen=True)
class RunResult:
    """Where a finished run's outputs are and its summary."""

    run_dir: Path
    summary: dict[str, Any]


def run(
    config: RunConfig, *, run_dir: Path | None = None, progress: bool | None = None
) -> RunResult:
    """Run a whole federation in this process and write the run folder.

    Args:
        config: The validated configuration.
        run_dir: Folder to write (default: :func:`new_run_dir`); must not hold another run.
        progress: Show progress (default: ``config.output.progress``).

    Raises:
        HloraError: Bad input, a round that cannot go on, or a run folder another process is
            writing (:class:`hlora.io.RunFolderBusyError`).
    """
    target = run_dir or new_run_dir(config)
    if (target / CONFIG_FILE).exists():
        raise ConfigError(
            f"run folder '{target}' already holds a run: use 'hlora run --resume {target}' "
            "or another output.name"
        )
    federation = build_federation(config)  # every input check happens here, before writing
    with run_folder_lock(target):
        if (target / CONFIG_FILE).exists():  # another run took the folder meanwhile
            raise ConfigError(f"run folder '{target}' already holds a run")
        write_text_atomic(target / CONFIG_FILE, to_toml(config))
        write_json(target / "clients.json", [c.__dict__ for c in federation.clients])
        show = config.output.progress if progress is None else progress
        with RoundProgress(config.federation.rounds, enabled=show) as bar:
            loop = make_loop(federation, target, bar)
            state = loop.run()
        return finish(federation, target, state)


def resume(run_dir: Path, *, progress: bool | None = None) -> RunResult:
    """Continue a run from its last finished round.

    Raises:
        CheckpointError: Missing config or corrupt checkpoint.
        RunFolderBusyError: Another process is writing the run folder.
    """
    config = load_run_config(run_dir)
    with run_folder_lock(run_dir):
        checkpoint = run_dir / CHECKPOINT_FILE
        state: ServerState | None = None
        if checkpoint.exists():
            state = load_state(checkpoint, fingerprint(config))
        federation = build_federation(config)
        metrics = MetricsLog(run_dir / "metrics.jsonl")
        metrics.truncate_to_round(state.round_num if state else 0)
        show = config.output.progress if progress is None else progress
        with RoundProgress(config.federation.rounds, enabled=show) as bar:
            loop = make_loop(federation, run_dir, bar)
            state = loop.run(state)
        return finish(federation, run_dir, state)


def finish(federation: Federation, run_dir: Path, state: ServerState) -> RunResult:
    """Write the summary, the plot and one peft adapter per rank used."""
    config = federation.config
    records = MetricsLog(run_dir / "metrics.jsonl").read()
    summary = summarize(records, federation.task.task.metrics)
    eval_labels = [e.label for e in federation.task.dev] or federated_eval_labels(records)
    # A server without training data (Flower nodes with their own data) takes the majority
    # class of the evaluation set.
    train_labels = [e.label for e in federation.task.train] or eval_labels
    majority = (
        majority_baseline(federation.task.task.metrics, train_labels, eval_labels)
        if eval_labels
        else {}
    )
    summary.update(
        {
            "headline": headline_of(config),
            "majority_class": majority,
            "task": config.data.task,
            "strategy": config.federation.strategy,
            "model": config.model.name,
            "comparable_to_glue": federation.task.task.comparable_to_glue,
            "ranks": sorted({c.rank for c in federation.clients}),
            "run_dir": str(run_dir),
        }
    )
    calibration = next((r["head_calibration"] for r in records if "head_calibration" in r), None)
    if calibration is not None:
        summary["head_calibration"] = calibration
        if calibration.get("applied"):
            summary["headline"] += (
                f"; its head recalibrated after the last round ({calibration['method']}: "
                "head_calibration.eval_uncalibrated holds the model before)"
            )
    write_json(run_dir / SUMMARY_FILE, summary)
    headline = federation.task.task.metrics[0]
    plot_convergence(
        {config.federation.strategy: records},
        federation.task.task.metrics[0],
        run_dir / PLOT_FILE,
        title=f"{config.data.task} · {config.model.name}",
        reference_lines=({"majority class": majority[headline]} if headline in majority else {}),
    )
    if config.federation.strategy != "local":
        export_adapters(federation, state, run_dir / "adapters")
        if config.model.task_type == CAUSAL_LM and federation.task.dev:
            write_generations(federation, state, run_dir / GENERATIONS_FILE)
    return RunResult(run_dir, summary)


def headline_of(config: RunConfig) -> str:
    """What a run's headline figure (``summary.json``'s ``final``) is the score of."""
    if config.federation.strategy == "local":
        return "the mean of the clients' own models (local reference)"
    whole = "the global model: pretrained weights + the whole aggregated update"
    if config.server.residual == "frozen":
        return (
            f"{whole}, which every client holds (its own rank's part trained, the rest frozen "
            "into its base weights); final_by_rank holds each client rank's truncation of it "
            "alone, what that client would hold under server.residual = 'drop'"
        )
    return f"{whole}; final_by_rank holds each client rank's truncation of it"


def federated_eval_labels(records: Sequence[Mapping[str, Any]]) -> list[int]:
    """The true labels of the last federated evaluation's examples (from its confusion counts;
    their order is lost), for a server that holds no evaluation data; [] without one."""
    for record in reversed(records):
        overall = (record.get("federated_eval") or {}).get("overall")
        if overall and overall.get("confusion"):
            return [y for y, row in enumerate(overall["confusion"]) for _ in range(sum(row))]
    return []


SAMPLE_PROMPTS = 4
"""Held-out prompts a causal-LM run answers at its end (:data:`GENERATIONS_FILE`)."""
GENERATED_TOKENS = 32
"""Most tokens of each of those answers."""


def write_generations(federation: Federation, state: ServerState, path: Path) -> None:
    """Greedy answers of the final global model to the first held-out prompts, one JSON line
    each (``prompt``: the turns before the answer, ``answer``, ``expected``)."""
    objective = federation.runtime.objective
    assert isinstance(objective, CausalLanguageModeling)
    examples = federation.task.dev[:SAMPLE_PROMPTS]
    conversations = [objective.conversation(e) for e in examples]
    prompts = [turns for turns, _ in conversations]
    answers = generate_with_update(
        federation.runtime.bank,
        federation.backbone.tokenizer,
        state.whole_update(),
        state.extras,
        prompts,
        max_new_tokens=GENERATED_TOKENS,
    )
    lines = [
        json.dumps({"prompt": turns, "answer": answer, "expected": expected})
        for (turns, expected), answer in zip(conversations, answers, strict=True)
    ]
    write_text_atomic(path, "\n".join(lines) + "\n")


def export_adapters(federation: Federation, state: ServerState, folder: Path) -> list[Path]:
    """One peft adapter folder per rank used (``folder/r{rank}``), best rank-r of the update.

    Under ``server.residual = "frozen"`` every client holds the whole update, so only the
    largest rank's adapter is written (the whole update when it has no more components, as
    with server factors at their default rank; ``hlora export --merged`` writes it whole)."""
    bank = federation.runtime.bank
    delta = state.whole_update()
    ranks = sorted({c.rank for c in federation.clients})
    if federation.config.server.residual == "frozen":
        ranks = ranks[-1:]
    paths = []
    for rank in ranks:
        factors = rank_factors(delta, rank, bank.scaling)
        paths.append(bank.export_peft(rank, factors, state.extras, folder / f"r{rank}"))
    return paths
