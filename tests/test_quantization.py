"""A 4-bit frozen base (``model.quantization = "nf4"``, QLoRA): configuration, refusals and,
where bitsandbytes is installed, the 4-bit path itself on the CPU."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

from hlora import quantization
from hlora.adapters import LoraBank
from hlora.aggregation import LowRankDelta
from hlora.config import TrainConfig, fingerprint, load_config
from hlora.data.glue import Example, get_task
from hlora.errors import ConfigError, ModelError
from hlora.models import load_backbone
from hlora.objectives import make_objective
from hlora.protocol import TrainInstruction
from hlora.runtime import ModelRuntime
from hlora.stack import build_stack
from tiny_models import build_tiny_backbone, tiny_overrides

PAIRS_TEXTS = ["the cat sat on the mat", "a dog ran in the park", "not bad at all", "i liked it"]


def test_the_option_is_checked_with_the_rest_of_the_configuration() -> None:
    with pytest.raises(ConfigError, match=r"model\.quantization"):
        load_config(None, ('model.quantization="int3"',))
    with pytest.raises(ConfigError, match="strategy 'flora' merges"):
        load_config(
            None,
            ('model.quantization="nf4"', 'federation.strategy="flora"', 'train.device="cuda"'),
        )
    with pytest.raises(ConfigError, match="needs a CUDA GPU"):
        load_config(None, ('model.quantization="nf4"', 'train.device="cpu"'))
    plain = load_config()
    assert plain.model.quantization == "none"
    four_bit = load_config(None, ('model.quantization="nf4"', 'train.device="cuda"'))
    # "none" leaves the fingerprint of run folders written before the option; "nf4" changes it.
    assert fingerprint(four_bit) != fingerprint(plain)
    without = plain.to_dict()
    del without["model"]["quantization"]
    assert "quantization" not in repr(sorted(without.items()))


def test_a_4_bit_base_is_refused_off_a_cuda_gpu_and_without_bitsandbytes(
    monkeypatch: pytest.MonkeyPatch, tiny_bert_dir: Path, glue_dir: Path, tmp_path: Path
) -> None:
    quantization.check_supported("none", torch.device("cpu"))  # nothing to check
    with pytest.raises(ConfigError, match=r"needs a CUDA GPU.*device is cpu"):
        quantization.check_supported("nf4", torch.device("cpu"))
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *a: None if name == "bitsandbytes" else real(name, *a),
    )
    with pytest.raises(ConfigError, match="pip install bitsandbytes"):
        quantization.check_supported("nf4", torch.device("cuda"))
    if torch.cuda.is_available():
        return
    # On a machine without CUDA, train.device = "auto" resolves to the CPU: refused before
    # anything is loaded.
    config = load_config(
        None,
        (
            *tiny_overrides(tiny_bert_dir, glue_dir, tmp_path, **{"train.device": '"auto"'}),
            'model.quantization="nf4"',
        ),
    )
    with pytest.raises(ConfigError, match="needs a CUDA GPU"):
        build_stack(config, [2])


@pytest.fixture
def nf4_runtime(tmp_path: Path) -> ModelRuntime:
    """A tiny BERT 64 wide (bitsandbytes' CPU kernels take layers of at least one 64-value
    block a row) with a 4-bit base, on the CPU."""
    pytest.importorskip("bitsandbytes")
    tiny = build_tiny_backbone(hidden_size=64)
    tiny.model.save_pretrained(tmp_path / "tiny-bert-64")
    tiny.tokenizer.save_pretrained(tmp_path / "tiny-bert-64")
    backbone = load_backbone(
        str(tmp_path / "tiny-bert-64"), 2, quantization="nf4", device=torch.device("cpu")
    )
    bank = LoraBank(backbone, [2, 4], scaling=2.0)
    objective = make_objective(backbone, get_task("mrpc"), 32)
    train = TrainConfig(local_epochs=2, batch_size=2, learning_rate=0.05, precision="fp32")
    return ModelRuntime(bank, objective, train, torch.device("cpu"))


def test_a_4_bit_base_trains_adapters_and_is_evaluated_in_factored_form(
    nf4_runtime: ModelRuntime,
) -> None:
    """QLoRA on the tiny BERT: every adapted layer's base is 4-bit, the head is not; a client
    round trains full-precision factors; evaluation applies an update in factored form and
    gives what the adapter holding the same factors gives; a dense merge is refused."""
    runtime = nf4_runtime
    bank = runtime.bank
    assert bank.quantized
    for name in bank.layer_names():  # packed: two 4-bit values a byte
        shape = bank.layer_shapes()[name]
        weight = bank.base_weight(name)
        assert weight.dtype == torch.uint8
        assert weight.numel() * 2 == shape.out_features * shape.in_features
    head = bank.get_extras(2)
    assert head and all(t.dtype == torch.float32 for t in head.values())
    pairs = [
        Example(a, b, k % 2)
        for k, (a, b) in enumerate(zip(PAIRS_TEXTS, reversed(PAIRS_TEXTS), strict=True))
    ]
    features = runtime.objective.train_features(pairs)
    reply = runtime.train_client(
        TrainInstruction("c0", 1, 4, 2.0, None, head, init_seed=1, train_seed=2), features
    )
    assert reply.steps > 0 and reply.loss is not None and torch.isfinite(torch.tensor(reply.loss))
    factors = reply.update.factors
    assert all(
        f.A.dtype == torch.float32 and torch.count_nonzero(f.B) > 0 for f in factors.values()
    )

    deltas = {n: f.low_rank(2.0) for n, f in factors.items()}
    eval_features = runtime.objective.eval_features(pairs)
    trained = runtime.evaluation_counts(deltas, reply.update.extras, eval_features, 4)
    untouched = runtime.evaluation_counts({}, reply.update.extras, eval_features, 4)
    assert trained.loss_sum != untouched.loss_sum

    # The factored evaluation equals the adapter that holds the same factors.
    bank.set_factors(4, {n: (f.A, f.B) for n, f in factors.items()})
    bank.set_extras(4, reply.update.extras)
    batch = runtime.batch(eval_features)
    bank.activate(4)
    bank.model.eval()
    with torch.no_grad():
        adapter = bank.model(**{k: v for k, v in batch.items() if k != "labels"}).logits
        with bank.evaluating(deltas, reply.update.extras) as model:
            factored = model(**{k: v for k, v in batch.items() if k != "labels"}).logits
    torch.testing.assert_close(factored, adapter, rtol=1e-4, atol=1e-4)

    dense = {n: d.dense() for n, d in deltas.items()}
    refused = pytest.raises(ModelError, match="is 4-bit and cannot take a dense update")
    with refused, bank.evaluating_dense(dense, reply.update.extras):
        pass
    with pytest.raises(ModelError, match="is 4-bit"):
        bank.add_to_base(dense)
    assert isinstance(next(iter(deltas.values())), LowRankDelta)
