"""What one client needs in memory while it trains at a given rank (the ``memory`` rank rule).

A client's peak is its frozen base weights, the activations autograd keeps for the backward pass
of its largest batch, and the training state of what it trains (its LoRA factors and the head:
weight, gradient and the optimizer's state, :attr:`TrainConfig.adapter_bytes_per_param`). The
first is counted from the model as loaded (each parameter at its own dtype). The activations are
**measured, not modelled**: one forward pass of the training loss at ``train.batch_size``
examples of ``model.max_length`` tokens (the worst batch the configuration allows), on the same
model, adapter, precision (bf16 autocast or not) and activation checkpointing as the client's
own steps, counting the bytes of every tensor autograd saves (each storage once; the weights are
the base's). A formula would have to know the attention kernel, the dropout masks and the MLP of
each architecture; the forward pass knows them.

Not counted: the transient buffers of one operation (an attention kernel's workspace, the logits
before the loss), the allocator's caching and, on a CPU, the Python runtime itself (torch and
transformers imported: about 0.5 GB). ``benchmarks/memory_rule.py`` compares the estimate with
measured peaks; docs/PERFORMANCE.md gives the error.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from hlora.config import RunConfig
from hlora.data.glue import INSTRUCTIONS, Example
from hlora.data.instructions import InstructionExample, Message
from hlora.runtime import ModelRuntime

_MIB = 2**20


@dataclass(frozen=True)
class Footprint:
    """Bytes one client needs while it trains (see the module docstring).

    Attributes:
        base_weights: The frozen model's parameters at their dtypes (its own head included).
        activations: What autograd keeps for the backward pass of one worst-case batch.
        training_state: The weights, gradients and optimizer state of the rank's LoRA factors
            and of its trained copy of the head.
    """

    base_weights: int
    activations: int
    training_state: int

    @property
    def total(self) -> int:
        """All of it, in bytes."""
        return self.base_weights + self.activations + self.training_state

    def describe(self) -> str:
        """One line in MiB, e.g. ``'96.3 MiB = base 86.6 + activations 9.1 + state 0.6'``."""
        return (
            f"{self.total / _MIB:.1f} MiB = base {self.base_weights / _MIB:.1f} + activations "
            f"{self.activations / _MIB:.1f} + training state {self.training_state / _MIB:.1f}"
        )


FootprintFn = Callable[[int], Footprint]
"""rank -> what a client of that rank needs."""


def worst_case_examples(task: str, batch_size: int, max_length: int) -> list[Any]:
    """``batch_size`` examples that tokenize to at least ``max_length`` tokens (then truncated
    to it): the largest batch a run's configuration allows. For free-form instructions half
    of the words are the answer (the answer's tokens are the ones the loss scores)."""
    words = " ".join(["memory"] * max_length)
    if task == INSTRUCTIONS:
        return [InstructionExample((Message("user", words),), words)] * batch_size
    return [Example(words, words, 0)] * batch_size


def measure_footprint(runtime: ModelRuntime, rank: int, examples: Sequence[Any]) -> Footprint:
    """What a rank-``rank`` client training on batches like ``examples`` needs.

    Args:
        runtime: The model with its LoRA bank (``rank`` among its ranks); its training settings
            (precision, activation checkpointing) are the client's.
        rank: The client's rank.
        examples: One training batch (see :func:`worst_case_examples`).

    Returns:
        The footprint; the activations are measured by one forward pass (no backward, no
        update: the model is unchanged).
    """
    bank = runtime.bank
    model = bank.model
    every_rank = {id(p) for r in bank.ranks for p in bank.trainable_parameters(r)}
    base = sum(p.numel() * p.element_size() for p in model.parameters() if id(p) not in every_rank)
    per_param = runtime.train_config.adapter_bytes_per_param
    state = per_param * sum(p.numel() for p in bank.trainable_parameters(rank))
    weights = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in weights:
            saved[storage.data_ptr()] = storage.nbytes()
        return t

    batch = runtime.batch(runtime.objective.train_features(list(examples)))
    previous = bank.active_rank
    bank.activate(rank)
    model.train()
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), runtime.autocast():
            loss = runtime.objective.loss(model, batch, None)
        del loss
    finally:
        model.eval()
        bank.activate(previous)
    return Footprint(base, sum(saved.values()), state)


def footprint_fn(runtime: ModelRuntime, config: RunConfig) -> FootprintFn:
    """:func:`measure_footprint` of the configuration's worst-case batch (``train.batch_size``
    examples of ``model.max_length`` tokens), measured once per rank, when first asked."""
    examples = worst_case_examples(
        config.data.task, config.train.batch_size, config.model.max_length
    )
    cache: dict[int, Footprint] = {}

    def of(rank: int) -> Footprint:
        if rank not in cache:
            cache[rank] = measure_footprint(runtime, rank, examples)
        return cache[rank]

    return of
