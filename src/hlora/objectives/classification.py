"""Sequence classification: a new head on the pooled (encoder) or last (decoder) token."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from hlora.data.collate import DynamicPaddingCollator, tokenize_pairs
from hlora.data.glue import Example, TaskInfo
from hlora.objectives.base import BatchScore, Feature, Objective
from hlora.tasktypes import SEQ_CLS


class SequenceClassification(Objective):
    """Cross-entropy on the head's logits ``(batch, num_labels)``; the prediction is the argmax.

    Decoders get an explicit newline between the two texts of a pair (their tokenizers add no
    separator).
    """

    task_type = SEQ_CLS

    def __init__(self, tokenizer: object, task: TaskInfo, **options: Any):
        super().__init__(tokenizer, task, **options)
        self._collator = DynamicPaddingCollator(tokenizer)

    @property
    def supports_logit_adjustment(self) -> bool:
        return True

    def _pairs(self, examples: Sequence[Example]) -> list[Example]:
        if self.architecture != "decoder":
            return list(examples)
        return [Example(e.text_a, "\n" + e.text_b, e.label) for e in examples]

    def train_features(self, examples: Sequence[Example]) -> list[Feature]:
        return tokenize_pairs(self.tokenizer, self._pairs(examples), self.max_length)

    def eval_features(self, examples: Sequence[Example]) -> list[Feature]:
        return self.train_features(examples)

    def collate(self, features: Sequence[Feature]) -> dict[str, Tensor]:
        return self._collator(features)

    def loss(
        self, model: torch.nn.Module, batch: dict[str, Tensor], log_prior: Tensor | None
    ) -> Tensor:
        if log_prior is None:
            loss: Tensor = model(**batch).loss
            return loss
        inputs = {k: v for k, v in batch.items() if k != "labels"}
        logits = model(**inputs).logits.float()  # (batch, num_labels)
        return torch.nn.functional.cross_entropy(logits + log_prior, batch["labels"])

    def score(self, model: torch.nn.Module, batch: dict[str, Tensor]) -> BatchScore:
        logits = model(**batch).logits.float()  # (batch, num_labels)
        loss = torch.nn.functional.cross_entropy(logits, batch["labels"], reduction="sum")
        labels = batch["labels"].tolist()
        return BatchScore(logits.argmax(-1).tolist(), labels, float(loss), len(labels))

    def label(self, feature: Feature) -> int:
        return int(feature["labels"])
