"""What a model is trained to do: the seam between the round loop and one kind of task.

An :class:`Objective` owns everything that depends on the task type: how an example becomes
model input (features), how features are batched, the training loss and how a batch is scored.
The round loop, the aggregation, the LoRA bank and both engines see only its methods, so a new
task type is one subclass in this package plus an entry in the registry
(:data:`hlora.objectives.OBJECTIVES`).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor

from hlora.data.glue import Example, TaskInfo
from hlora.tasktypes import SYSTEM_TEMPLATE

Feature = dict[str, Any]
"""One tokenized example: lists of token ids and ints, cheap to cache and to send."""


@dataclass
class BatchScore:
    """What one evaluation batch contributes.

    Attributes:
        preds: Predicted class of every example of the batch.
        labels: Its true class.
        loss_sum: Summed loss of the batch (see :meth:`Objective.score`).
        loss_count: How many terms ``loss_sum`` adds up.
    """

    preds: list[int]
    labels: list[int]
    loss_sum: float
    loss_count: int


class Objective(ABC):
    """One task type: features, batches, loss and scoring.

    Args:
        tokenizer: The backbone's tokenizer (``pad_token`` set).
        task: The labelled task the examples come from (its metrics and label count).
        architecture: ``"encoder"`` or ``"decoder"``.
        max_length: Most tokens of one example, special tokens included.
        system_prompt: How causal-LM prompts open (``data.system_prompt``:
            :func:`hlora.objectives.prompts.system_turns`); classifiers have no prompt, and the
            configuration refuses any other value than the default for them.
    """

    task_type: ClassVar[str]

    def __init__(
        self,
        tokenizer: Any,
        task: TaskInfo,
        *,
        architecture: str,
        max_length: int,
        system_prompt: str = SYSTEM_TEMPLATE,
    ):
        self.tokenizer = tokenizer
        self.task = task
        self.architecture = architecture
        self.max_length = max_length
        self.system_prompt = system_prompt

    @property
    def supports_logit_adjustment(self) -> bool:
        """Whether :meth:`loss` accepts a client's label log-prior (logit adjustment)."""
        return False

    @property
    def metrics(self) -> tuple[str, ...]:
        """Metric names of an evaluation (:func:`hlora.metrics.compute_metrics`)."""
        return self.task.metrics

    @abstractmethod
    def train_features(self, examples: Sequence[Example]) -> list[Feature]:
        """Tokenize training examples (no padding)."""

    @abstractmethod
    def eval_features(self, examples: Sequence[Example]) -> list[Feature]:
        """Tokenize evaluation examples (no padding)."""

    @abstractmethod
    def collate(self, features: Sequence[Feature]) -> dict[str, Tensor]:
        """Pad features into a batch of tensors (on the CPU)."""

    @abstractmethod
    def loss(
        self, model: torch.nn.Module, batch: dict[str, Tensor], log_prior: Tensor | None
    ) -> Tensor:
        """The scalar training loss of a batch of :meth:`train_features`.

        Args:
            model: The model (peft-wrapped while training).
            batch: From :meth:`collate`, on the model's device.
            log_prior: ``(num_labels,)`` added to the class logits (logit adjustment), or None;
                only when :attr:`supports_logit_adjustment`.

        Raises:
            DataError: ``log_prior`` given although not supported.
        """

    @abstractmethod
    def score(self, model: torch.nn.Module, batch: dict[str, Tensor]) -> BatchScore:
        """Predictions and summed loss of a batch of :meth:`eval_features` (no gradients)."""

    @staticmethod
    def length(feature: Feature) -> int:
        """Tokens of a feature, for length-grouped batching."""
        return len(feature["input_ids"])

    @abstractmethod
    def label(self, feature: Feature) -> int:
        """The class of a training feature (for the client's label prior)."""
