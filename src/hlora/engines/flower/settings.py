"""The Flower App's run config (``[tool.flwr.app.config]``), parsed once at the edge.

Every key is documented in docs/FLOWER.md. Values arrive as Flower's ``context.run_config``
(a flat mapping of kebab-case keys to scalars) and leave as a frozen :class:`AppSettings`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from hlora.config import RunConfig, load_config
from hlora.errors import ConfigError
from hlora.server import EVALUATIONS, SERVER_EVAL

CONFIG_KEY = "hlora-config"
RUN_DIR_KEY = "run-dir"
ROUND_TIMEOUT_KEY = "round-timeout"
NODE_WAIT_KEY = "node-wait"
NODE_DATA_KEY = "node-data"
EVAL_DATA_KEY = "eval-data"
REPLY_POLL_KEY = "reply-poll"
EVALUATION_KEY = "evaluation"
DEFAULT_REPLY_POLL_S = 0.25
"""Seconds between the server's pulls for replies (Flower's own ``send_and_receive``: 3 s)."""
DEFAULT_NODE_WAIT_S = 120.0
DEFAULT_ROUND_TIMEOUT_S = 1800.0

OWN = "own"
SIMULATED = "simulated-partition"
DATA_MODES: tuple[str, ...] = (OWN, SIMULATED)
"""A node's data modes: its own data, or a simulated partition of a shared task."""


def _seconds(settings: Mapping[str, Any], key: str, default: float) -> float:
    value = settings.get(key, default)
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise ConfigError(f"run config '{key}' must be a number of seconds, got {value!r}")
    try:
        seconds = float(value)
    except ValueError as err:
        raise ConfigError(f"run config '{key}' must be a number of seconds, got {value!r}") from err
    if not math.isfinite(seconds) or seconds < 0:
        raise ConfigError(f"run config '{key}' must be finite and >= 0, got {value!r}")
    return seconds


@dataclass(frozen=True)
class AppSettings:
    """The Flower App's run config.

    Attributes:
        hlora_config: Path of the hlora TOML run configuration ('' when the app was built
            with a configuration object, as in simulation).
        run_dir: The server's run folder ('' : ``output.dir/output.name`` as ``hlora run``).
        round_timeout: Seconds to wait for one round's replies (None: no limit, only when the
            run config sets ``round-timeout = 0``).
        node_wait: Seconds the server waits for ``federation.num_clients`` nodes to connect.
        node_data: The nodes' data mode: ``own`` (each node its own data) or
            ``simulated-partition`` (each node a partition of a shared task).
        eval_data: The server's evaluation data in the ``own`` mode: a GLUE-layout folder (its
            ``dev.tsv``) or one TSV / CSV / JSONL file ('' : the task's dev split as
            ``hlora run`` loads it).
        reply_poll: Seconds between the server's pulls for replies (Flower's own: 3).
        evaluation: Where the global model is evaluated (:data:`hlora.server.EVALUATIONS`):
            ``server`` (on the server's evaluation data), ``federated`` (on the nodes' own
            held-out data; the server reads no data at all) or ``both``.
    """

    hlora_config: str = field(default="", metadata={"help": "path of the hlora TOML file"})
    run_dir: str = field(default="", metadata={"help": "the server's run folder"})
    round_timeout: float | None = field(
        default=DEFAULT_ROUND_TIMEOUT_S,
        metadata={"help": "seconds to wait for a round's replies (None: no limit)"},
    )
    node_wait: float = field(
        default=DEFAULT_NODE_WAIT_S,
        metadata={"help": "seconds the server waits for the nodes to connect"},
    )
    node_data: str = field(
        default=OWN, metadata={"help": "the nodes' data mode: own | simulated-partition"}
    )
    eval_data: str = field(
        default="", metadata={"help": "the server's evaluation data in the own mode"}
    )

    reply_poll: float = field(
        default=DEFAULT_REPLY_POLL_S,
        metadata={"help": "seconds between the server's pulls for replies"},
    )
    evaluation: str = field(
        default=SERVER_EVAL, metadata={"help": "where the global model is evaluated"}
    )

    def __post_init__(self) -> None:
        if not math.isfinite(self.reply_poll) or self.reply_poll <= 0:
            raise ConfigError(f"run config '{REPLY_POLL_KEY}' must be > 0, got {self.reply_poll!r}")
        if self.node_data not in DATA_MODES:
            raise ConfigError(
                f"run config '{NODE_DATA_KEY}' must be one of {', '.join(DATA_MODES)}, got "
                f"{self.node_data!r}"
            )
        if self.evaluation not in EVALUATIONS:
            raise ConfigError(
                f"run config '{EVALUATION_KEY}' must be one of {', '.join(EVALUATIONS)}, got "
                f"{self.evaluation!r}"
            )

    @staticmethod
    def from_run_config(settings: Mapping[str, Any]) -> AppSettings:
        """Parse ``context.run_config``.

        Raises:
            ConfigError: A timeout or wait that is not a finite number >= 0, a reply poll
                that is not > 0, or an unknown node data mode or evaluation.
        """
        timeout = _seconds(settings, ROUND_TIMEOUT_KEY, DEFAULT_ROUND_TIMEOUT_S)
        return AppSettings(
            hlora_config=str(settings.get(CONFIG_KEY) or ""),
            run_dir=str(settings.get(RUN_DIR_KEY) or ""),
            round_timeout=timeout or None,
            node_wait=_seconds(settings, NODE_WAIT_KEY, DEFAULT_NODE_WAIT_S),
            node_data=str(settings.get(NODE_DATA_KEY) or OWN),
            eval_data=str(settings.get(EVAL_DATA_KEY) or ""),
            reply_poll=_seconds(settings, REPLY_POLL_KEY, DEFAULT_REPLY_POLL_S),
            evaluation=str(settings.get(EVALUATION_KEY) or SERVER_EVAL),
        )

    def load_config(self) -> RunConfig:
        """The hlora configuration named by ``hlora-config``.

        Raises:
            ConfigError: No ``hlora-config`` key, or a bad configuration.
        """
        if not self.hlora_config:
            raise ConfigError(
                f"the Flower run config has no '{CONFIG_KEY}' key: set it in "
                "[tool.flwr.app.config] or with flwr run --run-config"
            )
        return load_config(self.hlora_config)
