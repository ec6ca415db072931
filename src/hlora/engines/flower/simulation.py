"""A whole federation in Flower's simulation runtime (Ray): ``hlora run --engine flower-sim``."""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from hlora.config import RunConfig
from hlora.engines.flower.client_app import make_client_app
from hlora.engines.flower.server_app import check_runnable, make_server_app
from hlora.engines.flower.settings import OWN, SIMULATED
from hlora.errors import ConfigError
from hlora.federation import RunResult
from hlora.server import SERVER_EVAL, FederationError


def run_flower_simulation(
    config: RunConfig,
    run_dir: Path,
    *,
    progress: bool,
    own_data: Sequence[str] | None = None,
    eval_data: str = "",
    own_eval_data: Sequence[str] | None = None,
    evaluation: str = SERVER_EVAL,
) -> RunResult:
    """Run a whole federation in Flower's simulation runtime (Ray), one virtual node per client.

    Each virtual node gets 1 CPU and no GPU; Ray runs as many client actors as there are CPUs.

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
    check_runnable(config, run_dir)
    results: list[RunResult] = []
    errors: list[BaseException] = []
    backend_config: dict[str, Any] = {
        "client_resources": {"num_cpus": 1, "num_gpus": 0.0},
        "init_args": {"num_cpus": max(1, min(n, os.cpu_count() or 1)), "num_gpus": 0},
    }
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
            backend_config=backend_config,
        )
    finally:
        flwr_logger.propagate = propagate
    if errors:
        raise errors[0]
    if not results:
        raise FederationError("the Flower simulation ended without a result (see its log)")
    return results[0]
