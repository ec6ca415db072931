"""Generation with a causal-LM run's model: samples at the end of a run and ``hlora generate``."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from hlora.errors import ConfigError
from hlora.objectives.prompts import Turn, generation_prompt, system_turns, with_system
from hlora.tasktypes import CAUSAL_LM

GENERATIONS_FILE = "generations.jsonl"
"""Greedy answers of the final global model to a few held-out prompts, in a causal-LM run."""


def generate_answers(
    model: Any, tokenizer: Any, prompts: Sequence[str | list[Turn]], *, max_new_tokens: int = 32
) -> list[str]:
    """Greedy answers of a causal LM, each prompt rendered as the model's chat prompt.

    Args:
        model: A transformers (or peft) causal LM.
        tokenizer: Its tokenizer.
        prompts: Each a user turn's text, or the turns before the answer.
        max_new_tokens: Most tokens generated per answer.

    Returns:
        The decoded answers, special tokens removed.
    """
    answers = []
    device = next(model.parameters()).device
    with torch.no_grad():
        for prompt in prompts:
            text = generation_prompt(tokenizer, prompt)
            encoded = tokenizer(text, add_special_tokens=False, return_tensors="pt").to(device)
            out = model.generate(
                **encoded,
                max_new_tokens=max_new_tokens,
                do_sample=False,
                pad_token_id=tokenizer.pad_token_id,
            )
            new = out[0, encoded["input_ids"].shape[1] :]
            answers.append(tokenizer.decode(new, skip_special_tokens=True).strip())
    return answers


def generate_with_update(
    bank: Any,
    tokenizer: Any,
    delta: Mapping[str, Any],
    extras: Mapping[str, torch.Tensor],
    prompts: Sequence[str | list[Turn]],
    *,
    max_new_tokens: int,
) -> list[str]:
    """:func:`generate_answers` of the base model with the whole update ``delta`` (layer name ->
    ``LowRankDelta``) applied for the duration (``LoraBank.evaluating``)."""
    with bank.evaluating(delta, extras) as model:
        return generate_answers(model, tokenizer, prompts, max_new_tokens=max_new_tokens)


def generate_from_run(
    run_dir: Path, prompts: Sequence[str], *, rank: int = 0, max_new_tokens: int = 64
) -> list[str]:
    """Answers of a finished (or interrupted) causal-LM run's global model.

    Args:
        run_dir: The run folder.
        prompts: User turns.
        rank: 0: the whole global update merged; else its best rank-``rank`` adapter (what a
            client of that rank holds, and what ``hlora export --rank`` writes).
        max_new_tokens: Most tokens generated per answer.

    Raises:
        CheckpointError: Not a run folder, no finished round, or no global update.
        ConfigError: Not a causal-LM run, or a negative rank.
    """
    from hlora.export import load_run_update, rank_factors
    from hlora.stack import build_stack

    if rank < 0:
        raise ConfigError(f"invalid --rank {rank}: expected 0 (the whole update) or a rank >= 1")
    config, state, delta = load_run_update(run_dir)
    if config.model.task_type != CAUSAL_LM:
        raise ConfigError(
            f"run '{run_dir}' trained a '{config.model.task_type}' model; generation needs "
            "model.task_type = 'causal-lm'"
        )
    stack = build_stack(config, [rank or 1], dropout=False)
    bank, tokenizer = stack.bank, stack.backbone.tokenizer
    # Prompts open as the run trained them (data.system_prompt).
    system = system_turns(tokenizer, config.data.system_prompt)
    turns = [with_system(prompt, system) for prompt in prompts]
    if rank:
        bank.set_factors(rank, rank_factors(delta, rank, bank.scaling))
        bank.activate(rank)
        bank.model.eval()
        return generate_answers(bank.model, tokenizer, turns, max_new_tokens=max_new_tokens)
    return generate_with_update(
        bank, tokenizer, delta, state.extras, turns, max_new_tokens=max_new_tokens
    )
