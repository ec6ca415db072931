"""A run's model stack, built from its configuration in one place.

The backbone (loaded for ``model.task_type``), its LoRA bank, the task type's objective and the
runtime that trains and evaluates with them. The in-process federation, the Flower server, a
Flower node and ``hlora export`` all build theirs here, so they cannot drift apart.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import transformers

from hlora.adapters import LoraBank
from hlora.config import RunConfig
from hlora.data.glue import get_task
from hlora.models import Backbone, load_backbone
from hlora.objectives import Objective, make_objective
from hlora.quantization import NO_QUANTIZATION, check_supported
from hlora.runtime import ModelRuntime, resolve_device


@dataclass
class ModelStack:
    """The backbone, its LoRA bank, the objective and the runtime of one process."""

    backbone: Backbone
    bank: LoraBank
    objective: Objective
    runtime: ModelRuntime


def load_run_backbone(config: RunConfig) -> Backbone:
    """The run's backbone as every process loads it (the head seeded by ``federation.seed``;
    a ``model.quantization`` base in 4 bits on the run's CUDA device).

    Raises:
        HloraError: The model cannot be loaded, the task is unknown, or the quantization
            cannot run here (:func:`hlora.quantization.check_supported`).
    """
    device = None
    if config.model.quantization != NO_QUANTIZATION:  # loaded on its device, so check it now
        device = resolve_device(config.train.device)
        check_supported(config.model.quantization, device)
    return load_backbone(
        config.model.name,
        get_task(config.data.task).num_labels,
        seed=config.federation.seed,
        task_type=config.model.task_type,
        quantization=config.model.quantization,
        device=device,
    )


def _enable_activation_checkpointing(model: transformers.PreTrainedModel) -> None:
    """Non-reentrant activation checkpointing (it needs no gradient on the frozen inputs).

    transformers renamed ``gradient_checkpointing_enable`` to ``activation_checkpointing_enable``
    during 5.x (the old name a deprecated alias since); releases before the rename have only the
    old one.
    """
    enable = getattr(model, "activation_checkpointing_enable", None)
    if enable is not None:
        enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def build_stack(
    config: RunConfig,
    ranks: Iterable[int],
    *,
    backbone: Backbone | None = None,
    dropout: bool = True,
) -> ModelStack:
    """Load (or take) the backbone and wrap it with adapters of ``ranks``.

    Args:
        config: The run configuration.
        ranks: The ranks the bank must hold.
        backbone: An already loaded :func:`load_run_backbone`, or None to load one.
        dropout: Use ``model.lora_dropout`` (False: no dropout, e.g. for export).

    Raises:
        HloraError: A bad model, target module, rank or task.
    """
    if backbone is None:
        backbone = load_run_backbone(config)
    if config.train.gradient_checkpointing:
        _enable_activation_checkpointing(backbone.model)
    bank = LoraBank(
        backbone,
        sorted(set(ranks)),
        scaling=config.model.lora_scaling,
        target_modules=config.model.target_modules or None,
        dropout=config.model.lora_dropout if dropout else 0.0,
    )
    objective = run_objective(config, backbone)
    runtime = ModelRuntime(bank, objective, config.train, resolve_device(config.train.device))
    return ModelStack(backbone, bank, objective, runtime)


def run_objective(config: RunConfig, backbone: Backbone) -> Objective:
    """The objective of a run's task on its backbone (its length and system prompt)."""
    return make_objective(
        backbone,
        get_task(config.data.task),
        config.model.max_length,
        config.data.system_prompt,
    )
