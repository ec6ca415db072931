"""Causal-LM instruction tuning (SFT): GLUE pairs as instructions, or a user's own examples.

Each example is a conversation rendered with the model's chat template
(:mod:`hlora.objectives.prompts`): the loss is the next-token cross-entropy on the answer
tokens only (the answer and the template's end-of-turn markup), never on the prompt.

* **GLUE pairs** (``mrpc``, ``rte``, ``qqp``, ``qqp-sample``): one user turn asks the task's
  question; the answer is the label's word. Evaluation scores each label's answer word by its
  log-likelihood after the prompt and predicts the likeliest, so accuracy and F1 are those of
  the classifier path on the same examples.
* **Instructions** (``instructions``: :mod:`hlora.data.instructions`): the example's own turns
  and response. Evaluation is the held-out answers' mean token loss and its perplexity.

Batches are padded on the left, so every sequence ends at the last column: the language-model
head runs only on the last ``K + 1`` positions (``logits_to_keep``), where ``K`` is the longest
answer of the batch, instead of on the whole sequence times a vocabulary of tens of thousands.
Position ids count real tokens only.

Too long an example keeps its answer and drops the oldest tokens of its prompt; an answer
longer than half of ``max_length`` keeps its start, after the prompt's last half
``max_length`` tokens.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from hlora.data.glue import INSTRUCTIONS, TaskInfo
from hlora.errors import DataError
from hlora.objectives.base import BatchScore, Feature, Objective
from hlora.objectives.prompts import (
    Turn,
    pair_instruction,
    render_turns,
    system_turns,
    with_system,
)
from hlora.tasktypes import CAUSAL_LM

IGNORE_INDEX = -100
"""Label of a position that carries no loss (prompt and padding)."""

_PAD_MULTIPLE = 8


class CausalLanguageModeling(Objective):
    """Next-token loss on the answers; evaluation by the answers' log-likelihood (GLUE pairs)
    or by the held-out answers' loss and perplexity (instructions)."""

    task_type = CAUSAL_LM

    def __init__(self, tokenizer: Any, task: TaskInfo, **options: Any):
        super().__init__(tokenizer, task, **options)
        #: What opens every prompt that has no system turn of its own (``data.system_prompt``).
        self.system = system_turns(tokenizer, self.system_prompt)
        self.pad_id = int(tokenizer.pad_token_id)
        if self.max_length < 4:
            raise DataError(f"max_length {self.max_length} leaves no room for a prompt")
        #: The GLUE task's instruction; None for free-form instructions.
        self.instruction = None if task.name == INSTRUCTIONS else pair_instruction(task.name)
        #: Token ids of each label's answer word, ``candidates[label]`` (GLUE pairs only).
        self.candidates: list[list[int]] = []
        self.single_token = False
        self._first_tokens = torch.zeros(0, dtype=torch.long)
        if self.instruction is not None:
            self._init_answers(task)

    def _init_answers(self, task: TaskInfo) -> None:
        assert self.instruction is not None
        if len(self.instruction.answers) != task.num_labels:
            raise DataError(f"task '{task.name}': one answer per label is needed")
        self.candidates = [self._encode(answer) for answer in self.instruction.answers]
        if any(not c for c in self.candidates) or len(set(map(tuple, self.candidates))) != len(
            self.candidates
        ):
            raise DataError(
                f"task '{task.name}': the answers {self.instruction.answers} do not tokenize to "
                "distinct, non-empty token sequences"
            )
        for answer, ids in zip(self.instruction.answers, self.candidates, strict=True):
            completion = self._encode(render_turns(self.tokenizer, "?", answer)[1])
            if completion[: len(ids)] != ids:  # scoring would read other tokens than training
                raise DataError(
                    f"the answer {answer!r} tokenizes differently inside the chat template "
                    f"({completion[: len(ids)]}) than alone ({ids})"
                )
        #: One forward pass per example when every answer is one distinct token.
        self.single_token = all(len(c) == 1 for c in self.candidates)
        self._first_tokens = torch.tensor([c[0] for c in self.candidates])
        longest = max(len(c) for c in self.candidates)
        if self.max_length <= longest + 1:
            raise DataError(f"max_length {self.max_length} leaves no room for a prompt")

    @property
    def supports_logit_adjustment(self) -> bool:
        """GLUE pairs whose answers start with distinct tokens."""
        return len(set(self._first_tokens.tolist())) == len(self.candidates) > 0

    def _encode(self, text: str) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def _encode_many(self, texts: Sequence[str]) -> list[list[int]]:
        if not texts:
            return []
        return [
            list(ids) for ids in self.tokenizer(list(texts), add_special_tokens=False)["input_ids"]
        ]

    def conversation(self, example: Any) -> tuple[str | list[Turn], str]:
        """The turns before the answer (the system turn of ``data.system_prompt`` first where
        they have none), and the answer."""
        if self.instruction is None:  # an InstructionExample
            turns: list[Turn] = [{"role": m.role, "content": m.content} for m in example.prompt]
            return with_system(turns, self.system), str(example.response)
        if not 0 <= example.label < len(self.instruction.answers):
            raise DataError(f"label {example.label} has no answer in task '{self.task.name}'")
        answer = self.instruction.answers[example.label]
        return with_system(self.instruction.render(example), self.system), answer

    def _render(self, examples: Sequence[Any]) -> tuple[list[list[int]], list[list[int]]]:
        """Prompt ids and completion ids of every example."""
        prompts: list[str] = []
        completions: list[str] = []
        for example in examples:
            prompt, completion = render_turns(self.tokenizer, *self.conversation(example))
            prompts.append(prompt)
            completions.append(completion)
        distinct = sorted(set(completions))
        encoded = dict(zip(distinct, self._encode_many(distinct), strict=True))
        return self._encode_many(prompts), [encoded[c] for c in completions]

    def train_features(self, examples: Sequence[Any]) -> list[Feature]:
        """``input_ids`` = prompt + completion, ``labels`` = -100 on the prompt, the completion
        after it; ``class_label`` the example's label (a category's index for instructions)."""
        prompts, completions = self._render(examples)
        features: list[Feature] = []
        for example, prompt, completion in zip(examples, prompts, completions, strict=True):
            room = max(self.max_length - len(completion), self.max_length // 2)
            keep = min(len(prompt), room)
            prompt = prompt[len(prompt) - keep :]
            completion = completion[: self.max_length - len(prompt)]
            features.append(
                {
                    "input_ids": prompt + completion,
                    "labels": [IGNORE_INDEX] * len(prompt) + completion,
                    "class_label": int(example.label),
                }
            )
        return features

    def eval_features(self, examples: Sequence[Any]) -> list[Feature]:
        """GLUE pairs: ``input_ids`` = the prompt only (answers are appended when batched),
        ``class_label`` the example's label. Instructions: as :meth:`train_features`."""
        if self.instruction is None:
            return self.train_features(examples)
        prompts, _ = self._render(examples)
        room = self.max_length - max(len(c) for c in self.candidates)
        return [
            {"input_ids": prompt[-room:], "class_label": int(example.label)}
            for example, prompt in zip(examples, prompts, strict=True)
        ]

    # -- batches -----------------------------------------------------------------------

    def _pad_left(
        self, rows: Sequence[Sequence[int]], labels: Sequence[Sequence[int]] | None
    ) -> dict[str, Tensor]:
        longest = max(len(r) for r in rows)
        longest = -(-longest // _PAD_MULTIPLE) * _PAD_MULTIPLE
        ids = torch.full((len(rows), longest), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(rows), longest), dtype=torch.long)
        for i, row in enumerate(rows):
            if row:
                ids[i, longest - len(row) :] = torch.as_tensor(row, dtype=torch.long)
                mask[i, longest - len(row) :] = 1
        batch = {
            "input_ids": ids,
            "attention_mask": mask,
            "position_ids": (mask.cumsum(-1) - 1).clamp(min=0),
        }
        if labels is not None:
            target = torch.full((len(rows), longest), IGNORE_INDEX, dtype=torch.long)
            for i, row in enumerate(labels):
                target[i, longest - len(row) :] = torch.as_tensor(row, dtype=torch.long)
            batch["labels"] = target
        return batch

    def collate(self, features: Sequence[Feature]) -> dict[str, Tensor]:
        """Left-padded ``input_ids``, ``attention_mask``, ``position_ids`` ``(rows, length)``.

        Training features add ``labels`` ``(batch, length)``. Evaluation features add
        ``class_label`` ``(batch,)`` and, unless every answer is a single token, one row per
        (example, answer) with that answer appended and its ``labels`` (``rows = batch *
        num_labels``, example-major).
        """
        if not features:
            raise DataError("cannot collate an empty batch")
        if "labels" in features[0]:  # training, or evaluating instructions
            batch = self._pad_left(
                [f["input_ids"] for f in features], [f["labels"] for f in features]
            )
        elif self.single_token:
            batch = self._pad_left([f["input_ids"] for f in features], None)
        else:
            rows = [f["input_ids"] + c for f in features for c in self.candidates]
            labels = [
                [IGNORE_INDEX] * len(f["input_ids"]) + c for f in features for c in self.candidates
            ]
            batch = self._pad_left(rows, labels)
        batch["class_label"] = torch.tensor([int(f["class_label"]) for f in features])
        return batch

    @staticmethod
    def _answer_logits(model: torch.nn.Module, batch: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
        """Logits ``(rows, K, vocab)`` predicting the last ``K`` tokens, and their labels
        ``(rows, K)``; ``K`` spans every labelled position of the batch."""
        labels = batch["labels"]
        labelled = (labels != IGNORE_INDEX).any(0).nonzero()
        first = int(labelled[0]) if len(labelled) else labels.shape[1] - 1
        k = labels.shape[1] - max(first, 1)
        out = model(
            input_ids=batch["input_ids"],
            attention_mask=batch["attention_mask"],
            position_ids=batch["position_ids"],
            logits_to_keep=k + 1,
        )
        return out.logits[:, :-1], labels[:, -k:]

    def loss(
        self, model: torch.nn.Module, batch: dict[str, Tensor], log_prior: Tensor | None
    ) -> Tensor:
        """Mean cross-entropy over the batch's answer tokens.

        With ``log_prior`` (``(num_labels,)``), the logits of each label's first answer token
        at the answer's first position get that label's log-prior added (logit adjustment, as
        the classification head gets it); that needs answers whose first tokens differ.
        """
        logits, targets = self._answer_logits(model, batch)
        logits = logits.float()  # (rows, K, vocab)
        if log_prior is not None:
            if not self.supports_logit_adjustment:
                raise DataError(
                    "logit adjustment needs label answers with distinct first tokens (GLUE "
                    f"pairs); task '{self.task.name}' has none"
                )
            rows = torch.arange(logits.shape[0], device=logits.device)
            first = (targets != IGNORE_INDEX).int().argmax(1)  # (rows,) the answer's start
            bias = torch.zeros_like(logits)
            tokens = self._first_tokens.to(logits.device)
            bias[rows[:, None], first[:, None], tokens[None, :]] = log_prior.to(logits.dtype)
            logits = logits + bias
        return torch.nn.functional.cross_entropy(
            logits.reshape(-1, logits.shape[-1]),
            targets.reshape(-1),
            ignore_index=IGNORE_INDEX,
        )

    def score(self, model: torch.nn.Module, batch: dict[str, Tensor]) -> BatchScore:
        """GLUE pairs: the likeliest answer of each example; the loss is the negative
        log-likelihood of the true answer (summed over its tokens), one term per example.
        Instructions: no predictions; the loss sums the answer tokens' negative
        log-likelihoods, one term per token."""
        if self.instruction is None:
            logits, targets = self._answer_logits(model, batch)
            nll = torch.nn.functional.cross_entropy(
                logits.float().reshape(-1, logits.shape[-1]),
                targets.reshape(-1),
                ignore_index=IGNORE_INDEX,
                reduction="sum",
            )
            return BatchScore([], [], float(nll), int((targets != IGNORE_INDEX).sum()))
        truth = batch["class_label"]
        if self.single_token:
            out = model(
                input_ids=batch["input_ids"],
                attention_mask=batch["attention_mask"],
                position_ids=batch["position_ids"],
                logits_to_keep=1,
            )
            logp = torch.log_softmax(out.logits[:, -1].float(), dim=-1)  # (batch, vocab)
            scores = logp[:, self._first_tokens.to(logp.device)]  # (batch, num_labels)
        else:
            logits, targets = self._answer_logits(model, batch)
            logp = torch.log_softmax(logits.float(), dim=-1)  # (rows, K, vocab)
            mask = targets != IGNORE_INDEX
            picked = logp.gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)
            scores = (picked * mask).sum(-1).view(len(truth), len(self.candidates))
        true_scores = scores.gather(1, truth.to(scores.device).unsqueeze(1)).squeeze(1)
        return BatchScore(
            scores.argmax(-1).tolist(), truth.tolist(), float(-true_scores.sum()), len(truth)
        )

    def label(self, feature: Feature) -> int:
        return int(feature["class_label"])
