"""Tests of hlora.adapters.LoraBank on tiny BERT and Llama backbones."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from peft.tuners.tuners_utils import BaseTunerLayer

from hlora.adapters import LayerShape, LoraBank
from hlora.aggregation import LowRankDelta
from hlora.errors import ModelError
from hlora.models import Backbone
from tiny_models import build_tiny_backbone, build_tiny_llama_backbone

RANKS = (2, 4, 8)
SCALING = 1.5
TEXTS = [
    "the movie was great fun",
    "a boring film , i hated the plot",
    "not bad at all",
]
EXPECTED_LAYERS = (
    "bert.encoder.layer.0.attention.self.query",
    "bert.encoder.layer.0.attention.self.value",
    "bert.encoder.layer.1.attention.self.query",
    "bert.encoder.layer.1.attention.self.value",
)

Factors = dict[str, tuple[torch.Tensor, torch.Tensor]]


@pytest.fixture
def backbone() -> Backbone:
    return build_tiny_backbone()


@pytest.fixture
def bank(backbone: Backbone) -> LoraBank:
    return LoraBank(backbone, RANKS, scaling=SCALING)


def batch(backbone: Backbone) -> dict[str, torch.Tensor]:
    encoded = backbone.tokenizer(TEXTS, padding=True, return_tensors="pt")
    return {"input_ids": encoded["input_ids"], "attention_mask": encoded["attention_mask"]}


def random_factors(bank: LoraBank, rank: int, seed: int) -> Factors:
    generator = torch.Generator().manual_seed(seed)
    return {
        name: (
            torch.randn(rank, shape.in_features, generator=generator) * 0.3,
            torch.randn(shape.out_features, rank, generator=generator) * 0.3,
        )
        for name, shape in bank.layer_shapes().items()
    }


def random_extras(bank: LoraBank, seed: int) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return {
        name: torch.randn(value.shape, generator=generator)
        for name, value in bank.get_extras(bank.ranks[0]).items()
    }


def dense_deltas(factors: Factors, scaling: float) -> dict[str, torch.Tensor]:
    return {name: scaling * b @ a for name, (a, b) in factors.items()}


@torch.no_grad()
def adapter_logits(bank: LoraBank, rank: int, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    bank.activate(rank)
    bank.model.eval()
    return bank.model(**inputs).logits


def assert_close(actual: torch.Tensor, expected: torch.Tensor) -> None:
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------- structure


def test_layer_names_shapes_and_extras(bank: LoraBank) -> None:
    assert bank.ranks == RANKS
    assert bank.scaling == SCALING
    assert bank.layer_names() == EXPECTED_LAYERS
    assert bank.layer_shapes() == dict.fromkeys(EXPECTED_LAYERS, LayerShape(32, 32))
    assert bank.extra_names() == ("classifier.weight", "classifier.bias")
    assert bank.get_extras(4)["classifier.weight"].shape == (2, 32)


def test_duplicate_and_unsorted_ranks_are_merged(backbone: Backbone) -> None:
    bank = LoraBank(backbone, [8, 2, 8, 4, 2], scaling=1.0)
    assert bank.ranks == (2, 4, 8)


def test_peft_alpha_is_scaling_times_rank(bank: LoraBank) -> None:
    for rank in RANKS:
        config = bank.model.peft_config[f"r{rank}"]
        assert config.r == rank
        assert config.lora_alpha == pytest.approx(SCALING * rank)
        layer = bank.model.get_base_model().get_submodule(EXPECTED_LAYERS[0])
        assert layer.scaling[f"r{rank}"] == pytest.approx(SCALING)


def test_one_base_model_in_memory(backbone: Backbone) -> None:
    base_count = sum(p.numel() for p in build_tiny_backbone().model.parameters())
    head_count = 2 * 32 + 2
    bank = LoraBank(backbone, RANKS, scaling=SCALING)
    assert bank.model.get_base_model() is backbone.model  # wrapped in place, not copied
    storages = {}
    for param in bank.model.parameters():
        storages[param.untyped_storage().data_ptr()] = param.numel()
    lora_count = sum(4 * (rank * 32 + 32 * rank) for rank in RANKS)
    # The base counted once, plus per rank its factors and its copy of the head.
    assert sum(storages.values()) == base_count + lora_count + len(RANKS) * head_count


# ----------------------------------------------------------------------------- factors


def test_set_get_round_trip_returns_fp32_clones(bank: LoraBank) -> None:
    for rank in RANKS:
        factors = random_factors(bank, rank, seed=rank)
        bank.set_factors(rank, factors)
        got = bank.get_factors(rank)
        assert set(got) == set(EXPECTED_LAYERS)
        for name, (a, b) in got.items():
            assert a.dtype == b.dtype == torch.float32
            assert torch.equal(a, factors[name][0])
            assert torch.equal(b, factors[name][1])
            assert not a.requires_grad
        got[EXPECTED_LAYERS[0]][0].zero_()  # a clone: the model must not change
        assert torch.equal(
            bank.get_factors(rank)[EXPECTED_LAYERS[0]][0], factors[EXPECTED_LAYERS[0]][0]
        )


def test_extras_round_trip(bank: LoraBank) -> None:
    extras = random_extras(bank, seed=3)
    bank.set_extras(4, extras)
    got = bank.get_extras(4)
    for name, value in extras.items():
        assert torch.equal(got[name], value)
    assert not torch.equal(bank.get_extras(2)["classifier.weight"], extras["classifier.weight"])


@pytest.mark.parametrize("rank", RANKS)
def test_lora_layer_output_honours_scaling(bank: LoraBank, backbone: Backbone, rank: int) -> None:
    factors = random_factors(bank, rank, seed=10 + rank)
    bank.set_factors(rank, factors)
    bank.activate(rank)
    name = EXPECTED_LAYERS[1]
    layer = bank.model.get_base_model().get_submodule(name)
    captured: dict[str, torch.Tensor] = {}

    def hook(module: torch.nn.Module, args: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
        captured["x"], captured["y"] = args[0], output

    handle = layer.register_forward_hook(hook)
    try:
        with torch.no_grad():
            bank.model(**batch(backbone))
    finally:
        handle.remove()
    a, b = factors[name]
    weight = bank.base_weight(name)
    bias = layer.get_base_layer().bias
    expected = captured["x"] @ (weight + SCALING * b @ a).T + bias
    assert_close(captured["y"], expected)


@pytest.mark.parametrize("rank", RANKS)
def test_adapter_logits_equal_dense_model(bank: LoraBank, rank: int) -> None:
    factors = random_factors(bank, rank, seed=20 + rank)
    extras = random_extras(bank, seed=rank)
    bank.set_factors(rank, factors)
    bank.set_extras(rank, extras)
    # An independent, plain model carrying W + s * B @ A and the head.
    plain = build_tiny_backbone()
    with torch.no_grad():
        for name, delta in dense_deltas(factors, SCALING).items():
            plain.model.get_submodule(name).weight += delta
        for name, value in extras.items():
            plain.model.get_parameter(name).copy_(value)
        expected = plain.model(**batch(plain)).logits
    assert_close(adapter_logits(bank, rank, batch(plain)), expected)


def test_ranks_do_not_affect_each_other(bank: LoraBank, backbone: Backbone) -> None:
    inputs = batch(backbone)
    for rank in RANKS:
        bank.set_factors(rank, random_factors(bank, rank, seed=30 + rank))
    before = {rank: adapter_logits(bank, rank, inputs) for rank in RANKS}
    saved = {rank: bank.get_factors(rank) for rank in RANKS}
    # A rank-4 client trains one step.
    bank.activate(4)
    bank.model.train()
    optimizer = torch.optim.SGD(bank.trainable_parameters(4), lr=0.5)
    loss = bank.model(**inputs, labels=torch.tensor([0, 1, 1])).loss
    loss.backward()
    optimizer.step()
    assert not torch.equal(adapter_logits(bank, 4, inputs), before[4])
    for rank in (2, 8):
        assert torch.equal(adapter_logits(bank, rank, inputs), before[rank])
        for name, (a, b) in bank.get_factors(rank).items():
            assert torch.equal(a, saved[rank][name][0])
            assert torch.equal(b, saved[rank][name][1])
    # Swapping another client's factors into the rank-2 slot leaves rank 8 alone.
    bank.set_factors(2, random_factors(bank, 2, seed=99))
    assert torch.equal(adapter_logits(bank, 8, inputs), before[8])


def test_activate_makes_only_that_adapter_trainable(bank: LoraBank, backbone: Backbone) -> None:
    for rank in RANKS:
        bank.activate(rank)
        assert bank.model.active_adapter == f"r{rank}"
        trainable = {id(p) for p in bank.trainable_parameters(rank)}
        assert len(trainable) == 2 * len(EXPECTED_LAYERS) + 2
        requiring = {id(p) for p in bank.model.parameters() if p.requires_grad}
        assert requiring == trainable
    bank.activate(4)
    bank.set_factors(4, random_factors(bank, 4, seed=1))
    bank.model(**batch(backbone), labels=torch.tensor([0, 1, 0])).loss.backward()
    with_grad = {id(p) for p in bank.model.parameters() if p.grad is not None}
    assert with_grad == {id(p) for p in bank.trainable_parameters(4)}


def test_init_factors_is_deterministic_and_not_written(bank: LoraBank) -> None:
    before = bank.get_factors(8)
    first = bank.init_factors(8, seed=5)
    again = bank.init_factors(8, seed=5)
    other = bank.init_factors(8, seed=6)
    assert set(first) == set(EXPECTED_LAYERS)
    for name, (a, b) in first.items():
        assert a.shape == (8, 32) and b.shape == (32, 8)
        assert a.dtype == b.dtype == torch.float32
        assert torch.count_nonzero(b) == 0
        assert torch.equal(a, again[name][0])
        assert not torch.equal(a, other[name][0])
        # Kaiming-uniform with a = sqrt(5): bound 1 / sqrt(fan_in).
        assert a.abs().max() <= 1 / math.sqrt(32)
        assert a.std() > 0.5 / math.sqrt(3 * 32)
    for name, (a, b) in bank.get_factors(8).items():
        assert torch.equal(a, before[name][0]) and torch.equal(b, before[name][1])


# ----------------------------------------------------------------------------- dense views


def snapshot(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {key: value.detach().clone() for key, value in module.state_dict().items()}


def assert_same_state(module: torch.nn.Module, saved: dict[str, torch.Tensor]) -> None:
    state = module.state_dict()
    assert set(state) == set(saved)
    for key, value in saved.items():
        assert torch.equal(state[key], value), key


def _adapter_reference(
    bank: LoraBank, rank: int, inputs: dict[str, torch.Tensor], seed: int
) -> tuple[Factors, dict[str, torch.Tensor], torch.Tensor, dict[str, torch.Tensor]]:
    """Random factors and head loaded at ``rank``, the adapter's logits on ``inputs``; then
    rank 2 active in train mode, and a snapshot of the model in that state."""
    factors = random_factors(bank, rank, seed=seed)
    extras = random_extras(bank, seed=seed + 1)
    bank.set_factors(rank, factors)
    bank.set_extras(rank, extras)
    expected = adapter_logits(bank, rank, inputs)
    bank.activate(2)
    bank.model.train()
    return factors, extras, expected, snapshot(bank.model)


@pytest.mark.parametrize("rank", RANKS)
def test_evaluating_dense_matches_adapter_and_restores(
    bank: LoraBank, backbone: Backbone, rank: int
) -> None:
    inputs = batch(backbone)
    factors, extras, expected, saved = _adapter_reference(bank, rank, inputs, seed=40 + rank)
    requiring = [p.requires_grad for p in bank.model.parameters()]
    with bank.evaluating_dense(dense_deltas(factors, SCALING), extras) as dense:
        assert not dense.training
        with torch.no_grad():
            logits = dense(**inputs).logits
    assert_close(logits, expected)
    assert_same_state(bank.model, saved)
    assert bank.model.training
    assert all(module.training for module in bank.model.modules())
    assert bank.model.active_adapter == "r2"
    assert [p.requires_grad for p in bank.model.parameters()] == requiring


@pytest.mark.parametrize("rank", RANKS)
def test_evaluating_factored_matches_the_dense_merge_and_leaves_nothing_behind(
    bank: LoraBank, backbone: Backbone, rank: int
) -> None:
    """The update applied as ``x @ right.T @ left.T`` beside the untouched base weights gives
    the adapter's (and the dense merge's) logits; afterwards no hook, weight, head, mode or
    adapter is changed, also when the block raises. Every evaluation goes this way on a 4-bit
    base (``LoraBank.evaluating``), where a dense merge is impossible."""
    inputs = batch(backbone)
    factors, extras, expected, saved = _adapter_reference(bank, rank, inputs, seed=50 + rank)
    deltas = {n: LowRankDelta(left=b, right=a, scale=SCALING) for n, (a, b) in factors.items()}
    with bank.evaluating_factored(deltas, extras) as model:
        assert not model.training
        with torch.no_grad():
            logits = model(**inputs).logits
    assert_close(logits, expected)
    with bank.evaluating_dense(dense_deltas(factors, SCALING), extras) as dense, torch.no_grad():
        assert_close(logits, dense(**inputs).logits)
    assert_same_state(bank.model, saved)
    assert bank.model.training and bank.model.active_adapter == "r2"
    assert not any(m._forward_hooks for m in bank.model.modules())
    # A full-precision base is merged densely: bit for bit what evaluating_dense gives.
    assert not bank.quantized
    with bank.evaluating(deltas, extras) as model, torch.no_grad():
        merged = model(**inputs).logits
    exact = {n: d.dense() for n, d in deltas.items()}
    with bank.evaluating_dense(exact, extras) as dense, torch.no_grad():
        assert torch.equal(merged, dense(**inputs).logits)
    with pytest.raises(RuntimeError, match="boom"), bank.evaluating_factored(deltas, extras):
        raise RuntimeError("boom")
    assert_same_state(bank.model, saved)
    assert not any(m._forward_hooks for m in bank.model.modules())


def test_evaluating_factored_refuses_updates_of_the_wrong_shape(bank: LoraBank) -> None:
    name, shape = next(iter(bank.layer_shapes().items()))
    extras = random_extras(bank, seed=1)
    wrong = {
        name: LowRankDelta(torch.ones(shape.out_features, 2), torch.ones(3, shape.in_features))
    }
    transposed = {
        name: LowRankDelta(torch.ones(shape.in_features + 1, 2), torch.ones(2, shape.out_features))
    }
    for bad, message in [
        (wrong, "inner sizes 2 and 3"),
        (transposed, f"layer '{name}'"),
        ({"no.such": wrong[name]}, r"no\.such"),
    ]:
        with pytest.raises(ModelError, match=message), bank.evaluating_factored(bad, extras):
            pass
    assert not any(m._forward_hooks for m in bank.model.modules())


def test_evaluating_dense_restores_after_an_exception(bank: LoraBank, backbone: Backbone) -> None:
    saved = snapshot(bank.model)
    deltas = dense_deltas(random_factors(bank, 4, seed=1), SCALING)
    with (
        pytest.raises(RuntimeError, match="boom"),
        bank.evaluating_dense(deltas, random_extras(bank, seed=2)),
    ):
        raise RuntimeError("boom")
    assert_same_state(bank.model, saved)
    # And the adapters are enabled again.
    bank.set_factors(4, random_factors(bank, 4, seed=3))
    with torch.no_grad():
        with_adapter = adapter_logits(bank, 4, batch(backbone))
        with bank.model.disable_adapter():
            without = bank.model(**batch(backbone)).logits
    assert not torch.allclose(with_adapter, without)


def test_evaluating_dense_with_no_delta_is_the_base_model(backbone: Backbone) -> None:
    plain = build_tiny_backbone()
    bank = LoraBank(backbone, RANKS, scaling=SCALING)
    extras = {name: plain.model.get_parameter(name).detach().clone() for name in bank.extra_names()}
    with torch.no_grad(), bank.evaluating_dense({}, extras) as dense:
        logits = dense(**batch(backbone)).logits
    with torch.no_grad():
        assert torch.equal(logits, plain.model(**batch(plain)).logits)


def test_add_to_base(bank: LoraBank, backbone: Backbone) -> None:
    inputs = batch(backbone)
    factors = random_factors(bank, 4, seed=50)
    deltas = dense_deltas(factors, SCALING)
    extras = bank.get_extras(4)
    with torch.no_grad(), bank.evaluating_dense(deltas, extras) as dense:
        expected = dense(**inputs).logits
    original = {name: bank.base_weight(name).clone() for name in bank.layer_names()}
    bank.add_to_base(deltas)
    for name in bank.layer_names():
        assert torch.equal(bank.base_weight(name), original[name] + deltas[name])
    # Zero adapters on the new base give the merged model's outputs, for every rank.
    for rank in RANKS:
        bank.set_factors(rank, bank.init_factors(rank, seed=0))
        bank.set_extras(rank, extras)
        assert_close(adapter_logits(bank, rank, inputs), expected)
    bank.add_to_base({EXPECTED_LAYERS[0]: torch.ones(32, 32)})  # a subset of layers is fine
    assert torch.equal(
        bank.base_weight(EXPECTED_LAYERS[0]),
        original[EXPECTED_LAYERS[0]] + deltas[EXPECTED_LAYERS[0]] + 1,
    )


# ----------------------------------------------------------------------------- export


@pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing:FutureWarning")
@pytest.mark.parametrize("rank", [2, 8])
def test_export_peft_loads_on_a_fresh_base(bank: LoraBank, tmp_path: Path, rank: int) -> None:
    factors = random_factors(bank, rank, seed=60 + rank)
    extras = random_extras(bank, seed=61)
    slot_before = bank.get_factors(rank)
    out = bank.export_peft(rank, factors, extras, tmp_path / "adapter")
    assert out == tmp_path / "adapter"
    assert sorted(p.name for p in out.iterdir()) == [
        "adapter_config.json",
        "adapter_model.safetensors",
    ]
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["r"] == rank
    assert config["lora_alpha"] == pytest.approx(SCALING * rank)
    assert config["task_type"] == "SEQ_CLS"
    # The bank's slot is untouched by the export.
    for name, (a, _) in bank.get_factors(rank).items():
        assert torch.equal(a, slot_before[name][0])

    fresh = build_tiny_backbone()
    loaded = PeftModel.from_pretrained(fresh.model, str(out))
    loaded.eval()
    bank.set_factors(rank, factors)
    bank.set_extras(rank, extras)
    inputs = batch(fresh)
    with torch.no_grad():
        expected = adapter_logits(bank, rank, inputs)
        assert torch.equal(loaded(**inputs).logits, expected)


@pytest.mark.parametrize("rank", [2, 8])
def test_merged_model_matches_adapter(bank: LoraBank, tmp_path: Path, rank: int) -> None:
    factors = random_factors(bank, rank, seed=70 + rank)
    extras = random_extras(bank, seed=71)
    bank.set_factors(rank, factors)
    bank.set_extras(rank, extras)
    saved = snapshot(bank.model)
    merged = bank.merged_model(dense_deltas(factors, SCALING), extras)
    assert_same_state(bank.model, saved)
    assert not any(isinstance(m, BaseTunerLayer) for m in merged.modules())
    assert set(merged.state_dict()) == set(build_tiny_backbone().model.state_dict())
    plain = build_tiny_backbone()
    inputs = batch(plain)
    expected = adapter_logits(bank, rank, inputs)
    with torch.no_grad():
        assert_close(merged(**inputs).logits, expected)
    merged.save_pretrained(tmp_path / "merged")
    reloaded = type(merged).from_pretrained(tmp_path / "merged")
    with torch.no_grad():
        assert torch.equal(reloaded(**inputs).logits, merged(**inputs).logits)


# ----------------------------------------------------------------------------- decoder


def test_decoder_bank_matches_dense_and_respects_gqa_shapes() -> None:
    backbone = build_tiny_llama_backbone()
    bank = LoraBank(backbone, [2, 16], scaling=0.5)
    assert bank.layer_names() == (
        "model.layers.0.self_attn.q_proj",
        "model.layers.0.self_attn.v_proj",
        "model.layers.1.self_attn.q_proj",
        "model.layers.1.self_attn.v_proj",
    )
    assert bank.layer_shapes()["model.layers.0.self_attn.v_proj"] == LayerShape(16, 32)
    assert bank.extra_names() == ("score.weight",)
    inputs = batch(backbone)
    assert (inputs["attention_mask"] == 0).any()  # padded batch (pad = eos)
    for rank in bank.ranks:
        factors = random_factors(bank, rank, seed=rank)
        extras = random_extras(bank, seed=rank)
        bank.set_factors(rank, factors)
        bank.set_extras(rank, extras)
        expected = adapter_logits(bank, rank, inputs)
        with torch.no_grad(), bank.evaluating_dense(dense_deltas(factors, 0.5), extras) as dense:
            assert_close(dense(**inputs).logits, expected)


# ----------------------------------------------------------------------------- bad inputs


@pytest.mark.parametrize("ranks", [[0], [4, -1]])
def test_rank_below_one_is_rejected(backbone: Backbone, ranks: list[int]) -> None:
    with pytest.raises(
        ModelError, match=r"LoRA rank -?\d+ is invalid: ranks must be integers >= 1"
    ):
        LoraBank(backbone, ranks, scaling=1.0)


def test_no_rank_is_rejected(backbone: Backbone) -> None:
    with pytest.raises(ModelError, match="at least one LoRA rank"):
        LoraBank(backbone, [], scaling=1.0)


def test_rank_too_large_for_a_layer(backbone: Backbone) -> None:
    with pytest.raises(
        ModelError, match=r"LoRA rank 33 is too large for layer 'bert\.encoder.*= 32"
    ):
        LoraBank(backbone, [4, 33], scaling=1.0)
    llama = build_tiny_llama_backbone()
    with pytest.raises(ModelError, match=r"rank 17 is too large for layer '.*v_proj'.*16x32.* 16"):
        LoraBank(llama, [17], scaling=1.0)


def test_unknown_target_module_lists_available_layers(backbone: Backbone) -> None:
    with pytest.raises(
        ModelError, match=r"'q_proj' matches no layer of model 'tiny-bert'.*'query'"
    ):
        LoraBank(backbone, [2], scaling=1.0, target_modules=["query", "q_proj"])


def test_non_linear_target_is_rejected(backbone: Backbone) -> None:
    with pytest.raises(ModelError, match=r"word_embeddings' .*Embedding; only torch\.nn\.Linear"):
        LoraBank(backbone, [2], scaling=1.0, target_modules=["word_embeddings"])


@pytest.mark.parametrize("scaling", [0.0, -1.0, float("nan")])
def test_bad_scaling_is_rejected(backbone: Backbone, scaling: float) -> None:
    with pytest.raises(ModelError, match="scaling must be a finite number > 0"):
        LoraBank(backbone, [2], scaling=scaling)


def test_missing_default_targets_ask_for_target_modules(backbone: Backbone) -> None:
    backbone.default_target_modules = ()
    with pytest.raises(ModelError, match=r"pass target_modules.*'query'"):
        LoraBank(backbone, [2], scaling=1.0)
    bank = LoraBank(backbone, [2], scaling=1.0, target_modules=["attention.output.dense"])
    assert len(bank.layer_names()) == 2


def test_backbone_can_carry_only_one_bank(backbone: Backbone) -> None:
    LoraBank(backbone, [2], scaling=1.0)
    with pytest.raises(ModelError, match="already carries peft adapters"):
        LoraBank(backbone, [4], scaling=1.0)


def test_set_factors_wrong_shape(bank: LoraBank) -> None:
    factors = random_factors(bank, 4, seed=0)
    name = EXPECTED_LAYERS[2]
    factors[name] = (factors[name][0], torch.zeros(32, 8))
    with pytest.raises(
        ModelError,
        match=rf"factors of rank 4: layer '{name}' needs A of shape \(4, 32\) and B of shape "
        r"\(32, 4\), got A \(4, 32\) and B \(32, 8\)",
    ):
        bank.set_factors(4, factors)


def test_set_factors_missing_or_unknown_layer(bank: LoraBank) -> None:
    factors = random_factors(bank, 4, seed=0)
    del factors[EXPECTED_LAYERS[3]]
    with pytest.raises(ModelError, match=rf"missing layer\(s\) '{EXPECTED_LAYERS[3]}'"):
        bank.set_factors(4, factors)
    factors = random_factors(bank, 4, seed=0)
    factors["bert.encoder.layer.9.attention.self.query"] = factors[EXPECTED_LAYERS[0]]
    with pytest.raises(ModelError, match=r"unknown layer\(s\) 'bert\.encoder\.layer\.9"):
        bank.set_factors(4, factors)


def test_unknown_rank_is_rejected(bank: LoraBank) -> None:
    with pytest.raises(
        ModelError, match=r"rank 16 has no adapter in this LoraBank; its ranks are \[2, 4, 8\]"
    ):
        bank.get_factors(16)
    with pytest.raises(ModelError, match="rank 3 has no adapter"):
        bank.activate(3)


def test_bad_extras_and_deltas(bank: LoraBank) -> None:
    with pytest.raises(ModelError, match=r"missing 'classifier\.bias'"):
        bank.set_extras(2, {"classifier.weight": torch.zeros(2, 32)})
    with pytest.raises(
        ModelError, match=r"'classifier\.weight' needs shape \(2, 32\), got \(3, 32\)"
    ):
        bank.set_extras(
            2, {"classifier.weight": torch.zeros(3, 32), "classifier.bias": torch.zeros(2)}
        )
    with pytest.raises(
        ModelError, match=r"add_to_base: layer '.*query' needs a delta of shape \(32, 32\)"
    ):
        bank.add_to_base({EXPECTED_LAYERS[0]: torch.zeros(32, 31)})
    saved = snapshot(bank.model)
    with (
        pytest.raises(ModelError, match="evaluating_dense: unknown layer"),
        bank.evaluating_dense({"nope": torch.zeros(1)}, bank.get_extras(2)),
    ):
        pass
    assert_same_state(bank.model, saved)


def test_lora_dropout_is_applied_in_training_mode(backbone: Backbone) -> None:
    bank = LoraBank(backbone, [4], scaling=1.0, dropout=0.5)
    assert bank.model.peft_config["r4"].lora_dropout == 0.5
    with pytest.raises(ModelError, match=r"dropout must be in \[0, 1\)"):
        LoraBank(build_tiny_backbone(), [4], scaling=1.0, dropout=1.0)
