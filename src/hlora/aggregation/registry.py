"""Strategies by name, so that the CLI, the config and the Flower app can offer them."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

from hlora.aggregation.fedavg import aggregate_fedavg
from hlora.aggregation.flora import aggregate_flora
from hlora.aggregation.hlora import aggregate_hlora
from hlora.aggregation.types import AggregationOptions, ClientUpdate, GlobalUpdate
from hlora.aggregation.validation import UpdateSpec
from hlora.aggregation.zeropad import aggregate_zeropad


class AggregateFn(Protocol):
    """Signature every strategy's aggregation function has."""

    def __call__(
        self,
        updates: Sequence[ClientUpdate],
        options: AggregationOptions | None = None,
        spec: UpdateSpec | None = None,
        expected_ranks: Mapping[str, int] | None = None,
    ) -> GlobalUpdate: ...


@dataclass(frozen=True)
class Strategy:
    """A named aggregation strategy.

    Attributes:
        name: Registry key.
        aggregate: The pure aggregation function.
        description: One line for help texts.
        heterogeneous_ranks: Whether clients may have different ranks.
        merges_into_base: Whether clients merge each round's update into the frozen weights
            and restart from a fresh adapter (see :mod:`hlora.aggregation.flora`).
        optimizer_space: Where a server optimizer steps (see :mod:`hlora.server_opt`):
            ``"delta"`` (the whole update ``dW`` of each layer), ``"factors"`` (the global
            factors ``left``/``right`` themselves) or ``"increment"`` (the round's merged
            increment).
    """

    name: str
    aggregate: AggregateFn
    description: str
    heterogeneous_ranks: bool
    merges_into_base: bool = False
    optimizer_space: str = "delta"


def builtin_strategies() -> dict[str, Strategy]:
    """A fresh mapping name -> :class:`Strategy` of every built-in strategy."""
    items = [
        Strategy(
            "hlora",
            aggregate_hlora,
            "exact weighted sum of s*B@A, re-decomposed by SVD to each client's rank",
            heterogeneous_ranks=True,
        ),
        Strategy(
            "fedavg",
            aggregate_fedavg,
            "naive LoRA averaging of A and B separately (homogeneous ranks only)",
            heterogeneous_ranks=False,
            optimizer_space="factors",
        ),
        Strategy(
            "zeropad",
            aggregate_zeropad,
            "HetLoRA-style zero-padding to the largest rank, then averaging",
            heterogeneous_ranks=True,
            optimizer_space="factors",
        ),
        Strategy(
            "flora",
            aggregate_flora,
            "FLoRA-style stacking: exact update merged into the base, fresh adapters",
            heterogeneous_ranks=True,
            merges_into_base=True,
            optimizer_space="increment",
        ),
    ]
    return {s.name: s for s in items}


STRATEGY_NAMES: tuple[str, ...] = ("hlora", "fedavg", "zeropad", "flora")


def get_strategy(name: str, extra: Mapping[str, Strategy] | None = None) -> Strategy:
    """Look a strategy up by name.

    Args:
        name: A built-in name or a key of ``extra``.
        extra: User-defined strategies, consulted before the built-ins.

    Raises:
        ValueError: Naming the unknown strategy and the allowed names.
    """
    table = {**builtin_strategies(), **(extra or {})}
    if name not in table:
        raise ValueError(f"unknown strategy '{name}'; allowed: {', '.join(sorted(table))}")
    return table[name]
