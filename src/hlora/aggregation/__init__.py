"""Server-side aggregation of LoRA updates: pure tensor math (torch only).

No ``nn.Module``, peft, Flower or file I/O here, and inputs are never mutated. Strategies:
``hlora`` (exact, heterogeneous ranks), ``fedavg``, ``zeropad`` and ``flora`` (baselines).
"""

from hlora.aggregation.factored import dense_svd, factored_svd, gram_svd, qr_svd, randomized_svd
from hlora.aggregation.fedavg import aggregate_fedavg
from hlora.aggregation.flora import aggregate_flora
from hlora.aggregation.hlora import aggregate_hlora
from hlora.aggregation.registry import STRATEGY_NAMES, Strategy, builtin_strategies, get_strategy
from hlora.aggregation.types import (
    AggregationOptions,
    ClientUpdate,
    GlobalUpdate,
    LoraFactors,
    LowRankDelta,
)
from hlora.aggregation.validation import (
    AggregationError,
    InvalidUpdateError,
    UpdateSpec,
    validate_update,
    validate_updates,
)
from hlora.aggregation.zeropad import aggregate_zeropad

__all__ = [
    "STRATEGY_NAMES",
    "AggregationError",
    "AggregationOptions",
    "ClientUpdate",
    "GlobalUpdate",
    "InvalidUpdateError",
    "LoraFactors",
    "LowRankDelta",
    "Strategy",
    "UpdateSpec",
    "aggregate_fedavg",
    "aggregate_flora",
    "aggregate_hlora",
    "aggregate_zeropad",
    "builtin_strategies",
    "dense_svd",
    "factored_svd",
    "get_strategy",
    "gram_svd",
    "qr_svd",
    "randomized_svd",
    "validate_update",
    "validate_updates",
]
