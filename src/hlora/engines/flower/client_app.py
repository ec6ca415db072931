"""The ClientApp: two thin decorated functions over the node task (:mod:`.node`).

``QUERY`` answers who this node is (:func:`~hlora.engines.flower.node.node_info`); ``TRAIN``
runs one round of local training (:func:`~hlora.engines.flower.node.train`). An exception goes
back to the server as the message's error, and the server drops this node for the round.
"""

from __future__ import annotations

from flwr.app import Context, Message
from flwr.clientapp import ClientApp

from hlora.config import RunConfig
from hlora.engines.flower import node
from hlora.engines.flower.settings import AppSettings


def make_client_app(config: RunConfig | None = None) -> ClientApp:
    """A ClientApp answering ``QUERY`` (who am I) and ``TRAIN`` (one round of local training).

    Args:
        config: The configuration; None: read ``context.run_config["hlora-config"]``.
    """
    app = ClientApp()

    def cfg(context: Context) -> RunConfig:
        """The hlora configuration of this run."""
        if config is not None:
            return config
        return AppSettings.from_run_config(dict(context.run_config)).load_config()

    @app.query()
    def query(msg: Message, context: Context) -> Message:
        """This node's partition id, number of examples and declared rank / memory budget."""
        return Message(node.node_info(cfg(context), dict(context.node_config)), reply_to=msg)

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        """One round of local training on this node's partition (errors go back as errors)."""
        reply = node.train(cfg(context), dict(context.node_config), msg.content)
        return Message(reply, reply_to=msg)

    return app


# The entry point of a deployment (``[tool.flwr.app.components]`` in pyproject.toml).
client_app = make_client_app()
