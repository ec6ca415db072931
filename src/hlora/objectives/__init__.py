"""Task types behind one seam (:class:`~hlora.objectives.base.Objective`).

* ``"seq-cls"``: :class:`~hlora.objectives.classification.SequenceClassification`;
* ``"causal-lm"``: :class:`~hlora.objectives.causal_lm.CausalLanguageModeling`.

Adding a task type is one module here and one entry in :data:`OBJECTIVES`.
"""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType

from hlora.data.glue import TaskInfo
from hlora.errors import ConfigError
from hlora.models import Backbone
from hlora.objectives.base import BatchScore, Feature, Objective
from hlora.objectives.causal_lm import CausalLanguageModeling
from hlora.objectives.classification import SequenceClassification
from hlora.tasktypes import SYSTEM_TEMPLATE

__all__ = [
    "OBJECTIVES",
    "BatchScore",
    "CausalLanguageModeling",
    "Feature",
    "Objective",
    "SequenceClassification",
    "make_objective",
]

#: Task type (``model.task_type``) -> its objective.
OBJECTIVES: Mapping[str, type[Objective]] = MappingProxyType(
    {cls.task_type: cls for cls in (SequenceClassification, CausalLanguageModeling)}
)


def make_objective(
    backbone: Backbone, task: TaskInfo, max_length: int, system_prompt: str = SYSTEM_TEMPLATE
) -> Objective:
    """The objective of the backbone's task type, bound to its tokenizer.

    Args:
        backbone: The loaded model and tokenizer.
        task: The task the examples come from.
        max_length: ``model.max_length``.
        system_prompt: ``data.system_prompt`` (causal LMs only).

    Raises:
        ConfigError: A task type without an objective.
    """
    try:
        cls = OBJECTIVES[backbone.task_type]
    except KeyError:
        raise ConfigError(
            f"task type {backbone.task_type!r} is not one of {', '.join(OBJECTIVES)}"
        ) from None
    return cls(
        backbone.tokenizer,
        task,
        architecture=backbone.architecture,
        max_length=max_length,
        system_prompt=system_prompt,
    )
