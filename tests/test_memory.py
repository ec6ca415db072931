"""The ``memory`` rank rule's footprint (:mod:`hlora.memory`) on tiny models built in the test.

How close the estimate comes to a measured peak is the benchmark's job
(``benchmarks/memory_rule.py``); here: each part counts what it says, activations grow with
the batch as they must and shrink under activation checkpointing, the measurement leaves the
model as it was, and the rule picks ranks by it.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from hlora.config import load_config, replace
from hlora.errors import ConfigError
from hlora.federation import build_federation
from hlora.memory import footprint_fn, measure_footprint, worst_case_examples
from hlora.stack import build_stack
from tiny_models import save_tiny_causal_model, tiny_overrides


def _stack(model_dir: Path, glue_dir: Path, tmp_path: Path, **extra: object):  # type: ignore[no-untyped-def]
    config = load_config(None, tuple(tiny_overrides(model_dir, glue_dir, tmp_path, **extra)))
    return config, build_stack(config, config.federation.ranks)


def test_each_part_counts_what_it_says(tiny_bert_dir: Path, glue_dir: Path, tmp_path: Path) -> None:
    config, stack = _stack(tiny_bert_dir, glue_dir, tmp_path)
    bank = stack.bank
    fp = footprint_fn(stack.runtime, config)
    shapes = bank.layer_shapes()
    head = sum(t.numel() for t in bank.get_extras(2).values())
    for rank in (2, 4):
        lora = rank * sum(s.in_features + s.out_features for s in shapes.values())
        assert fp(rank).training_state == 16 * (lora + head)
    adapters = {id(p) for r in bank.ranks for p in bank.trainable_parameters(r)}
    frozen = [p for p in bank.model.parameters() if id(p) not in adapters]
    assert fp(2).base_weights == sum(4 * p.numel() for p in frozen)  # fp32 weights
    assert fp(2).base_weights == fp(4).base_weights
    assert fp(4).activations > fp(2).activations > 0  # rank-sized LoRA intermediates
    assert fp(4).total == fp(4).base_weights + fp(4).activations + fp(4).training_state


def test_activations_grow_with_the_batch_and_the_model_is_left_as_it_was(
    tiny_bert_dir: Path, glue_dir: Path, tmp_path: Path
) -> None:
    config, stack = _stack(tiny_bert_dir, glue_dir, tmp_path)
    runtime, bank = stack.runtime, stack.bank
    bank.activate(4)
    flags = [p.requires_grad for p in bank.model.parameters()]
    probe = runtime.batch(runtime.objective.eval_features(worst_case_examples("mrpc", 3, 32)))
    with torch.no_grad():
        before = bank.model(**{k: v for k, v in probe.items() if k != "labels"}).logits
    sizes = {}
    for batch in (4, 8, 12):
        examples = worst_case_examples(config.data.task, batch, config.model.max_length)
        lengths = {len(f["input_ids"]) for f in runtime.objective.train_features(examples)}
        assert lengths == {config.model.max_length}  # the worst batch the config allows
        sizes[batch] = measure_footprint(runtime, 2, examples).activations
    # Linear in the batch: each 4 more examples add the same bytes (plus a constant part).
    assert sizes[12] - sizes[8] == pytest.approx(sizes[8] - sizes[4], rel=1e-3)
    assert sizes[8] - sizes[4] > 0.9 * sizes[4]
    half_config, half = _stack(tiny_bert_dir, glue_dir, tmp_path, **{"model.max_length": 32})
    assert footprint_fn(half.runtime, half_config)(2).activations < 0.55 * sizes[8]
    assert bank.active_rank == 4 and not bank.model.training
    assert [p.requires_grad for p in bank.model.parameters()] == flags
    with torch.no_grad():
        after = bank.model(**{k: v for k, v in probe.items() if k != "labels"}).logits
    assert torch.equal(before, after)


def test_activation_checkpointing_keeps_far_fewer_activations(
    glue_dir: Path, tmp_path: Path
) -> None:
    model_dir = save_tiny_causal_model(tmp_path / "tiny-causal")
    causal = {"model.task_type": '"causal-lm"', "model.max_length": 48}
    plain_config, plain = _stack(model_dir, glue_dir, tmp_path, **causal)
    ckpt_config, ckpt = _stack(
        model_dir, glue_dir, tmp_path, **causal, **{"train.gradient_checkpointing": "true"}
    )
    full = footprint_fn(plain.runtime, plain_config)(2)
    checkpointed = footprint_fn(ckpt.runtime, ckpt_config)(2)
    assert checkpointed.base_weights == full.base_weights
    assert checkpointed.activations < 0.6 * full.activations
    free_config, free = _stack(
        model_dir,
        glue_dir,
        tmp_path,
        **causal,
        **{
            "data.task": '"instructions"',
            "data.train_file": '"x.jsonl"',
            "data.eval_file": '"y.jsonl"',
        },
    )
    answer = footprint_fn(free.runtime, free_config)(2)  # half of the tokens are the answer
    assert answer.base_weights == full.base_weights and answer.activations > full.activations


def test_the_memory_rule_gives_the_largest_rank_that_fits(
    tiny_bert_dir: Path, glue_dir: Path, tmp_path: Path
) -> None:
    config, stack = _stack(tiny_bert_dir, glue_dir, tmp_path)
    fp = footprint_fn(stack.runtime, config)
    mib = [fp(2).total / 2**20, fp(4).total / 2**20]
    budgets = (mib[0] + 1e-3, mib[1] + 1e-3, mib[1] - 1e-3)
    memory = replace(config, federation={"rank_rule": "memory", "memory_budgets_mb": budgets})
    assert [c.rank for c in build_federation(memory).clients] == [2, 4, 2]
    short = replace(memory, federation={"memory_budgets_mb": (mib[0] - 1e-3,)})
    with pytest.raises(
        ConfigError, match=r"client 0 has .* MiB, the smallest rank 2 needs .* = base"
    ):
        build_federation(short)
