"""The head's calibration from the clients' feature moments (CCVR; ``server.head_calibration``)."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch

from hlora.adapters import LoraBank
from hlora.aggregation import LoraFactors
from hlora.calibration import (
    ClassMoments,
    calibrated_head,
    check_moments,
    fit_linear,
    pool,
    virtual_features,
)
from hlora.checkpoint import load_state
from hlora.config import TrainConfig, load_config
from hlora.data.glue import Example, get_task
from hlora.errors import ConfigError, ModelError
from hlora.federation import run
from hlora.objectives import make_objective
from hlora.runtime import ModelRuntime
from tiny_models import build_tiny_backbone, build_tiny_llama_backbone, tiny_overrides

PAIRS_TEXT = [
    ("the movie was great", "the film was great", 1),
    ("i liked the story", "the plot was awful", 0),
    ("good acting", "the acting was good", 1),
    ("boring scenes", "the music was brilliant", 0),
    ("you will love it", "they hated it", 0),
    ("a fun film", "a very fun movie", 1),
    ("the director is the best", "the best director", 1),
]


def _moments_of_union(
    features: torch.Tensor, labels: torch.Tensor, splits: list[int], classes: int
) -> list[ClassMoments]:
    parts = []
    for chunk_x, chunk_y in zip(features.split(splits), labels.split(splits), strict=True):
        parts.append(ClassMoments.of(chunk_x, chunk_y, classes))
    return parts


def test_pooled_moments_are_the_moments_of_the_union() -> None:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(60, 5, generator=gen, dtype=torch.float64) * 3 + 1
    # client 0 holds class 0 only, client 1 one example of class 2, client 2 the rest mixed
    y = torch.tensor([0] * 20 + [2] + [0, 1, 2] * 13)
    parts = _moments_of_union(x, y, [20, 1, 39], 3)
    assert parts[0].count.tolist() == [20.0, 0.0, 0.0]
    assert parts[1].count.tolist() == [0.0, 0.0, 1.0] and not parts[1].cov.any()
    pooled = pool(parts)
    whole = ClassMoments.of(x, y, 3)
    assert torch.equal(pooled.count, whole.count)
    torch.testing.assert_close(pooled.mean, whole.mean, rtol=0, atol=1e-12)
    torch.testing.assert_close(pooled.cov, whole.cov, rtol=0, atol=1e-12)


def test_virtual_features_follow_the_class_counts_and_moments() -> None:
    mean = torch.tensor([[2.0, -1.0, 0.0], [-3.0, 0.5, 1.0]], dtype=torch.float64)
    cov = torch.stack(
        [
            torch.tensor([[1.0, 0.5, 0.0], [0.5, 2.0, 0.0], [0.0, 0.0, 0.5]]),
            torch.eye(3) * 0.25,
        ]
    ).double()
    m = ClassMoments(torch.tensor([3000.0, 1000.0], dtype=torch.float64), mean, cov)
    x, y = virtual_features(m, 5.0, seed=3)
    assert x.dtype == torch.float32 and x.shape == (20000, 3)
    assert (y == 0).sum() == 15000 and (y == 1).sum() == 5000
    got = ClassMoments.of(x, y, 2)
    torch.testing.assert_close(got.mean, mean, rtol=0, atol=0.05)
    torch.testing.assert_close(got.cov, cov, rtol=0, atol=0.08)
    again, _ = virtual_features(m, 5.0, seed=3)
    assert torch.equal(x, again)
    other, _ = virtual_features(m, 5.0, seed=4)
    assert not torch.equal(x, other)


def test_a_class_of_fewer_examples_than_dimensions_samples_in_its_own_span() -> None:
    x = torch.tensor([[1.0, 0, 0, 0, 0], [3.0, 2, 0, 0, 0], [0, 0, 0, 0, 5]], dtype=torch.float64)
    m = ClassMoments.of(x, torch.tensor([0, 0, 1]), 2)  # class 0: rank-1 covariance; class 1: 0
    v, y = virtual_features(m, 100.0, seed=0)
    first, second = v[y == 0].double(), v[y == 1].double()
    assert first.shape == (200, 5) and second.shape == (100, 5)
    # class 0 varies along (1, 1, 0, 0, 0) only; class 1 (one example) is its mean, repeated
    offset = first - torch.tensor([2.0, 1, 0, 0, 0], dtype=torch.float64)
    torch.testing.assert_close(offset[:, 0], offset[:, 1], rtol=0, atol=1e-5)
    assert offset[:, 2:].abs().max() < 1e-5 and offset[:, 0].std() > 0.5
    torch.testing.assert_close(second, x[2].expand(100, 5), rtol=0, atol=1e-6)


def test_fit_linear_finds_the_separator_and_its_optimum() -> None:
    gen = torch.Generator().manual_seed(1)
    x = torch.cat([torch.randn(200, 4, generator=gen) + 2, torch.randn(200, 4, generator=gen) - 2])
    y = torch.tensor([1] * 200 + [0] * 200)
    start_w, start_b = torch.zeros(2, 4), torch.tensor([3.0, -3.0])  # every answer: class 0
    w, b = fit_linear(x, y, start_w, start_b, l2=1e-2)
    assert b is not None
    assert ((x @ w.T + b).argmax(1) == y).float().mean() > 0.97
    # a stationary point of the regularized cross-entropy
    w_, b_ = w.clone().requires_grad_(True), b.clone().requires_grad_(True)
    loss = torch.nn.functional.cross_entropy(x @ w_.T + b_, y) + 0.5e-2 * (w_ * w_).sum()
    loss.backward()
    assert w_.grad is not None and b_.grad is not None
    assert w_.grad.abs().max() < 1e-4 and b_.grad.abs().max() < 1e-4
    w_only, none = fit_linear(x, y, start_w, None)
    assert none is None and ((x @ w_only.T).argmax(1) == y).float().mean() > 0.97


def test_calibrated_head_refits_the_final_layer_only() -> None:
    gen = torch.Generator().manual_seed(2)
    x = torch.cat([torch.randn(50, 3, generator=gen) + 1, torch.randn(30, 3, generator=gen) - 1])
    y = torch.tensor([0] * 50 + [1] * 30)
    parts = _moments_of_union(x, y, [40, 40], 2)
    extras = {
        "classifier.dense.weight": torch.randn(3, 3, generator=gen),
        "classifier.out_proj.weight": torch.zeros(2, 3),
        "classifier.out_proj.bias": torch.zeros(2),
    }
    head, virtual = calibrated_head(parts, extras, "classifier.out_proj", per_example=2.0, seed=0)
    assert virtual == 160
    assert set(head) == set(extras)
    assert head["classifier.dense.weight"] is extras["classifier.dense.weight"]
    logits = x @ head["classifier.out_proj.weight"].T + head["classifier.out_proj.bias"]
    assert (logits.argmax(1) == y).float().mean() > 0.9


def _good_moments() -> ClassMoments:
    x = torch.randn(10, 4, generator=torch.Generator().manual_seed(5))
    return ClassMoments.of(x, torch.tensor([0, 1] * 5), 2)


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        (lambda m: dataclasses.replace(m, mean=m.mean[:, :3]), "'mean' must have shape (2, 4)"),
        (lambda m: dataclasses.replace(m, cov=m.cov[:1]), "'cov' must have shape (2, 4, 4)"),
        (lambda m: dataclasses.replace(m, count=[5, 5]), "'count' must have shape (2,), got list"),
        (
            lambda m: dataclasses.replace(m, mean=m.mean.clone().fill_(float("nan"))),
            "'mean' must be finite",
        ),
        (
            lambda m: dataclasses.replace(m, count=m.count.long()),
            "'count' must be finite floating-point",
        ),
        (
            lambda m: dataclasses.replace(m, count=torch.tensor([11.0, -1.0]).double()),
            "whole numbers >= 0",
        ),
        (
            lambda m: dataclasses.replace(m, count=torch.tensor([4.5, 5.5]).double()),
            "whole numbers >= 0",
        ),
        (
            lambda m: dataclasses.replace(m, count=torch.tensor([500.0, 5.0]).double()),
            "add up to 505, not the 10 examples it joined with",
        ),
        (
            lambda m: dataclasses.replace(m, cov=m.cov + torch.triu(torch.ones(4, 4), 1)),
            "symmetric",
        ),
        (
            lambda m: dataclasses.replace(m, cov=m.cov - 10 * torch.eye(4)),
            "non-negative diagonal",
        ),
        (  # symmetric with a positive diagonal, yet no covariance: [[1, 2], [2, 1]] blocks
            lambda m: dataclasses.replace(
                m,
                cov=torch.tensor([[1.0, 2, 0, 0], [2, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1]])
                .double()
                .expand(2, 4, 4)
                .clone(),
            ),
            "positive semi-definite",
        ),
    ],
)
def test_a_client_s_bad_moments_are_named(change, reason: str) -> None:  # type: ignore[no-untyped-def]
    good = _good_moments()
    assert check_moments(good, 2, 4, 10) is None
    got = check_moments(change(good), 2, 4, 10)
    assert got is not None and reason in got


def _runtime(llama: bool = False) -> tuple[ModelRuntime, list]:
    backbone = build_tiny_llama_backbone() if llama else build_tiny_backbone()
    bank = LoraBank(backbone, [2, 4], scaling=2.0)
    objective = make_objective(backbone, get_task("mrpc"), 64)
    runtime = ModelRuntime(
        bank, objective, TrainConfig(device="cpu", precision="fp32"), torch.device("cpu")
    )
    features = objective.train_features([Example(a, b, y) for a, b, y in PAIRS_TEXT])
    return runtime, features


def test_head_features_are_what_the_classifier_reads() -> None:
    runtime, features = _runtime()
    bank = runtime.bank
    name, linear = bank.head_linear()
    assert name == "classifier" and linear.out_features == 2
    gen = torch.Generator().manual_seed(0)
    extras = {k: torch.randn(v.shape, generator=gen) for k, v in bank.get_extras(2).items()}
    deltas = {  # a nonzero update on every adapted layer
        n: LoraFactors(A=a, B=torch.randn(b.shape, generator=gen)).low_rank(2.0)
        for n, (a, b) in bank.init_factors(4, 0).items()
    }
    x, y = runtime.head_features(deltas, extras, features, batch_size=3)
    assert x.shape == (len(features), linear.in_features) and x.dtype == torch.float32
    assert sorted(y.tolist()) == sorted(p[2] for p in PAIRS_TEXT)
    # each example's logits, rebuilt from its captured features, are the model's logits
    for feature, label in zip(features, (p[2] for p in PAIRS_TEXT), strict=True):
        one, one_label = runtime.head_features(deltas, extras, [feature], batch_size=1)
        assert one_label.tolist() == [label]
        batch = runtime.batch([feature])
        with bank.evaluating(deltas, extras) as model, torch.no_grad():
            inputs = {k: v for k, v in batch.items() if k != "labels"}
            logits = model(**inputs).logits
        rebuilt = one @ extras["classifier.weight"].T + extras["classifier.bias"]
        torch.testing.assert_close(rebuilt, logits, rtol=1e-5, atol=1e-5)
        # the batched pass (padded, in length order) captured the same row
        assert (x - one).abs().amax(dim=1).min() < 1e-5
    m = runtime.feature_moments(deltas, extras, features, batch_size=3)
    assert m.count.tolist() == [3.0, 4.0]
    torch.testing.assert_close(m.mean[1], x[y == 1].double().mean(0))


def test_a_decoder_head_is_refused() -> None:
    runtime, features = _runtime(llama=True)
    assert runtime.bank.head_linear()[0] == "score"
    with pytest.raises(ModelError, match="reads every position"):
        runtime.head_features({}, runtime.bank.get_extras(2), features, batch_size=4)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (("server.head_calibration=yes",), "allowed: none, ccvr"),
        (("server.head_calibration=ccvr", "server.calibration_samples=0"), r"\[0.1, 100.0\]"),
        (("server.calibration_samples=true",), "server.calibration_samples"),
        (
            ("server.head_calibration=ccvr", "model.task_type=causal-lm"),
            "only a sequence classifier",
        ),
        (
            ("server.head_calibration=ccvr", "federation.strategy=local"),
            "the 'local' reference has no global model",
        ),
    ],
)
def test_calibration_configuration_errors(overrides: tuple[str, ...], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_config(None, overrides)


def _records(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("strategy", ["hlora", "flora"])
def test_a_calibrated_run_recalibrates_its_last_head_only(
    strategy: str, tiny_bert_dir: Path, glue_dir: Path, tmp_path: Path
) -> None:
    common = {"federation.strategy": strategy}
    plain = run(
        load_config(None, tuple(tiny_overrides(tiny_bert_dir, glue_dir, tmp_path / "a", **common))),
        progress=False,
    )
    calibrated = run(
        load_config(
            None,
            tuple(
                tiny_overrides(
                    tiny_bert_dir,
                    glue_dir,
                    tmp_path / "b",
                    **common,
                    **{"server.head_calibration": '"ccvr"', "server.calibration_samples": 4.0},
                )
            ),
        ),
        progress=False,
    )
    before, after = _records(plain.run_dir), _records(calibrated.run_dir)
    # training is untouched: round 1 is the same, and so is the last round's aggregate
    assert before[0]["eval"] == after[0]["eval"] and "head_calibration" not in after[0]
    record = after[-1]["head_calibration"]
    assert record["applied"] is True and record["method"] == "ccvr"
    assert record["clients"] == 3 and record["failed"] == []
    assert record["virtual_examples"] == 4 * 48
    # the model before the calibration is the uncalibrated run's, bit for bit
    assert record["eval_uncalibrated"] == before[-1]["eval"]
    assert before[-1]["train_loss"] == after[-1]["train_loss"]
    plain_state = load_state(plain.run_dir / "checkpoint.safetensors")
    state = load_state(calibrated.run_dir / "checkpoint.safetensors")
    changed = {k for k in state.extras if not torch.equal(state.extras[k], plain_state.extras[k])}
    assert changed == {"classifier.weight", "classifier.bias"}
    summary = json.loads((calibrated.run_dir / "summary.json").read_text())
    assert "recalibrated" in summary["headline"]
    assert summary["final"]["accuracy"] == after[-1]["eval"]["accuracy"]


def test_bad_moments_are_left_out_and_too_few_keep_the_head(
    tiny_bert_dir: Path, glue_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    original = ModelRuntime.feature_moments
    lies = [1]  # how many clients misreport their class counts, in client order

    def lying(self, deltas, extras, features, batch_size, **kw):  # type: ignore[no-untyped-def]
        m = original(self, deltas, extras, features, batch_size, **kw)
        if len(features) > 1 and lies[0] > 0:  # (the set-up's head check sends one example)
            lies[0] -= 1
            return dataclasses.replace(m, count=m.count * 100)
        return m

    monkeypatch.setattr(ModelRuntime, "feature_moments", lying)
    overrides = tiny_overrides(
        tiny_bert_dir,
        glue_dir,
        tmp_path,
        **{"server.head_calibration": '"ccvr"', "federation.rounds": 1},
    )
    result = run(load_config(None, tuple(overrides)), progress=False)
    (record,) = _records(result.run_dir)
    calibration = record["head_calibration"]
    assert calibration["applied"] is True and calibration["clients"] == 2
    ((failed),) = calibration["failed"]
    assert failed["client_id"] == "client00"
    assert "00, not the " in failed["reason"] and "examples it joined with" in failed["reason"]

    lies[0] = 3  # every client lies: the head stays as aggregated
    overrides = tiny_overrides(
        tiny_bert_dir,
        glue_dir,
        tmp_path / "all",
        **{"server.head_calibration": '"ccvr"', "federation.rounds": 1},
    )
    result = run(load_config(None, tuple(overrides)), progress=False)
    (record,) = _records(result.run_dir)
    calibration = record["head_calibration"]
    assert calibration["applied"] is False and calibration["clients"] == 0
    assert "fewer than federation.min_clients" in calibration["reason"]
    assert record["eval"] == calibration["eval_uncalibrated"]


def test_a_transport_that_cannot_report_moments_is_refused_before_any_round(
    tiny_bert_dir: Path, glue_dir: Path, tmp_path: Path
) -> None:
    from hlora.federation import build_federation, make_loop
    from hlora.report import RoundProgress
    from hlora.server import FederationError

    class TrainOnly:
        def run_round(self, instructions):  # type: ignore[no-untyped-def]
            raise AssertionError("no round may start")

    overrides = tiny_overrides(
        tiny_bert_dir, glue_dir, tmp_path, **{"server.head_calibration": '"ccvr"'}
    )
    federation = build_federation(load_config(None, tuple(overrides)))
    with (
        RoundProgress(2, enabled=False) as bar,
        pytest.raises(FederationError, match="transport whose clients report their feature"),
    ):
        make_loop(federation, tmp_path, bar, TrainOnly())  # type: ignore[arg-type]
