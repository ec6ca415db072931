"""Export a finished (or interrupted) run: a peft adapter at any rank, or the merged model."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from pathlib import Path

import torch

from hlora.aggregation import LowRankDelta
from hlora.checkpoint import CHECKPOINT_FILE, ServerState, load_state
from hlora.config import RunConfig, fingerprint
from hlora.errors import CheckpointError, ConfigError
from hlora.quantization import NO_QUANTIZATION


def rank_factors(
    delta: Mapping[str, LowRankDelta], rank: int, scaling: float
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Each layer's best rank-``rank`` LoRA factors ``(A (rank, in), B (out, rank))`` of the
    update ``delta`` (:meth:`LowRankDelta.best_rank`), for a model whose LoRA scaling is
    ``scaling``: what an adapter of that rank holds when exported or used for generation."""
    out = {}
    for name, d in delta.items():
        factors = d.best_rank(rank, scaling)
        out[name] = (factors.A, factors.B)
    return out


def load_run_update(run_dir: Path) -> tuple[RunConfig, ServerState, dict[str, LowRankDelta]]:
    """A run folder's configuration, its checkpoint and the whole global update per layer.

    Raises:
        CheckpointError: Not a run folder, no finished round, or no global update (a
            ``local`` run keeps one adapter per client).
    """
    from hlora.config import load_run_config

    config = load_run_config(run_dir)
    state = load_state(run_dir / CHECKPOINT_FILE, fingerprint(config))
    if state.round_num == 0:
        raise CheckpointError(f"run '{run_dir}' has no finished round to export")
    delta = state.whole_update()
    if not delta:
        raise CheckpointError(
            f"run '{run_dir}' has no global update (strategy "
            f"'{config.federation.strategy}' keeps one adapter per client)"
        )
    return config, state, delta


def export_run(
    run_dir: Path, *, rank: int, out: str | None = None, merged: str | None = None
) -> Path:
    """Write the run's global model at ``rank`` as a peft adapter, or merged (``merged``).

    The adapter holds the best rank-``rank`` approximation of the run's whole update
    (Eckart-Young, through the factored SVD) and the aggregated head; load it with
    ``PeftModel.from_pretrained(base_model, folder)``. ``merged`` writes the base model with the
    whole (untruncated) update merged into its weights, with ``save_pretrained``, plus the
    tokenizer. A run on a 4-bit base (``model.quantization``) is exported on the full-precision
    base, as QLoRA adapters are.

    Raises:
        CheckpointError: Not a run folder, or no finished round.
        ConfigError: A rank < 1.
    """
    from hlora.stack import build_stack

    if rank < 1:
        raise ConfigError(f"invalid --rank {rank}: expected an integer >= 1")
    config, state, delta = load_run_update(run_dir)
    # A 4-bit run (QLoRA) is exported on its full-precision base, as QLoRA adapters are merged.
    full = dataclasses.replace(
        config, model=dataclasses.replace(config.model, quantization=NO_QUANTIZATION)
    )
    # The label count is the task's (a head's first tensor need not be its label vector).
    stack = build_stack(full, [rank], dropout=False)
    backbone, bank = stack.backbone, stack.bank
    if merged:
        target = Path(merged)
        dense = {n: d.dense() for n, d in delta.items()}
        model = bank.merged_model(dense, state.extras)
        model.save_pretrained(target)
        backbone.tokenizer.save_pretrained(target)
        return target
    factors = rank_factors(delta, rank, bank.scaling)
    target = Path(out) if out else run_dir / "export" / f"r{rank}"
    return bank.export_peft(rank, factors, state.extras, target)
