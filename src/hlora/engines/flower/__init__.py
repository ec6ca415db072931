"""The Flower engine: hlora's round loop over Flower's Message API, laid out as a Flower App.

Modules:

* :mod:`~hlora.engines.flower.server_app`: the ServerApp (``server_app``) and its main,
  :func:`~hlora.engines.flower.server_app.serve`: query the nodes, run the rounds, write the run
  folder.
* :mod:`~hlora.engines.flower.client_app`: the ClientApp (``client_app``), two thin decorated
  functions (``QUERY``: who am I; ``TRAIN``: one round of local training).
* :mod:`~hlora.engines.flower.node`: the node task behind the ClientApp: its data mode (own
  data, or a simulated partition of a shared task), this process's model and this node's
  examples (cached per process), the QUERY answer, training one instruction.
* :mod:`~hlora.engines.flower.features`: the node's tokenized examples cached on its disk.
* :mod:`~hlora.engines.flower.identity`: the server's QUERY round: which node is which client,
  at which rank.
* :mod:`~hlora.engines.flower.transport`: :class:`~hlora.engines.flower.transport.FlowerTransport`,
  the round loop's transport (one ``TRAIN`` message per node).
* :mod:`~hlora.engines.flower.codec`: message content <-> hlora's protocol types (bit-exact).
* :mod:`~hlora.engines.flower.settings`: the ``[tool.flwr.app.config]`` keys, parsed once.
* :mod:`~hlora.engines.flower.simulation`: a whole federation in Flower's simulation runtime.

Nothing is imported here, so importing one module does not import the others.
"""
