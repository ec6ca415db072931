"""Whether the Hugging Face hub may be tried: the one place for the offline rule.

``huggingface_hub`` and ``datasets`` read their offline switches once, when they are imported,
and then still spend tens of seconds in connection retries before a hub load fails on a machine
without network. Readers that fall back to the hub ask :func:`hub_offline_reason` first, at call
time, and fail at once when the user has said the machine is offline.

The switches are the ones those libraries read, with their truth values (``1``, ``ON``, ``YES``,
``TRUE``, any case):

* ``HF_HUB_OFFLINE`` (``huggingface_hub``; ``TRANSFORMERS_OFFLINE`` is its older alias);
* ``HF_DATASETS_OFFLINE`` (``datasets``).

Any one of them set to a true value means offline. (``datasets`` lets ``HF_DATASETS_OFFLINE=0``
override ``HF_HUB_OFFLINE=1`` for itself, but its downloads go through ``huggingface_hub``, which
would still refuse them; so a true value anywhere wins.)
"""

from __future__ import annotations

import os
from collections.abc import Mapping

OFFLINE_VARIABLES: tuple[str, ...] = (
    "HF_HUB_OFFLINE",
    "HF_DATASETS_OFFLINE",
    "TRANSFORMERS_OFFLINE",
)
"""The environment variables that switch the Hugging Face libraries offline."""

_TRUE_VALUES = frozenset({"1", "ON", "YES", "TRUE"})


def hub_offline_reason(environ: Mapping[str, str] | None = None) -> str | None:
    """Why the hub must not be tried, or None when it may be.

    Args:
        environ: The environment to read; None for :data:`os.environ` (read at each call).

    Returns:
        ``"HF_HUB_OFFLINE=1 is set"`` for the first of :data:`OFFLINE_VARIABLES` with a true
        value (the value as written), else None.
    """
    env = os.environ if environ is None else environ
    for name in OFFLINE_VARIABLES:
        value = env.get(name)
        if value is not None and value.strip().upper() in _TRUE_VALUES:
            return f"{name}={value} is set"
    return None
