"""Rendering examples as chat turns: GLUE pairs as instructions, and the model's chat template.

A user's own instruction examples (:mod:`hlora.data.instructions`) are already turns.

A labelled sentence pair becomes one user turn that asks the task's question and one assistant
turn that answers with the label's word (:data:`PAIR_INSTRUCTIONS`), e.g. for MRPC::

    user:      Do these two sentences mean the same thing?
               Sentence 1: ...
               Sentence 2: ...
               Answer yes or no.
    assistant: yes

Turns are rendered with the tokenizer's chat template when it has one, else with a plain
``### Instruction`` / ``### Response`` layout ending in the end-of-sequence token.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

from hlora.data.glue import Example
from hlora.errors import DataError
from hlora.tasktypes import SYSTEM_NONE, SYSTEM_TEMPLATE


@dataclass(frozen=True)
class PairInstruction:
    """How a sentence-pair task is asked.

    Attributes:
        question: The question, first line of the user turn.
        first: Name of the first text (``"Sentence 1"``).
        second: Name of the second text.
        answers: The answer word of each label id (``answers[label]``).
    """

    question: str
    first: str
    second: str
    answers: tuple[str, ...]

    def render(self, example: Example) -> str:
        """The user turn of ``example``."""
        choices = " or ".join(self.answers)
        return (
            f"{self.question}\n{self.first}: {example.text_a}\n{self.second}: "
            f"{example.text_b}\nAnswer {choices}."
        )


_SAME_SENTENCES = PairInstruction(
    "Do these two sentences mean the same thing?", "Sentence 1", "Sentence 2", ("no", "yes")
)
_SAME_QUESTIONS = PairInstruction(
    "Do these two questions ask the same thing?", "Question 1", "Question 2", ("no", "yes")
)
#: The instruction of each GLUE task (labels as in :mod:`hlora.data.glue`: RTE 0 = entailment).
PAIR_INSTRUCTIONS: Mapping[str, PairInstruction] = MappingProxyType(
    {
        "mrpc": _SAME_SENTENCES,
        "rte": PairInstruction(
            "Does the premise entail the hypothesis?", "Premise", "Hypothesis", ("yes", "no")
        ),
        "qqp": _SAME_QUESTIONS,
        "qqp-sample": _SAME_QUESTIONS,
    }
)

PLAIN_PROMPT = "### Instruction:\n{user}\n\n### Response:\n"
"""The layout used when the tokenizer has no chat template (one user turn)."""
_PLAIN_HEADERS = {"system": "### System:\n", "user": "### Instruction:\n"}

Turn = Mapping[str, str]
"""A chat turn as chat templates take it: ``{"role": ..., "content": ...}``."""


def pair_instruction(task: str) -> PairInstruction:
    """The instruction of a GLUE task.

    Raises:
        DataError: A task without one.
    """
    try:
        return PAIR_INSTRUCTIONS[task]
    except KeyError:
        raise DataError(
            f"task '{task}' has no instruction form; tasks: {', '.join(PAIR_INSTRUCTIONS)}"
        ) from None


def has_chat_template(tokenizer: Any) -> bool:
    """Whether the tokenizer carries a chat template."""
    return bool(getattr(tokenizer, "chat_template", None))


def render_turns(tokenizer: Any, turns: str | list[Turn], answer: str) -> tuple[str, str]:
    """Text of a conversation, cut where the answer starts.

    Args:
        tokenizer: The model's tokenizer.
        turns: The turns before the answer (system, user, earlier assistant turns), or one
            user turn's text.
        answer: The assistant's answer.

    Returns:
        ``(prompt, completion)``: the prompt ends with the assistant header (the generation
        prompt); the completion is the answer with the template's end-of-turn markup after it.
        ``prompt + completion`` is the whole conversation.
    """
    messages = [{"role": "user", "content": turns}] if isinstance(turns, str) else list(turns)
    eos = getattr(tokenizer, "eos_token", None) or ""
    if not has_chat_template(tokenizer):
        if len(messages) == 1 and messages[0]["role"] == "user":
            return PLAIN_PROMPT.format(user=messages[0]["content"]), answer + eos
        prompt = "".join(
            _PLAIN_HEADERS.get(m["role"], "### Response:\n")
            + m["content"]
            + (eos if m["role"] == "assistant" else "")
            + "\n\n"
            for m in messages
        )
        return prompt + "### Response:\n", answer + eos
    prompt = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    whole = tokenizer.apply_chat_template(
        [*messages, {"role": "assistant", "content": answer}], tokenize=False
    )
    if not whole.startswith(prompt):  # a template that renders the last turn differently
        return prompt, answer + eos
    return prompt, whole[len(prompt) :]


def system_turns(tokenizer: Any, system_prompt: str) -> list[Turn]:
    """The turns to put before a conversation that has no system turn of its own.

    Args:
        tokenizer: The model's tokenizer.
        system_prompt: :data:`SYSTEM_TEMPLATE`, :data:`SYSTEM_NONE`, or a system prompt's text.

    Returns:
        ``[]`` or one system turn. For :data:`SYSTEM_NONE`, an empty system turn only when the
        chat template renders a conversation longer without one (it adds a default prompt).
    """
    if system_prompt == SYSTEM_TEMPLATE:
        return []
    if system_prompt != SYSTEM_NONE:
        return [{"role": "system", "content": system_prompt}]
    if not has_chat_template(tokenizer):
        return []
    empty: list[Turn] = [{"role": "system", "content": ""}]
    user: list[Turn] = [{"role": "user", "content": "?"}]
    bare = tokenizer.apply_chat_template(user, tokenize=False, add_generation_prompt=True)
    emptied = tokenizer.apply_chat_template(
        empty + user, tokenize=False, add_generation_prompt=True
    )
    return empty if len(emptied) < len(bare) else []


def with_system(turns: str | list[Turn], system: list[Turn]) -> str | list[Turn]:
    """``turns`` (a user turn's text, or turns) with ``system`` before them, unless they open
    with a system turn of their own."""
    if not system:
        return turns
    listed: list[Turn] = (
        [{"role": "user", "content": turns}] if isinstance(turns, str) else list(turns)
    )
    if listed and listed[0]["role"] == "system":
        return turns
    return [*system, *listed]


def generation_prompt(tokenizer: Any, turns: str | list[Turn]) -> str:
    """The prompt text a model answers ``turns`` from (see :func:`render_turns`)."""
    return render_turns(tokenizer, turns, "")[0]
