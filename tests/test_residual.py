"""``server.residual = "frozen"``: the components of the global update beyond a client's rank
go into its frozen base, so every client trains at the whole global model."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch.testing import assert_close

from hlora.aggregation import ClientUpdate, GlobalUpdate, LowRankDelta
from hlora.checkpoint import load_state
from hlora.config import RunConfig, load_config
from hlora.engines.inprocess import InProcessTransport
from hlora.federation import build_federation, headline_of, make_loop, run
from hlora.protocol import RoundResult, TrainInstruction, TrainReply
from hlora.report import RoundProgress
from hlora.server import beyond_rank, residual_version
from tiny_models import tiny_overrides


def _update(rank: int, seed: int = 0) -> GlobalUpdate:
    gen = torch.Generator().manual_seed(seed)
    layers = {
        name: LowRankDelta(
            left=torch.randn(6, rank, generator=gen, dtype=torch.float64),
            right=torch.randn(rank, 5, generator=gen, dtype=torch.float64),
            scale=0.5,
        )
        for name in ("q", "v")
    }
    return GlobalUpdate("hlora", layers, {})


@pytest.mark.parametrize("rank", [1, 2, 3])
def test_a_truncation_plus_what_lies_beyond_it_is_the_whole_update(rank: int) -> None:
    update = _update(4)
    rest = beyond_rank(update, rank)
    assert rest is not None
    for name, whole in update.layers.items():
        held = update.client_factors(rank, 2.0)[name].delta(2.0)
        assert rest[name].rank == 4 - rank
        assert_close(held + rest[name].dense(), whole.dense())
    assert beyond_rank(update, 4) is None  # a client of the update's rank holds all of it


class Recording:
    """The in-process transport, keeping every instruction it delivers."""

    def __init__(self, inner: InProcessTransport) -> None:
        self.inner = inner
        self.sent: list[TrainInstruction] = []

    def run_round(self, instructions: Sequence[TrainInstruction]) -> RoundResult:
        self.sent.extend(instructions)
        return self.inner.run_round(instructions)


@pytest.mark.slow
def test_frozen_residual_clients_train_and_evaluate_at_the_whole_global_model(
    tiny_bert_dir: Path, glue_dir: Path, tmp_path: Path
) -> None:
    overrides = tiny_overrides(
        tiny_bert_dir,
        glue_dir,
        tmp_path,
        **{
            "federation.ranks": "[2, 4]",
            "federation.rounds": 2,
            "server.optimizer": '"sgd"',
            "server.residual": '"frozen"',
        },
    )
    federation = build_federation(load_config(None, tuple(overrides)))
    runtime = federation.runtime
    transport = Recording(
        InProcessTransport(runtime, federation.train_features, lambda *a: None, batch_size=8)
    )
    with RoundProgress(2, enabled=False) as bar:
        loop = make_loop(federation, tmp_path, bar, transport)  # type: ignore[arg-type]
        first = loop.run_round(loop.initial_state(), 1)[0]
    assert first.global_update is not None
    second = [loop.instruction(first, slot.client_id, 2) for slot in federation.clients]
    tags = set()
    for instruction in second:  # round 2: each client's truncation plus its frozen rest
        assert instruction.factors is not None and instruction.base_delta is not None
        tags.add(instruction.base_version)
        for name, whole in first.global_update.layers.items():
            held = instruction.factors[name].delta(instruction.scaling)
            rest = instruction.base_delta[name].dense()
            assert_close(held + rest, whole.dense(), rtol=1e-5, atol=1e-6)
    # one tag per rank and round: a client never reuses another rank's (or an older) residual
    assert tags == {residual_version(2, 2), residual_version(2, 4)}
    assert all(i.base_delta is None for i in transport.sent)  # round 1 has nothing beyond

    # the model a rank-2 client trains: its factors on top of the base plus its rest (a
    # random rank-4 update large enough to move the tiny model's loss)
    gen = torch.Generator().manual_seed(0)
    update = GlobalUpdate(
        "hlora",
        {
            name: LowRankDelta(
                left=10 * torch.randn(d.left.shape[0], 4, generator=gen),
                right=torch.randn(4, d.right.shape[1], generator=gen),
                scale=d.scale,
            )
            for name, d in first.global_update.layers.items()
        },
        first.extras,
    )
    rest = beyond_rank(update, 2)
    truncation = {
        name: LowRankDelta(left=d.left[:, :2], right=d.right[:2], scale=d.scale)
        for name, d in update.layers.items()
    }
    dev, names, batch = federation.dev_features, ("accuracy",), 8
    whole = runtime.evaluate(update.layers, update.extras, dev, names, batch)
    frozen = runtime.evaluate(
        truncation, update.extras, dev, names, batch, base_version=-7, base_delta=rest
    )
    dropped = runtime.evaluate(truncation, update.extras, dev, names, batch)
    assert frozen == pytest.approx(whole, rel=1e-6)
    assert dropped["loss"] != pytest.approx(whole["loss"], rel=1e-4)  # 3e-3 apart here


def test_the_summary_says_every_client_holds_the_global_model(
    tiny_bert_dir: Path, glue_dir: Path, tmp_path: Path
) -> None:
    def config(**extra: object) -> RunConfig:
        return load_config(None, tuple(tiny_overrides(tiny_bert_dir, glue_dir, tmp_path, **extra)))

    dropped = headline_of(config())
    frozen = headline_of(config(**{"server.optimizer": '"sgd"', "server.residual": '"frozen"'}))
    assert "every client holds" not in dropped and "truncation of it" in dropped
    assert "every client holds" in frozen and "would hold under server.residual = 'drop'" in frozen


@pytest.mark.slow
def test_a_frozen_residual_run_exports_one_adapter_holding_the_whole_update(
    tiny_bert_dir: Path, glue_dir: Path, tmp_path: Path
) -> None:
    """Every client holds the whole global model, so the run writes one adapter, at the
    largest rank, and with server factors of that rank it is the whole update exactly."""
    overrides = tiny_overrides(
        tiny_bert_dir,
        glue_dir,
        tmp_path,
        **{
            "server.optimizer": '"adam"',
            "server.learning_rate": 0.05,
            "server.hlora_space": '"factor-steps"',
            "server.residual": '"frozen"',
        },
    )
    config = load_config(None, tuple(overrides))
    result = run(config, progress=False)
    assert [p.name for p in (result.run_dir / "adapters").glob("r*")] == ["r4"]
    adapter = load_file(result.run_dir / "adapters" / "r4" / "adapter_model.safetensors")
    scaling = config.model.lora_scaling
    whole = load_state(result.run_dir / "checkpoint.safetensors").whole_update()
    assert len(whole) == 4
    for name, delta in whole.items():
        a = adapter[f"base_model.model.{name}.lora_A.weight"]
        b = adapter[f"base_model.model.{name}.lora_B.weight"]
        assert_close(scaling * b @ a, delta.dense(), rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("offset", [0, 1, 3, 4, 6])
def test_a_rolled_update_leads_with_the_component_at_its_offset(offset: int) -> None:
    whole = _update(4).layers["q"]
    whole = LowRankDelta(whole.left, whole.right, whole.scale, torch.arange(4.0, 0.0, -1.0))
    rolled = whole.rolled(offset)
    assert_close(rolled.dense(), whole.dense())
    for j in range(4):
        k = (offset + j) % 4
        assert torch.equal(rolled.left[:, j], whole.left[:, k])
        assert torch.equal(rolled.right[j], whole.right[k])
    assert rolled.singular_values is None or offset % 4 == 0  # no longer sorted
    held = rolled.leading(2, 2.0).delta(2.0)  # components offset, offset + 1 (mod 4)
    idx = [offset % 4, (offset + 1) % 4]
    assert_close(held, whole.scale * whole.left[:, idx] @ whole.right[idx])


class Echo:
    """Round 1 trained in process; afterwards every client sends back what it was sent, so a
    server step that reads the clients' factors in their order finds no progress."""

    def __init__(self, inner: InProcessTransport, examples: dict[str, int]) -> None:
        self.inner = inner
        self.examples = examples
        self.sent: list[TrainInstruction] = []

    def run_round(self, instructions: Sequence[TrainInstruction]) -> RoundResult:
        self.sent.extend(instructions)
        if instructions[0].factors is None:
            return self.inner.run_round(instructions)
        replies = []
        for i in instructions:
            assert i.factors is not None
            n = self.examples[i.client_id]
            update = ClientUpdate(i.client_id, n, i.rank, i.scaling, i.factors, i.extras)
            replies.append(TrainReply(update, loss=0.5, steps=1, seconds=0.0))
        return RoundResult(replies)


@pytest.mark.slow
@pytest.mark.parametrize("space", ["delta", "server-factors", "factor-steps"])
@pytest.mark.parametrize("window", ["leading", "rolling"])
def test_a_rolling_window_trains_every_component_in_turn_and_the_server_reads_it_so(
    space: str, window: str, tiny_bert_dir: Path, glue_dir: Path, tmp_path: Path
) -> None:
    """Under ``server.window = "rolling"`` a client of rank 2 trains components ``t, t + 1``
    (mod 4) of round ``t``'s global update and holds the rest frozen; clients that send back
    what they were sent leave the global update where it was (the server's step reads their
    factors in the order they were given them; read in the leading order it would move)."""
    overrides = tiny_overrides(
        tiny_bert_dir,
        glue_dir,
        tmp_path,
        **{
            "federation.rounds": 6,
            "server.optimizer": '"sgd"',
            "server.global_rank": 4,
            "server.hlora_space": f'"{space}"',
            "server.residual": '"frozen"',
            "server.window": f'"{window}"',
        },
    )
    federation = build_federation(load_config(None, tuple(overrides)))
    inner = InProcessTransport(
        federation.runtime, federation.train_features, lambda *a: None, batch_size=8
    )
    transport = Echo(inner, {c.client_id: c.num_examples for c in federation.clients})
    with RoundProgress(6, enabled=False) as bar:
        loop = make_loop(federation, tmp_path, bar, transport)  # type: ignore[arg-type]
        state = loop.run_round(loop.initial_state(), 1)[0]
        first = state.global_update
        assert first is not None and all(d.rank == 4 for d in first.layers.values())
        for t in range(2, 7):
            state = loop.run_round(state, t)[0]
            assert state.global_update is not None
            for name, d in first.layers.items():
                assert_close(
                    state.global_update.layers[name].dense(), d.dense(), rtol=1e-5, atol=1e-7
                )
    rank2 = [i for i in transport.sent if i.rank == 2 and i.round_num > 1]
    assert len(rank2) == 5 * sum(c.rank == 2 for c in federation.clients)
    for instruction in rank2:
        t = instruction.round_num
        idx = [t % 4, (t + 1) % 4] if window == "rolling" else [0, 1]
        assert instruction.factors is not None and instruction.base_delta is not None
        for name, whole in first.layers.items():
            held = instruction.factors[name].delta(instruction.scaling)
            want = whole.scale * whole.left[:, idx] @ whole.right[idx]
            assert_close(held, want, rtol=1e-5, atol=1e-7)
            rest = instruction.base_delta[name].dense()
            assert_close(held + rest, whole.dense(), rtol=1e-5, atol=1e-7)
