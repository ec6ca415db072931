"""Domain exceptions shared across hlora.

Every error a user can cause derives from :class:`HloraError`; the CLI prints its message on one
line and exits non-zero.
"""

from __future__ import annotations


class HloraError(Exception):
    """Base class of every error hlora raises for bad input."""


class ConfigError(HloraError):
    """A configuration key or value is invalid."""


class DataError(HloraError):
    """A task's data cannot be found or read."""


class ModelError(HloraError):
    """A backbone model cannot be found or loaded, or an adapter does not fit it."""


class CheckpointError(HloraError):
    """A run checkpoint is missing, corrupt or belongs to another configuration."""
