"""A whole federation in Flower's simulation runtime (Ray): ``hlora run --engine flower-sim``."""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from hlora.config import RunConfig
from hlora.engines.flower.client_app import make_client_app
from hlora.engines.flower.server_app import check_runnable, make_server_app
from hlora.engines.flower.settings import OWN, SIMULATED
from hlora.errors import ConfigError
from hlora.federation import RunResult
from hlora.server import SERVER_EVAL, FederationError


def backend_config(
    config: RunConfig,
    *,
    node_cpus: float | None = None,
    node_gpus: float | None = None,
    cpus: int | None = None,
    gpus: int | None = None,
) -> dict[str, Any]:
    """Flower's Ray backend configuration: what each virtual node holds, and Ray's whole pool.

    Ray runs as many virtual nodes at once as their shares fit in the pool: with the defaults
    one per CPU on a CPU machine, one per GPU on a GPU machine. A virtual node without a GPU
    share sees no GPU at all (Ray hides the devices from it), so a run that trains on CUDA gives
    each node a share.

    Args:
        config: The run configuration (``train.device`` decides the GPU default).
        node_cpus: CPUs per virtual node (> 0, at most the machine's; None: 1): 2 on a 2-core
            machine runs one node at a time with both cores.
        node_gpus: GPU share per virtual node, 0 to 1 (0.25: four nodes share a GPU, when
            their models fit in its memory together); None: 1 when the run trains on CUDA,
            else 0.
        cpus: The machine's CPUs (None: ``os.cpu_count()``).
        gpus: The machine's CUDA GPUs (None: ``torch.cuda.device_count()``).

    Returns:
        ``backend_config`` for ``flwr.simulation.run_simulation``.

    Raises:
        ConfigError: A share the machine or the run cannot use.
    """
    node_cpus = 1.0 if node_cpus is None else node_cpus
    cpus = (os.cpu_count() or 1) if cpus is None else cpus
    gpus = torch.cuda.device_count() if gpus is None else gpus
    on_cuda = config.train.device == "cuda" or (config.train.device == "auto" and gpus > 0)
    if node_gpus is None:
        node_gpus = 1.0 if on_cuda else 0.0
    if not 0 < node_cpus <= cpus:
        raise ConfigError(
            f"node CPUs must be > 0 and at most this machine's {cpus}, got {node_cpus}"
        )
    if not 0 <= node_gpus <= 1:
        raise ConfigError(f"a node's GPU share must be between 0 and 1, got {node_gpus}")
    if node_gpus > 0 and gpus == 0:
        raise ConfigError(
            f"a GPU share per node ({node_gpus}) needs a CUDA GPU; this machine has none"
        )
    if node_gpus > 0 and config.train.device == "cpu":
        raise ConfigError(
            f'a GPU share per node ({node_gpus}) with train.device = "cpu": no node would use it'
        )
    if node_gpus == 0 and on_cuda:
        raise ConfigError(
            "the run trains on CUDA (train.device) but a node with no GPU share sees no GPU: "
            'give each node a share, or set train.device = "cpu"'
        )
    return {
        "client_resources": {"num_cpus": node_cpus, "num_gpus": node_gpus},
        "init_args": {"num_cpus": cpus, "num_gpus": gpus},
    }


def run_flower_simulation(
    config: RunConfig,
    run_dir: Path,
    *,
    progress: bool,
    own_data: Sequence[str] | None = None,
    eval_data: str = "",
    own_eval_data: Sequence[str] | None = None,
    evaluation: str = SERVER_EVAL,
    node_cpus: float | None = None,
    node_gpus: float | None = None,
) -> RunResult:
    """Run a whole federation in Flower's simulation runtime (Ray), one virtual node per client.

    Args:
        config: The run configuration.
        run_dir: The run folder.
        progress: Show progress bars.
        own_data: None: each virtual node trains on its simulated partition of the task
            (``simulated-partition``). Else one path per client (``federation.num_clients``):
            virtual node ``k`` trains on all of ``own_data[k]`` (``own``), and the server reads
            only the evaluation data (``eval_data``).
        eval_data: The server's evaluation data with ``own_data`` (see
            :func:`~hlora.engines.flower.server_app.evaluation_task`).
        own_eval_data: With ``own_data``: one held-out file per client, for a federated
            evaluation (as if each node were started with ``eval-data=PATH``).
        evaluation: Where the global model is evaluated (:data:`hlora.server.EVALUATIONS`).
        node_cpus: CPUs per virtual node (:func:`backend_config`; None: 1).
        node_gpus: GPU share per virtual node (:func:`backend_config`; None: by the device).

    Raises:
        HloraError: Bad input, or a round that cannot go on.
    """
    from flwr.simulation import run_simulation

    n = config.federation.num_clients
    if own_data is not None and len(own_data) != n:
        raise ConfigError(
            f"own_data names {len(own_data)} paths, expected one per client "
            f"(federation.num_clients = {n})"
        )
    if own_eval_data is not None and (own_data is None or len(own_eval_data) != n):
        raise ConfigError("own_eval_data needs own_data and one path per client")
    node_data = SIMULATED if own_data is None else OWN
    resources = backend_config(config, node_cpus=node_cpus, node_gpus=node_gpus)
    check_runnable(config, run_dir)
    results: list[RunResult] = []
    errors: list[BaseException] = []
    flwr_logger = logging.getLogger("flwr")  # Flower logs through its own handler: no echo
    propagate, flwr_logger.propagate = flwr_logger.propagate, False
    try:
        run_simulation(
            server_app=make_server_app(
                config,
                run_dir,
                progress=progress,
                results=results,
                errors=errors,
                node_data=node_data,
                eval_data=eval_data,
                evaluation=evaluation,
            ),
            client_app=make_client_app(config, own_data=own_data, own_eval_data=own_eval_data),
            num_supernodes=n,
            backend_config=resources,
        )
    finally:
        flwr_logger.propagate = propagate
    if errors:
        raise errors[0]
    if not results:
        raise FederationError("the Flower simulation ended without a result (see its log)")
    return results[0]
