"""The ClientApp: three thin decorated functions over the node task (:mod:`.node`).

``QUERY`` answers who this node is (:func:`~hlora.engines.flower.node.node_info`); ``TRAIN``
runs one round of local training (:func:`~hlora.engines.flower.node.train`); ``EVALUATE``
scores the global model on the node's held-out data (:func:`~hlora.engines.flower.node.evaluate`,
a federated evaluation). An exception goes
back to the server as the message's error, and the server drops this node for the round.

Each handled message logs one line through Flower's logger (the SuperNode's log) with how long
its ClientApp process had been up when the message reached hlora (Flower's entry point and the
imports) and how long hlora took over it: what a round costs beyond training, seen from the node.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from logging import INFO
from pathlib import Path
from typing import Any

import psutil
from flwr.app import Context, Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.common.logger import log as flwr_log

from hlora.config import RunConfig
from hlora.engines.flower import node
from hlora.engines.flower.settings import AppSettings


def _timed(msg: Message, handle: Callable[[], RecordDict]) -> Message:
    """The reply to ``msg`` from ``handle()``, logging the process's age and the handling time."""
    started = time.perf_counter()
    age_s = time.time() - psutil.Process().create_time()
    content = handle()
    flwr_log(
        INFO,
        "hlora: %s round %s handled in %.2f s by a ClientApp process up %.2f s before it",
        msg.metadata.message_type,
        msg.metadata.group_id or "-",
        time.perf_counter() - started,
        age_s,
    )
    return Message(content, reply_to=msg)


def make_client_app(
    config: RunConfig | None = None,
    own_data: Sequence[str] | None = None,
    own_eval_data: Sequence[str] | None = None,
) -> ClientApp:
    """A ClientApp answering ``QUERY`` (who am I), ``TRAIN`` (one round of local training) and
    ``EVALUATE`` (the global model on this node's held-out data).

    Args:
        config: This node's own copy of the configuration; None: ``hlora-config`` of the run
            config when that file exists here. Either way the node trains with the
            configuration the server sends, filling in only its own paths.
        own_data: For simulation: the node whose Flower ``partition-id`` is ``k`` trains on its
            own data ``own_data[k]`` (as if started with ``--node-config own-data=PATH``).
        own_eval_data: For simulation: that node's held-out data ``own_eval_data[k]`` (as if
            started with ``eval-data=PATH``).
    """
    app = ClientApp()

    def node_config(context: Context) -> dict[str, Any]:
        """``context.node_config``, with the simulated node's own data when given."""
        node = dict(context.node_config)
        if own_data is not None:
            node["own-data"] = own_data[int(node["partition-id"])]
        if own_eval_data is not None:
            node["eval-data"] = own_eval_data[int(node["partition-id"])]
        return node

    def local(context: Context) -> RunConfig | None:
        """This node's own copy of the configuration: the one given, else ``hlora-config``
        when that file exists on this machine (the server's message carries the run's)."""
        if config is not None:
            return config
        settings = AppSettings.from_run_config(dict(context.run_config))
        if settings.hlora_config and Path(settings.hlora_config).is_file():
            return settings.load_config()
        return None

    @app.query()
    def query(msg: Message, context: Context) -> Message:
        """This node's data mode, number of examples and declared rank / memory budget."""
        return _timed(
            msg, lambda: node.node_info(local(context), node_config(context), msg.content)
        )

    @app.query("moments")
    def moments(msg: Message, context: Context) -> Message:
        """Per-class feature moments of this node's training data under the final global
        model, for the head's calibration (``server.head_calibration``)."""
        return _timed(msg, lambda: node.moments(local(context), node_config(context), msg.content))

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        """One round of local training on this node's data (errors go back as errors)."""
        return _timed(msg, lambda: node.train(local(context), node_config(context), msg.content))

    @app.evaluate()
    def evaluate(msg: Message, context: Context) -> Message:
        """The global model on this node's held-out data: confusion counts and loss sums."""
        return _timed(msg, lambda: node.evaluate(local(context), node_config(context), msg.content))

    return app


# The entry point of a deployment (``[tool.flwr.app.components]`` in pyproject.toml).
client_app = make_client_app()
