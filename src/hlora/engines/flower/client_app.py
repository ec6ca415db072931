"""The ClientApp: three thin decorated functions over the node task (:mod:`.node`).

``QUERY`` answers who this node is (:func:`~hlora.engines.flower.node.node_info`); ``TRAIN``
runs one round of local training (:func:`~hlora.engines.flower.node.train`); ``EVALUATE``
scores the global model on the node's held-out data (:func:`~hlora.engines.flower.node.evaluate`,
a federated evaluation). An exception goes
back to the server as the message's error, and the server drops this node for the round.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from flwr.app import Context, Message
from flwr.clientapp import ClientApp

from hlora.config import RunConfig
from hlora.engines.flower import node
from hlora.engines.flower.settings import AppSettings


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
        info = node.node_info(local(context), node_config(context), msg.content)
        return Message(info, reply_to=msg)

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        """One round of local training on this node's data (errors go back as errors)."""
        reply = node.train(local(context), node_config(context), msg.content)
        return Message(reply, reply_to=msg)

    @app.evaluate()
    def evaluate(msg: Message, context: Context) -> Message:
        """The global model on this node's held-out data: confusion counts and loss sums."""
        reply = node.evaluate(local(context), node_config(context), msg.content)
        return Message(reply, reply_to=msg)

    return app


# The entry point of a deployment (``[tool.flwr.app.components]`` in pyproject.toml).
client_app = make_client_app()
