"""The scripts that produce the published figures: benchmark floors, the simulation benchmark's
measurement, the SFT benchmark against TRL, and the experiment tables (mean and spread over
seeds)."""

from __future__ import annotations

import importlib.util
import json
import math
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import torch

from hlora.adapters import LoraBank
from hlora.config import load_config, replace
from tiny_models import build_tiny_backbone, save_tiny_causal_model

ROOT = Path(__file__).resolve().parents[1]


def _load(relative: str) -> ModuleType:
    """Import a script from the repository by path (its folder on ``sys.path`` for siblings)."""
    path = ROOT / relative
    folder = str(path.parent)
    if folder not in sys.path:
        sys.path.insert(0, folder)
    spec = importlib.util.spec_from_file_location(path.stem + "_under_test", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


# -- floors ------------------------------------------------------------------------------------


def test_lora_flops_per_token_counts_the_encoder_linears_only() -> None:
    floors = _load("benchmarks/floors.py")
    backbone = build_tiny_backbone(seed=0)
    # Tiny BERT: 2 layers, hidden 32, intermediate 64: per layer 4 h^2 + 2 h i = 8192 weights.
    linear = 2 * (4 * 32 * 32 + 2 * 32 * 64)
    expected = 4.0 * linear + 12.0 * 2 * 32 * 10.0
    assert floors.lora_training_flops_per_token(backbone.model, 10.0) == expected
    # The count is the same once peft has wrapped the layers (LoRA factors are left out).
    bank = LoraBank(backbone, [4], scaling=2.0)
    assert floors.lora_training_flops_per_token(bank.model.get_base_model(), 10.0) == expected


def test_measured_rates_are_positive_and_finite() -> None:
    floors = _load("benchmarks/floors.py")
    cpu = torch.device("cpu")
    rate = floors.matmul_rate(cpu, 64, 64, 64, seconds=0.05)
    bandwidth = floors.copy_bandwidth(cpu, mib=4, seconds=0.05)
    assert math.isfinite(rate) and rate > 0
    assert math.isfinite(bandwidth) and bandwidth > 0


def test_exact_aggregation_flops_beat_dense_at_small_total_rank() -> None:
    aggregation = _load("benchmarks/aggregation.py")
    exact = aggregation.exact_flops(1024, 1024, 248)
    dense = aggregation.dense_flops(1024, 1024, 248)
    assert exact == pytest.approx(6 * 2048 * 248**2 + (23 - 8 / 3) * 248**3)
    assert dense == pytest.approx(2 * 1024**2 * 248 + 21 * 1024**3)
    assert dense / exact > 10


# -- the simulation benchmark's measurement ----------------------------------------------------


def test_cholqr_factors_the_matrix_with_orthonormal_columns() -> None:
    stages = _load("benchmarks/aggregation_stages.py")
    left = torch.randn(3, 40, 6, dtype=torch.float64)
    q, upper = stages.cholqr(left)
    assert q.shape == (3, 40, 6) and upper.shape == (3, 6, 6)
    torch.testing.assert_close(q @ upper, left)
    torch.testing.assert_close(q.mT @ q, torch.eye(6, dtype=torch.float64).expand(3, 6, 6))
    assert torch.all(torch.tril(upper, diagonal=-1) == 0)


def test_stage_times_time_every_stage(capsys: pytest.CaptureFixture[str]) -> None:
    stages = _load("benchmarks/aggregation_stages.py")
    times = stages.stage_times(2, 24, 20, 5, torch.device("cpu"), repeats=1)
    assert "qr_svd (whole)" in times and "svd(core) on CPU, fp64" in times
    assert all(math.isfinite(t) and t >= 0 for t in times.values())
    assert len(capsys.readouterr().out.splitlines()) == len(times)  # one line per stage


def test_simulation_measure_runs_one_round_of_k_clients(
    tiny_bert_dir: Path, glue_dir: Path
) -> None:
    simulation = _load("benchmarks/simulation.py")
    row = simulation.measure(
        3,
        4,
        "cpu",
        str(glue_dir),
        model=str(tiny_bert_dir),
        extra_overrides=("model.max_length=64",),
    )
    assert row["clients"] == 3
    assert row["examples"] == 12
    assert row["isolated_s"] > 0 and row["round_s"] > 0
    assert row["overhead"] == pytest.approx(row["round_s"] / row["isolated_s"])
    assert row["peak_rss_mib"] >= row["rss_loaded_mib"] > 0


def _three_clients(tiny_bert_dir: Path, glue_dir: Path, *overrides: str) -> Any:
    """A federation of 3 clients over 48 MRPC pairs on the tiny BERT, batch 8."""
    return load_config(
        None,
        (
            f"model.name={tiny_bert_dir}",
            "model.max_length=32",
            f"data.data_dir={glue_dir}",
            "data.train_limit=48",
            "federation.num_clients=3",
            "train.batch_size=8",
            *overrides,
        ),
    )


def test_round_anatomy_shares_add_up_to_the_mean(tiny_bert_dir: Path, glue_dir: Path) -> None:
    anatomy = _load("experiments/round_anatomy.py")
    config = _three_clients(tiny_bert_dir, glue_dir)
    rows = anatomy.anatomy(config)
    assert sorted(r.client_id for r in rows) == ["client00", "client01", "client02"]
    assert sum(r.examples for r in rows) == 48
    assert sum(r.share for r in rows) == pytest.approx(1.0, abs=1e-9)
    assert all(-1 - 1e-9 <= r.cosine <= 1 + 1e-9 and r.norm > 0 for r in rows)
    assert [r.norm for r in rows] == sorted((r.norm for r in rows), reverse=True)


def test_ccvr_probe_recalibrates_a_finished_run_as_the_option_does(
    tiny_bert_dir: Path, glue_dir: Path, tmp_path: Path
) -> None:
    from hlora.federation import run
    from tiny_models import tiny_overrides

    def finished(name: str, *extra: str) -> Path:
        overrides = tiny_overrides(tiny_bert_dir, glue_dir, tmp_path / name)
        config = load_config(None, (*overrides, "federation.rounds=1", *extra))
        return run(config, progress=False).run_dir

    plain = finished("plain")
    calibrated = finished("ccvr", 'server.head_calibration="ccvr"')
    rows = _load("experiments/ccvr_probe.py").probe(plain, 10.0)
    record = json.loads((calibrated / "metrics.jsonl").read_text().splitlines()[-1])
    assert rows["global"] == record["head_calibration"]["eval_uncalibrated"]
    assert rows["ccvr"] == record["eval"]  # the same moments, draws and fit as the option's
    assert set(rows["probe"]) == {"accuracy", "f1", "loss"}
    assert set(rows["features"]) == {"effective_rank", "top1_share", "between_class"}


def test_ccvr_probe_spread_of_features() -> None:
    spread = _load("experiments/ccvr_probe.py").spread
    y = torch.tensor([0, 0, 1, 1])
    on_means = torch.tensor([[1.0, 2.0], [1.0, 2.0], [3.0, 2.0], [3.0, 2.0]])  # one line
    s = spread(on_means, y)
    assert s["effective_rank"] == pytest.approx(1.0)
    assert s["top1_share"] == pytest.approx(1.0)
    assert s["between_class"] == pytest.approx(1.0)
    square = torch.tensor([[1.0, 1.0], [-1.0, -1.0], [1.0, -1.0], [-1.0, 1.0]])
    s = spread(square, y)  # isotropic, both classes centred on the origin
    assert s["effective_rank"] == pytest.approx(2.0)
    assert s["top1_share"] == pytest.approx(0.5)
    assert s["between_class"] == pytest.approx(0.0)
    mixed = torch.tensor([[0.0, 1.0], [0.0, -1.0], [2.0, 1.0], [2.0, -1.0]])
    assert spread(mixed, y)["between_class"] == pytest.approx(0.5)  # 4 of 8 between


def test_scaffold_probe_corrections_are_the_gradients_of_the_linear_term() -> None:
    probe = _load("experiments/scaffold_probe.py")
    gen = torch.Generator().manual_seed(0)
    c = torch.randn(5, 7, generator=gen)
    a = torch.randn(3, 7, generator=gen, requires_grad=True)
    b = torch.randn(5, 3, generator=gen, requires_grad=True)
    (c * (0.5 * b @ a)).sum().backward()
    grad_a, grad_b = probe.correction_of_a(c, b, 0.5), probe.correction_of_b(c, a, 0.5)
    assert a.grad is not None and b.grad is not None
    torch.testing.assert_close(grad_a, a.grad)
    torch.testing.assert_close(grad_b, b.grad)


def test_scaffold_probe_control_variates_are_fixed_within_a_round() -> None:
    probe = _load("experiments/scaffold_probe.py")
    state = probe.ControlVariates(4)
    state.start(1)
    assert state.correction("a") == {}
    state.pending.append(("a", 1, {"w": torch.tensor([4.0])}))
    state.pending.append(("b", 3, {"w": torch.tensor([8.0])}))
    assert state.correction("b") == {}  # reports count from the next round on
    state.start(2)  # c = 1/4 * 4 + 3/4 * 8 = 7
    torch.testing.assert_close(state.correction("a")["w"], torch.tensor([3.0]))
    torch.testing.assert_close(state.correction("b")["w"], torch.tensor([-1.0]))
    state.pending.append(("a", 1, {"w": torch.tensor([0.0])}))
    state.start(3)  # a's c_k replaced: c = 3/4 * 8 = 6
    torch.testing.assert_close(state.correction("a")["w"], torch.tensor([6.0]))


def test_scaffold_probe_measures_the_gradient_of_the_dense_update(
    tiny_bert_dir: Path, glue_dir: Path
) -> None:
    probe = _load("experiments/scaffold_probe.py")
    from hlora.federation import build_federation, make_loop
    from hlora.report import RoundProgress
    from hlora.runtime import ModelRuntime

    config = _three_clients(
        tiny_bert_dir,
        glue_dir,
        "train.local_steps=1",
        "train.precision=fp32",
        "model.lora_dropout=0",  # the probe's dense term sees the layer's input undropped
    )
    federation = build_federation(config)
    bank = federation.runtime.bank
    state = probe.ControlVariates(48)
    train = probe.scaffold_train(ModelRuntime.train_client, state)
    captured: dict[str, torch.Tensor] = {}
    slot = federation.clients[0]
    factors = bank._factor_parameters(slot.rank)
    handles = [
        b.register_hook(lambda g, n=name: captured.setdefault(n, g.detach().clone()))
        for name, (_, b) in factors.items()
    ]
    with tempfile.TemporaryDirectory() as folder, RoundProgress(1, enabled=False) as bar:
        loop = make_loop(federation, Path(folder), bar)
        instruction = loop.instruction(loop.initial_state(), slot.client_id, 1)
        # round 1 starts from the fresh LoRA init: A random, B zero
        a_start = {
            n: a for n, (a, _) in bank.init_factors(slot.rank, instruction.init_seed).items()
        }
        train(federation.runtime, instruction, federation.train_features[slot.client_id])
    for handle in handles:
        handle.remove()
    ((cid, examples, variates),) = state.pending
    assert (cid, examples) == (slot.client_id, slot.num_examples)
    # One step from B = 0: dL/dB = s G A^T, with G = dL/d(dW) the probe's c_k of the layer.
    for name, grad_b in captured.items():
        expected = instruction.scaling * variates[name] @ a_start[name].T
        torch.testing.assert_close(grad_b, expected, rtol=1e-4, atol=1e-7)
    assert any(float(variates[n].abs().max()) > 0 for n in captured)
    assert any(k.startswith("head:") for k in variates)


@pytest.mark.slow
def test_memory_rule_benchmark_puts_the_estimate_beside_a_measured_peak(
    tiny_bert_dir: Path, tmp_path: Path
) -> None:
    command = [
        sys.executable,
        str(ROOT / "benchmarks/memory_rule.py"),
        "--cases",
        "minilm-b16",
        "--steps",
        "1",
        f"--set=model.name={tiny_bert_dir}",
        "--set=model.max_length=32",
        "--json",
        str(tmp_path / "memory.json"),
    ]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = json.loads((tmp_path / "memory.json").read_text())["rows"]
    assert [r["allocator"] for r in rows] == ["default", "mmap-64k"]
    for row in rows:
        parts = row["base_mib"] + row["activations_mib"] + row["state_mib"]
        assert row["estimate_mib"] == pytest.approx(parts)
        assert row["measured_mib"] > 0 and row["steps"] == 1
        assert row["error"] == pytest.approx(row["estimate_mib"] / row["measured_mib"] - 1)


def test_sft_client_benchmark_compares_hlora_with_trl_on_the_same_sequences(
    tmp_path: Path, glue_dir: Path
) -> None:
    pytest.importorskip("trl")
    model_dir = save_tiny_causal_model(tmp_path / "tiny-causal")
    out = tmp_path / "sft.json"
    command = [sys.executable, str(ROOT / "benchmarks/sft_client.py"), "--model", str(model_dir)]
    command += ["--device", "cpu", "--data-dir", str(glue_dir), "--examples", "6"]
    command += ["--batch-size", "2", "--repeats", "2", "--warmup-steps", "1", "--json", str(out)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    lines = result.stdout.splitlines()
    assert "same token sequences and labelled positions on both sides: yes" in lines
    # Table rows: method, seconds, useful tok/s, ratio, padded / useful, loss.
    table = [line.split() for line in lines if line.startswith(("hlora ", "trl-"))]
    rows = {parts[0]: parts for parts in table if parts[1] != "per"}
    assert sorted(rows) == ["hlora", "trl-sft-default"]
    assert rows["trl-sft-default"][3] == "1.00x"
    record = json.loads(out.read_text())
    assert record == json.loads(lines[-1])
    assert record["examples"] == 6 and len(record["seconds"]["hlora"]) == 2
    seconds = record["median_seconds"]
    assert record["speedup_vs_trl"] == pytest.approx(
        seconds["trl-sft-default"] / seconds["hlora"], rel=1e-2
    )
    # The table prints the ratio to 2 decimals, the record keeps 3 (each rounded once).
    assert rows["hlora"][3].endswith("x")
    assert float(rows["hlora"][3][:-1]) == pytest.approx(record["speedup_vs_trl"], abs=0.0051)
    # Both sides train on the same useful tokens; padding only adds to what each processes.
    assert all(n >= record["useful_tokens"] > 0 for n in record["processed_tokens"].values())
    settings = record["settings"]
    assert settings["trl-sft-default"]["loss"] == settings["hlora"]["loss"]
    assert settings["trl-sft-default"]["LoRA targets"] == settings["hlora"]["LoRA targets"]
    assert "gradient checkpointing" in result.stdout  # a TRL default that differs is named


# -- experiment tables -------------------------------------------------------------------------


def _write_run(folder: Path, accuracies: list[float], seconds: float, nbytes: int) -> None:
    folder.mkdir(parents=True)
    lines = []
    for round_num, acc in enumerate(accuracies, start=1):
        record: dict[str, Any] = {
            "round": round_num,
            "train_loss": 1.0 / round_num,
            "bytes_sent": nbytes,
            "bytes_received": nbytes,
            "round_time_s": seconds,
            "eval": {"accuracy": acc, "f1": acc / 2, "loss": 0.5},
        }
        if round_num == len(accuracies):
            record["eval_by_rank"] = {"2": {"accuracy": acc - 0.1}, "16": {"accuracy": acc}}
        lines.append(json.dumps(record))
    (folder / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    (folder / "summary.json").write_text("{}")


@pytest.fixture
def fake_runs(tmp_path: Path) -> Path:
    root = tmp_path / "runs"
    _write_run(root / "e3-hlora-s0", [0.60, 0.72, 0.75], 10.0, 1_000_000)
    _write_run(root / "e3-hlora-s1", [0.65, 0.68, 0.71], 12.0, 1_000_000)
    _write_run(root / "e3-hlora-s2", [0.70, 0.71, 0.73], 50.0, 1_000_000)
    _write_run(root / "e1-fedavg-s0", [0.60, 0.61], 10.0, 500_000)
    (root / "e1-fedavg-s1").mkdir()  # unfinished: no summary.json, left out
    (root / "notes").mkdir()  # not a run name, left out
    return root


def test_collect_groups_finished_runs_by_seed(fake_runs: Path) -> None:
    results = _load("experiments/results.py")
    groups = results.collect(fake_runs)
    assert sorted(groups) == ["e1-fedavg", "e3-hlora"]
    assert sorted(groups["e3-hlora"]) == [0, 1, 2]
    assert sorted(groups["e1-fedavg"]) == [0]


def test_group_row_reports_mean_std_target_rounds_median_time_and_bytes(fake_runs: Path) -> None:
    results = _load("experiments/results.py")
    groups = results.collect(fake_runs)
    row = results.group_row("hlora", groups["e3-hlora"], 0.70)
    finals = [0.75, 0.71, 0.73]
    expected = f"{statistics.fmean(finals):.3f} ± {statistics.stdev(finals):.3f}"
    assert row["final accuracy"] == expected == "0.730 ± 0.020"
    assert row["final F1"] == "0.365 ± 0.010"
    assert row["final dev loss"] == "0.500 ± 0.000"
    curves = [(0.60 + 0.72 + 0.75) / 3, (0.65 + 0.68 + 0.71) / 3, (0.70 + 0.71 + 0.73) / 3]
    expected = f"{statistics.fmean(curves):.3f} ± {statistics.stdev(curves):.3f}"
    assert row["acc averaged over rounds"] == expected == "0.694 ± 0.017"
    assert row["acc over the last 4 evals"] == expected  # 3 evaluations: all of them
    tails = [(0.72 + 0.75) / 2, (0.68 + 0.71) / 2, (0.71 + 0.73) / 2]
    expected = f"{statistics.fmean(tails):.3f} ± {statistics.stdev(tails):.3f}"
    last2 = results.group_row("hlora", groups["e3-hlora"], 0.70, last=2)
    assert last2["acc over the last 2 evals"] == expected == "0.717 ± 0.020"
    assert row["round reaching acc >= 0.70 (per seed)"] == "2, 3, 1"
    assert row["train s / round (median)"] == "12.0"  # one slow seed does not move the median
    assert row["MB / round (both ways)"] == "2.00"
    single = results.group_row("fedavg", groups["e1-fedavg"], 0.70)
    assert single["final accuracy"] == "0.610 ± 0.000"
    assert single["round reaching acc >= 0.70 (per seed)"] == "-"


def test_seed_mean_records_average_each_round(fake_runs: Path) -> None:
    results = _load("experiments/results.py")
    groups = results.collect(fake_runs)
    mean = results.seed_mean_records(groups["e3-hlora"])
    assert [r["round"] for r in mean] == [1, 2, 3]
    assert mean[0]["eval"]["accuracy"] == pytest.approx((0.60 + 0.65 + 0.70) / 3)
    assert mean[2]["train_loss"] == pytest.approx(1 / 3)


def test_truncation_rows_by_rank(fake_runs: Path) -> None:
    results = _load("experiments/results.py")
    rows = results.truncation_rows(results.collect(fake_runs)["e3-hlora"])
    assert [r["rank"] for r in rows] == ["2", "16"]
    assert rows[0]["final accuracy"] == "0.630 ± 0.020"


def test_results_main_prints_tables_and_writes_plots(
    fake_runs: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    results = _load("experiments/results.py")
    plots = tmp_path / "plots"
    argv = ["results.py", str(fake_runs), "--plots", str(plots), "--cell", "rte-iid"]
    monkeypatch.setattr(sys, "argv", argv)
    results.main()
    out = capsys.readouterr().out
    assert "| hlora | 3 | 0.730 ± 0.020 |" in out
    assert "| fedavg (r=8) | 1 | 0.610 ± 0.000 |" in out
    names = sorted(p.name for p in plots.iterdir())
    assert names == [f"e{i}_rte-iid{s}.png" for i in (1, 2, 3) for s in ("", "_loss")]


def test_results_main_refuses_an_empty_tail(
    fake_runs: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    results = _load("experiments/results.py")
    monkeypatch.setattr(sys, "argv", ["results.py", str(fake_runs), "--last", "0"])
    with pytest.raises(SystemExit) as exit_info:
        results.main()
    assert exit_info.value.code == 2
    assert "--last must be at least 1, got 0" in capsys.readouterr().err


def test_results_plots_show_the_majority_class_and_name_short_groups(
    fake_runs: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The accuracy plots carry the cell's majority-class line (from a run's summary.json), the
    loss plots none; a group with fewer seeds than the fullest says how many it averages."""
    results = _load("experiments/results.py")
    assert results.majority_class(fake_runs) == {}  # no run records one
    summary = {"majority_class": {"accuracy": 0.684, "f1": 0.812}}
    (fake_runs / "e3-hlora-s1" / "summary.json").write_text(json.dumps(summary))
    assert results.majority_class(fake_runs) == {"accuracy": 0.684, "f1": 0.812}
    calls: list[tuple[list[str], str, Any]] = []

    def record(runs: Any, metric: str, out_path: Path, **kwargs: Any) -> Path:
        calls.append((list(runs), metric, kwargs.get("reference_lines")))
        return Path(out_path)

    monkeypatch.setattr(results, "plot_convergence", record)
    argv = ["results.py", str(fake_runs), "--plots", str(tmp_path / "plots"), "--cell", "c"]
    monkeypatch.setattr(sys, "argv", argv)
    results.main()
    lines = {metric: line for _, metric, line in calls}
    assert lines == {"accuracy": {"majority class": 0.684}, "loss": None}
    labels = {label for runs, _, _ in calls for label in runs}
    assert labels == {"fedavg (r=8) (1 seed)", "hlora, r in {2,4,8,16}", "hlora"}


def test_results_titles_name_the_ranks_the_runs_used(
    fake_runs: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    results = _load("experiments/results.py")
    assert results.cell_ranks(fake_runs) == (2, 4, 8, 16)  # no config.toml: e3_mrpc.toml's
    _write_run(fake_runs / "e3-centralized-s0", [0.80], 10.0, 1_000)
    toml = "[federation]\nnum_clients = 100\nranks = [8, 2, 4]\n"
    (fake_runs / "e3-hlora-s0" / "config.toml").write_text(toml)
    assert results.cell_ranks(fake_runs) == (2, 4, 8)
    argv = ["results.py", str(fake_runs), "--plots", str(tmp_path / "plots"), "--cell", "c100"]
    monkeypatch.setattr(sys, "argv", argv)
    results.main()
    out = capsys.readouterr().out
    assert "### E3: every strategy, ranks {2,4,8}\n" in out
    assert "| hlora, r in {2,4,8} | 3 |" in out
    assert "| centralized (r=8) | 1 | 0.800 ± 0.000 |" in out


def test_bias_rows_make_one_row_per_round_with_error_and_norm() -> None:
    results = _load("experiments/results.py")
    rows = [
        {"round": 1, "update": "hlora", "error": 1.2e-6, "norm_ratio": 1.0},
        {"round": 1, "update": "fedavg", "error": 0.315, "norm_ratio": 0.8431},
        {"round": 2, "update": "hlora", "error": 9e-7, "norm_ratio": 1.0},
    ]
    table = results.bias_rows(rows)
    assert table == [
        {"round": "1", "hlora": "1.2e-06 (1.000)", "fedavg": "0.32 (0.843)"},
        {"round": "2", "hlora": "9e-07 (1.000)", "fedavg": "-"},
    ]


# -- the protocol scripts ------------------------------------------------------------------------


def _recording_hlora(tmp_path: Path, log: Path, fail_on: str | None = None) -> Path:
    """A folder holding a `hlora` program that appends its arguments to LOG as one JSON line,
    prints the last one, and fails when an argument contains FAIL_ON."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    program = bin_dir / "hlora"
    program.write_text(
        f"#!{sys.executable}\n"
        "import json, sys\n"
        f"with open({str(log)!r}, 'a') as f:\n"
        "    f.write(json.dumps(sys.argv[1:]) + '\\n')\n"
        "print('trained', sys.argv[-1])\n"
        f"fail_on = {fail_on!r}\n"
        "sys.exit(1 if fail_on and any(fail_on in a for a in sys.argv) else 0)\n"
    )
    program.chmod(0o755)
    return bin_dir


def _sets(call: list[str]) -> tuple[str, ...]:
    """The ``--set`` overrides of one recorded ``hlora`` call, in order."""
    return tuple(call[i + 1] for i, a in enumerate(call) if a == "--set")


def _grid_calls(tmp_path: Path, script: str) -> list[list[str]]:
    """Source experiments/grid.sh with a recording `hlora`, run SCRIPT, return each call's args."""
    log = tmp_path / "calls.jsonl"
    bin_dir = _recording_hlora(tmp_path, log)
    program = f"""
set -euo pipefail
source {shlex.quote(str(ROOT / "experiments/grid.sh"))}
RUN_ARGS=(--no-progress)
LOCAL_ARGS=(--set server.eval_every=3)
{script}
"""
    env = {"PATH": f"{bin_dir}:/usr/bin:/bin"}
    subprocess.run(["bash", "-c", program], check=True, cwd=ROOT, capture_output=True, env=env)
    return [json.loads(line) for line in log.read_text().splitlines()]


@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
def test_grid_runs_every_strategy_per_seed_with_later_sets_winning(tmp_path: Path) -> None:
    out = tmp_path / "out"
    calls = _grid_calls(tmp_path, f'GRID_REFS="local" grid {out} "0 1" --set data.task=rte')
    names = [c[c.index("--set", c.index("--output")) + 1] for c in calls]
    order = ("e3-hlora", "e1-fedavg", "e1-hlora", "e3-zeropad", "e3-flora", "e3-local")
    assert names == [f"output.name={run}-s{seed}" for seed in (0, 1) for run in order]
    first = calls[0]
    assert first[:4] == ["run", "experiments/e3_mrpc.toml", "--no-progress", "--output"]
    # The cell's settings come after the common ones, the strategy last: later --set wins.
    sets = list(_sets(first))
    assert sets[1:] == ["federation.seed=0", "data.task=rte", "federation.strategy=hlora"]
    assert calls[5][-2:] == ["--set", "server.eval_every=3"]  # the local reference's thinning


@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
def test_grid_runs_only_the_named_runs_and_references(tmp_path: Path) -> None:
    out = tmp_path / "out"
    script = f'GRID_RUNS="e1-hlora e3-flora" GRID_REFS="centralized" grid {out} "2"'
    calls = _grid_calls(tmp_path, script)
    assert [(c[1], c[-1]) for c in calls] == [
        ("experiments/e1_mrpc.toml", "federation.strategy=hlora"),
        ("experiments/e3_mrpc.toml", "federation.strategy=flora"),
        ("experiments/e3_mrpc.toml", "federation.strategy=centralized"),
    ]
    assert all("federation.seed=2" in c for c in calls)


@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
def test_grid_skips_finished_runs_and_restarts_unfinished_ones(tmp_path: Path) -> None:
    out = tmp_path / "out"
    (out / "e3-hlora-s0").mkdir(parents=True)
    (out / "e3-hlora-s0" / "summary.json").write_text("{}")
    (out / "e1-fedavg-s0").mkdir()
    (out / "e1-fedavg-s0" / "stale").write_text("half a run")
    calls = _grid_calls(tmp_path, f'GRID_REFS="" grid {out} "0"')
    assert len(calls) == 4  # e3-hlora skipped; no references
    assert not (out / "e1-fedavg-s0").exists()  # an unfinished run starts again from nothing


@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
def test_grid_resume_continues_unfinished_runs_that_saved_their_config(tmp_path: Path) -> None:
    out = tmp_path / "out"
    (out / "e3-hlora-s0").mkdir(parents=True)
    (out / "e3-hlora-s0" / "config.toml").write_text("[federation]\n")
    (out / "e3-hlora-s0.log").write_text("round 1\n")
    (out / "e1-fedavg-s0").mkdir()  # died before it saved its configuration
    (out / "e1-fedavg-s0" / "stale").write_text("half a run")
    script = f"""GRID_LOG=1 GRID_RESUME=1 GRID_RUNS="e3-hlora e1-fedavg" GRID_REFS="" \\
        grid {out} "0" """
    calls = _grid_calls(tmp_path, script)
    assert calls[0] == ["run", "--resume", f"{out}/e3-hlora-s0", "--no-progress"]
    assert (out / "e3-hlora-s0" / "config.toml").is_file()  # kept
    assert (out / "e3-hlora-s0.log").read_text() == "round 1\ntrained --no-progress\n"
    assert calls[1][:2] == ["run", "experiments/e1_mrpc.toml"]  # from nothing
    assert not (out / "e1-fedavg-s0" / "stale").exists()
    assert (out / "e1-fedavg-s0.log").read_text() == "trained federation.strategy=fedavg\n"
    # without GRID_RESUME an unfinished run starts again, whatever it saved
    (tmp_path / "again").mkdir()
    calls = _grid_calls(tmp_path / "again", f'GRID_RUNS="e3-hlora" GRID_REFS="" grid {out} "0"')
    assert calls[-1][:2] == ["run", "experiments/e3_mrpc.toml"]
    assert not (out / "e3-hlora-s0").exists()


@pytest.mark.skipif(
    shutil.which("bash") is None or shutil.which("xargs") is None, reason="needs bash and xargs"
)
def test_run_plan_runs_every_planned_run_once_with_its_own_log(tmp_path: Path) -> None:
    out, plan, log = tmp_path / "out", tmp_path / "plan.txt", tmp_path / "calls.jsonl"
    bin_dir = _recording_hlora(tmp_path, log, fail_on="e1-fedavg-s1")
    (out / "e3-hlora-s0").mkdir(parents=True)
    (out / "e3-hlora-s0" / "summary.json").write_text("{}")
    program = f"""
set -uo pipefail
source {shlex.quote(str(ROOT / "experiments/grid.sh"))}
RUN_ARGS=(--no-progress --data-dir 'a dir')
GRID_PLAN={shlex.quote(str(plan))}
GRID_RUNS="e3-hlora e1-fedavg" GRID_REFS="" grid {shlex.quote(str(out))} "0 1" --set x=1
test -e {shlex.quote(str(log))} && exit 9  # planning starts nothing
run_plan "$GRID_PLAN" 2
"""
    env = {"PATH": f"{bin_dir}:/usr/bin:/bin"}
    result = subprocess.run(
        ["bash", "-c", program], cwd=ROOT, capture_output=True, text=True, env=env
    )
    assert result.returncode != 0  # one run failed ...
    assert f"FAILED {out}/e1-fedavg-s1" in result.stdout
    calls = [json.loads(line) for line in log.read_text().splitlines()]
    names = sorted(c[c.index("--output") + 3] for c in calls)
    # ... the others still ran, each once; the finished run was skipped at planning time.
    assert names == [f"output.name={n}" for n in ("e1-fedavg-s0", "e1-fedavg-s1", "e3-hlora-s1")]
    assert all(c[2:5] == ["--no-progress", "--data-dir", "a dir"] for c in calls)
    assert all(c[-4:-2] == ["--set", "x=1"] for c in calls)
    assert (out / "e3-hlora-s1.log").read_text() == "trained federation.strategy=hlora\n"
    assert len(plan.read_text().splitlines()) == 3


@pytest.mark.skipif(
    shutil.which("bash") is None or shutil.which("xargs") is None, reason="needs bash and xargs"
)
def test_full_protocol_with_jobs_runs_the_whole_grid_in_priority_order(tmp_path: Path) -> None:
    out, log = tmp_path / "out", tmp_path / "calls.jsonl"
    bin_dir = _recording_hlora(tmp_path, log)
    env = {"PATH": f"{bin_dir}:/usr/bin:/bin", "JOBS": "1", "MODEL_LABEL": "mini"}
    script = str(ROOT / "experiments/full_protocol.sh")
    subprocess.run(["bash", script, str(out), "/models/mini"], cwd=ROOT, check=True, env=env)
    sequential = [json.loads(line) for line in log.read_text().splitlines()]
    log.unlink()
    parallel_out = tmp_path / "parallel"
    env["JOBS"] = "4"
    subprocess.run(
        ["bash", script, str(parallel_out), "/models/mini"], cwd=ROOT, check=True, env=env
    )
    parallel = [json.loads(line) for line in log.read_text().splitlines()]
    # MRPC and RTE x 2 partitions x 3 seeds x 7 runs, 100 clients (3 x 3), the QQP sample (2 x 21);
    # no SmolLM2 cell for a backbone other than minilm.
    assert len(sequential) == 84 + 9 + 42
    as_set = sorted(json.dumps(c).replace(str(parallel_out), str(out)) for c in parallel)
    assert as_set == sorted(json.dumps(c) for c in sequential)
    folders = [c[c.index("--output") + 1] for c in sequential]
    assert folders[0] == f"{out}/mini/mrpc-dirichlet"
    assert folders[-1] == f"{out}/mini/qqp-sample-iid"
    assert all("model.name=/models/mini" in c for c in sequential)
    assert (parallel_out / "mini/mrpc-dirichlet/e3-hlora-s0.log").is_file()


@pytest.mark.parametrize("script", ["cpu_protocol.sh", "full_protocol.sh", "grid.sh"])
@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
def test_protocol_scripts_parse(script: str) -> None:
    subprocess.run(["bash", "-n", str(ROOT / "experiments" / script)], check=True)


@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
def test_gpu_checks_script_parses_and_names_its_modes() -> None:
    script = str(ROOT / "experiments/gpu_checks.sh")
    subprocess.run(["bash", "-n", script], check=True)
    wrong = subprocess.run(["bash", script, "nothing"], capture_output=True, text=True)
    assert wrong.returncode == 2
    assert "usage:" in wrong.stderr and "prepare | run OUT" in wrong.stderr


# -- label skew of a partition -------------------------------------------------------------


def test_client_skews_count_each_clients_class_shares() -> None:
    skew = _load("experiments/label_skew.py")
    labels = [0, 0, 0, 1, 1, 0, 1, 1, 1, 1]
    skews = skew.client_skews(labels, [[0, 1, 2, 5], [3, 4, 6, 7, 8], [9]], 2)
    assert [s.size for s in skews] == [4, 5, 1]
    assert [s.class_shares for s in skews] == [(1.0, 0.0), (0.0, 1.0), (0.0, 1.0)]
    mixed = skew.client_skews(labels, [[0, 3, 4, 5], [1, 2, 6, 7, 8, 9]], 2)
    assert [s.class_shares for s in mixed] == [(0.5, 0.5), (2 / 6, 4 / 6)]
    assert [s.largest_share for s in mixed] == [0.5, 4 / 6]


def test_share_on_one_class_clients_weights_by_size_and_uses_a_strict_threshold() -> None:
    skew = _load("experiments/label_skew.py")
    skews = [
        skew.ClientSkew(30, (0.95, 0.05)),  # over 0.9
        skew.ClientSkew(60, (0.5, 0.5)),
        skew.ClientSkew(10, (0.1, 0.9)),  # exactly 0.9: not over
    ]
    assert skew.share_on_one_class_clients(skews, 0.9) == pytest.approx(0.3)
    assert skew.share_on_one_class_clients(skews, 0.85) == pytest.approx(0.4)


def test_label_skew_main_reports_the_partition_a_run_makes(
    glue_dir: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from hlora.config import load_config
    from hlora.federation import client_partitions, load_run_task

    skew = _load("experiments/label_skew.py")
    config_file = str(ROOT / "experiments" / "e1_mrpc.toml")
    data = f"data.data_dir={json.dumps(str(glue_dir))}"
    monkeypatch.setattr(
        sys, "argv", ["label_skew.py", config_file, "--seeds", "1", "--data-dir", str(glue_dir)]
    )
    skew.main()
    out = capsys.readouterr().out.splitlines()
    config = load_config(config_file, (data, "federation.seed=1"))
    task = load_run_task(config)
    labels = [e.label for e in task.train]
    parts = client_partitions(config, task, config.federation.num_clients)
    sizes = [len(p) for p in parts]
    positive = [sum(labels[i] for i in p) / len(p) for p in parts]
    skewed = [n for n, p in zip(sizes, positive, strict=True) if max(p, 1 - p) > 0.9]
    on_one_class = sum(skewed) / len(labels)
    assert out[0].startswith("mrpc, dirichlet (alpha 0.5), 10 clients")
    assert out[1] == (
        f"seed 1: {on_one_class:.0%} of the examples on clients with over 90% of one class"
    )
    assert out[2].split()[1:] == [str(n) for n in sizes]
    assert out[4].split()[2:] == [f"{p:.2f}" for p in positive]
    assert on_one_class > 0.5  # the partition where no strategy learns (docs/RESULTS.md, 2.3)


def test_rank_bands_pool_the_clients_whose_rank_reaches_each_band() -> None:
    skew = _load("experiments/label_skew.py")
    skews = [
        skew.ClientSkew(60, (1.0, 0.0)),  # rank 2: trains components 1-2 only
        skew.ClientSkew(30, (0.5, 0.5)),  # rank 4
        skew.ClientSkew(10, (0.0, 1.0)),  # rank 8
    ]
    bands = skew.rank_bands(skews, [2, 4, 8])
    assert [(b.low, b.high) for b in bands] == [(0, 2), (2, 4), (4, 8)]
    assert [b.data_share for b in bands] == pytest.approx([1.0, 0.4, 0.1])
    assert bands[0].class_shares == pytest.approx((0.75, 0.25))  # (60 + 15) / 100
    assert bands[1].class_shares == pytest.approx((0.375, 0.625))  # 15 / 40
    assert bands[2].class_shares == pytest.approx((0.0, 1.0))
    same = skew.rank_bands(skews[::-1], [8, 4, 2])  # the order of the clients does not matter
    for a, b in zip(same, bands, strict=True):
        assert (a.low, a.high, a.data_share) == (b.low, b.high, pytest.approx(b.data_share))
        assert a.class_shares == pytest.approx(b.class_shares)
    with pytest.raises(ValueError, match="2 ranks for 3 clients"):
        skew.rank_bands(skews, [2, 4])


def test_label_skew_prints_who_trains_each_band_with_mixed_ranks(
    glue_dir: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from hlora.config import load_config
    from hlora.federation import client_partitions, load_run_task

    skew = _load("experiments/label_skew.py")
    config_file = str(ROOT / "experiments" / "e3_mrpc.toml")
    argv = [config_file, "--seeds", "2", "--data-dir", str(glue_dir)]
    monkeypatch.setattr(sys, "argv", ["label_skew.py", *argv])
    skew.main()
    out = capsys.readouterr().out.splitlines()
    config = load_config(
        config_file, (f"data.data_dir={json.dumps(str(glue_dir))}", "federation.seed=2")
    )
    task = load_run_task(config)
    parts = client_partitions(config, task, 10)
    ranks = [(2, 4, 8, 16)[k % 4] for k in range(10)]
    assert out[5].split()[1:] == [str(r) for r in ranks]
    top = [i for p, r in zip(parts, ranks, strict=True) if r == 16 for i in p]
    positive = sum(task.train[i].label for i in top) / len(top)
    assert out[9] == (
        f"  components 9-16: {len(top) / len(task.train):.3f} of the data, class shares "
        f"{1 - positive:.2f} {positive:.2f}"
    )
    assert out[6].startswith("  components 1-2: 1.000 of the data")
    single = [
        config_file,
        "--seeds",
        "2",
        "--data-dir",
        str(glue_dir),
        "--set",
        "federation.ranks=[8]",
    ]
    monkeypatch.setattr(sys, "argv", ["label_skew.py", *single])
    skew.main()
    assert not any("components" in line for line in capsys.readouterr().out.splitlines())


def test_label_skew_refuses_the_memory_rank_rule_for_mixed_ranks(
    glue_dir: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    skew = _load("experiments/label_skew.py")
    argv = [str(ROOT / "experiments" / "e3_mrpc.toml"), "--data-dir", str(glue_dir)]
    argv += ["--set", "federation.rank_rule=memory", "--set", "federation.memory_budgets_mb=[900]"]
    monkeypatch.setattr(sys, "argv", ["label_skew.py", *argv])
    with pytest.raises(SystemExit):
        skew.main()
    assert "the 'memory' rank rule needs the model" in capsys.readouterr().err


def test_label_skew_names_no_alpha_for_an_iid_partition(
    glue_dir: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    skew = _load("experiments/label_skew.py")
    config_file = str(ROOT / "experiments" / "e1_mrpc.toml")
    argv = [config_file, "--seeds", "0", "--data-dir", str(glue_dir), "--set", "data.partition=iid"]
    monkeypatch.setattr(sys, "argv", ["label_skew.py", *argv])
    skew.main()
    out = capsys.readouterr().out.splitlines()
    assert out[0] == "mrpc, iid, 10 clients, 3668 training examples"
    assert out[1] == "seed 0: 0% of the examples on clients with over 90% of one class"


def test_label_skew_rejects_a_threshold_outside_the_unit_interval(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    skew = _load("experiments/label_skew.py")
    monkeypatch.setattr(sys, "argv", ["label_skew.py", "x.toml", "--threshold", "1.5"])
    with pytest.raises(SystemExit):
        skew.main()
    assert "--threshold must lie in (0, 1), got 1.5" in capsys.readouterr().err


# -- aggregation bias on given updates -------------------------------------------------------


def _update(cid: str, n: int, rank: int, seed: int) -> Any:
    from hlora.aggregation import ClientUpdate, LoraFactors

    gen = torch.Generator().manual_seed(seed)
    factors = {
        "layer": LoraFactors(
            A=torch.randn(rank, 12, generator=gen), B=torch.randn(10, rank, generator=gen)
        )
    }
    return ClientUpdate(cid, n, rank, 2.0, factors)


def test_aggregation_bias_rows_measure_each_strategy_against_the_exact_update() -> None:
    bias = _load("experiments/aggregation_bias.py")
    updates = [_update("a", 30, 4, 1), _update("b", 10, 4, 2)]
    rows = {r["update"]: r for r in bias.round_rows(updates, 2.0, 1)}
    assert set(rows) == {"hlora", "zeropad", "flora", "fedavg", "hlora, rank-4 truncation"}
    assert rows["hlora"]["error"] < 1e-5 and rows["flora"]["error"] < 1e-5
    # Naive averaging: s * mean(B) @ mean(A) against s * mean(B A), by hand.
    a1, b1 = updates[0].factors["layer"].A.double(), updates[0].factors["layer"].B.double()
    a2, b2 = updates[1].factors["layer"].A.double(), updates[1].factors["layer"].B.double()
    exact = 2.0 * (0.75 * b1 @ a1 + 0.25 * b2 @ a2)
    naive = 2.0 * (0.75 * b1 + 0.25 * b2) @ (0.75 * a1 + 0.25 * a2)
    expected = float((naive - exact).norm() / exact.norm())
    assert rows["fedavg"]["error"] == pytest.approx(expected, rel=1e-4)
    assert rows["zeropad"]["error"] == pytest.approx(expected, rel=1e-4)
    assert rows["fedavg"]["norm_ratio"] == pytest.approx(
        float(naive.norm() / exact.norm()), rel=1e-4
    )
    # The exact update has rank 8 > 4: the rank-4 truncation loses the trailing singular values.
    s = torch.linalg.svdvals(exact)
    optimal = float(s[4:].norm() / s.norm())
    assert rows["hlora, rank-4 truncation"]["error"] == pytest.approx(optimal, rel=1e-4)


def test_aggregation_bias_leaves_fedavg_out_for_mixed_ranks() -> None:
    bias = _load("experiments/aggregation_bias.py")
    rows = bias.round_rows([_update("a", 5, 2, 1), _update("b", 5, 4, 2)], 2.0, 3)
    names = [r["update"] for r in rows]
    assert "fedavg" not in names
    assert names[-2:] == ["hlora, rank-2 truncation", "hlora, rank-4 truncation"]
    assert all(r["round"] == 3 for r in rows)


RECIPE_GRID_CELLS = {  # cell -> (task, partition, server optimizer)
    "mrpc-dirichlet": ("mrpc", "dirichlet", "none"),
    "mrpc-iid": ("mrpc", "iid", "none"),
    "mrpc-iid-sgd2": ("mrpc", "iid", "sgd"),
    "qqp-dirichlet": ("qqp-sample", "dirichlet", "none"),
    "qqp-iid": ("qqp-sample", "iid", "none"),
    "qqp-iid-sgd2": ("qqp-sample", "iid", "sgd"),
    "rte-dirichlet": ("rte", "dirichlet", "none"),
    "rte-iid": ("rte", "iid", "none"),
    "rte-iid-sgd2": ("rte", "iid", "sgd"),
}


@pytest.mark.skipif(
    shutil.which("bash") is None or shutil.which("xargs") is None, reason="needs bash and xargs"
)
def test_recipe_grid_cells_run_valid_configurations_with_their_settings(tmp_path: Path) -> None:
    """Every cell of recipe_grid.sh plans E3, E1 and `centralized` per seed, on dev, at the
    default recipe's rounds, with the cell's task, partition and server step; the QQP sample's
    cells train a quarter epoch a round; MRPC's and the QQP sample's references train at their
    own learning rates, and so do the QQP sample's federations under label skew; GRID_SET's
    overrides reach every run."""
    log = tmp_path / "calls.jsonl"
    bin_dir = _recording_hlora(tmp_path, log)
    python = bin_dir / "python"  # the script asks hlora for its rounds
    python.write_text(f'#!/bin/sh\nexec {shlex.quote(sys.executable)} "$@"\n')
    python.chmod(0o755)
    out = tmp_path / "out"
    env = {
        "PATH": f"{bin_dir}:/usr/bin:/bin",
        "SEEDS": "0 1",
        "JOBS": "1",
        "GRID_SET": "model.max_length=96 server.eval_batch_size=8",
    }
    command = ["bash", str(ROOT / "experiments/recipe_grid.sh"), str(out), *RECIPE_GRID_CELLS]
    subprocess.run(command, cwd=ROOT, check=True, env=env, capture_output=True)
    calls = [json.loads(line) for line in log.read_text().splitlines()]
    default = load_config()
    seen: dict[str, set[tuple[str, int]]] = {cell: set() for cell in RECIPE_GRID_CELLS}
    for call in calls:
        config = load_config(ROOT / call[1], _sets(call))
        cell = Path(call[call.index("--output") + 1]).name
        task, partition, optimizer = RECIPE_GRID_CELLS[cell]
        assert (config.data.task, config.data.partition) == (task, partition)
        assert config.server.optimizer == optimizer
        assert config.server.learning_rate == (2.0 if optimizer == "sgd" else 1.0)
        assert config.data.validation_fraction == 0  # the grid reports on dev
        assert config.federation.rounds == default.federation.rounds
        assert (config.model.max_length, config.server.eval_batch_size) == (96, 8)
        qqp = task == "qqp-sample"
        assert config.train.local_epochs == (0.25 if qqp else default.train.local_epochs)
        reference_rate = {"qqp-sample": 1e-3, "mrpc": 5e-4}.get(task)
        if config.federation.strategy == "centralized" and reference_rate:
            assert config.train.learning_rate == reference_rate
        elif qqp and partition == "dirichlet":
            assert config.train.learning_rate == 4e-3
        else:
            assert config.train.learning_rate == default.train.learning_rate
        assert config.output.name.endswith(f"-s{config.federation.seed}")
        seen[cell].add((config.federation.strategy, config.federation.seed))
    runs = {"hlora", "zeropad", "flora", "fedavg", "centralized"}
    for cell, pairs in seen.items():
        assert pairs == {(run, seed) for run in runs for seed in (0, 1)}, cell


@pytest.mark.skipif(
    shutil.which("bash") is None or shutil.which("xargs") is None, reason="needs bash and xargs"
)
def test_recipe_grid_sft_cell_runs_the_demo_per_strategy_at_its_own_length(tmp_path: Path) -> None:
    """The instruction-tuning cell runs the demo's configuration, on dev, at the demo's rounds,
    with each experiment's ranks; `centralized` trains the passes of three clients' local
    epochs a round at rank 16, and `local` is evaluated after its last round only."""
    log = tmp_path / "calls.jsonl"
    bin_dir = _recording_hlora(tmp_path, log)
    python = bin_dir / "python"
    python.write_text(f'#!/bin/sh\nexec {shlex.quote(sys.executable)} "$@"\n')
    python.chmod(0o755)
    env = {
        "PATH": f"{bin_dir}:/usr/bin:/bin",
        "SEEDS": "0",
        "JOBS": "1",
        "REFS": "centralized local",
    }
    command = ["bash", str(ROOT / "experiments/recipe_grid.sh"), str(tmp_path / "out")]
    subprocess.run([*command, "sft-mrpc-dirichlet"], cwd=ROOT, check=True, env=env)
    demo = load_config(ROOT / "examples/smollm2_mrpc_instruct.toml")
    assert demo.federation.clients_per_round == 3 and demo.federation.num_clients == 10
    runs = {}
    for line in log.read_text().splitlines():
        call = json.loads(line)
        assert call[1] == "examples/smollm2_mrpc_instruct.toml"
        config = load_config(ROOT / call[1], _sets(call))
        runs[config.output.name] = config
        assert config.model == demo.model and config.data == demo.data  # dev, the demo's data
        assert config.federation.rounds == demo.federation.rounds
        assert config.federation.clients_per_round == 3
    assert sorted(runs) == sorted(
        f"{run}-s0"
        for run in ("e3-hlora", "e3-zeropad", "e3-flora", "e1-fedavg", "e1-hlora",
                    "e3-centralized", "e3-local")
    )  # fmt: skip
    for name, config in runs.items():
        ranks = (8,) if name.startswith("e1-") else (2, 4, 8, 16)
        assert config.federation.ranks == ranks, name
        assert config.federation.strategy == name.split("-")[1]
        central = config.federation.strategy == "centralized"
        assert config.train.local_epochs == (0.3 if central else demo.train.local_epochs)
        local = config.federation.strategy == "local"
        every = demo.federation.rounds if local else demo.server.eval_every
        assert config.server.eval_every == every, name


@pytest.mark.skipif(
    shutil.which("bash") is None or shutil.which("xargs") is None, reason="needs bash and xargs"
)
def test_recipe_grid_fedsgd_cells_run_the_example_per_strategy(tmp_path: Path) -> None:
    """The FedSGD cells run examples/mrpc_fedsgd.toml on dev at its rounds, with each
    experiment's strategy and ranks, and on IID partitions in the IID cell."""
    log = tmp_path / "calls.jsonl"
    bin_dir = _recording_hlora(tmp_path, log)
    python = bin_dir / "python"
    python.write_text(f'#!/bin/sh\nexec {shlex.quote(sys.executable)} "$@"\n')
    python.chmod(0o755)
    env = {"PATH": f"{bin_dir}:/usr/bin:/bin", "SEEDS": "0", "JOBS": "1", "REFS": ""}
    cells = (
        "mrpc-dirichlet-fedsgd", "mrpc-iid-fedsgd",
        "mrpc-dirichlet-fedsgd-bs4", "mrpc-iid-fedsgd-bs4",
        "qqp-dirichlet-fedsgd", "qqp-iid-fedsgd",
    )  # fmt: skip
    command = ["bash", str(ROOT / "experiments/recipe_grid.sh"), str(tmp_path / "out"), *cells]
    subprocess.run(command, cwd=ROOT, check=True, env=env, capture_output=True)
    example = load_config(ROOT / "examples/mrpc_fedsgd.toml")
    assert (example.train.local_steps, example.train.optimizer) == (1, "sgd")
    assert example.server.optimizer == "adam" and example.train.logit_adjustment == 0
    names: dict[str, set[str]] = {cell: set() for cell in cells}
    for line in log.read_text().splitlines():
        call = json.loads(line)
        assert call[1] == "examples/mrpc_fedsgd.toml"
        config = load_config(ROOT / call[1], _sets(call))
        cell = Path(call[call.index("--output") + 1]).name
        names[cell].add(config.output.name)
        assert config.server.optimizer == "adam"
        if cell.endswith("-bs4"):  # four times the depth: batches of 4, four times the rounds
            assert config.train == replace(example, train={"batch_size": 4}).train
            assert config.federation.rounds == 4 * example.federation.rounds
            assert config.server.eval_every == 4 * example.server.eval_every
            assert config.server.learning_rate == 5e-4
        elif cell.startswith("qqp-"):  # the QQP sample's 4 passes at its own server rate
            assert config.train == example.train
            assert (config.federation.rounds, config.server.eval_every) == (529, 133)
            assert config.server.learning_rate == 2e-3
        else:
            assert config.train == example.train
            assert config.server.learning_rate == example.server.learning_rate
            assert config.federation.rounds == example.federation.rounds
        task = "qqp-sample" if cell.startswith("qqp-") else "mrpc"
        assert config.data.validation_fraction == 0 and config.data.task == task
        assert config.data.partition == ("iid" if "-iid-" in cell else "dirichlet")
        ranks = (8,) if config.output.name.startswith("e1-") else (2, 4, 8, 16)
        assert config.federation.ranks == ranks
        assert config.federation.strategy == config.output.name.split("-")[1]
    for cell in cells:
        assert names[cell] == {
            f"{run}-s0" for run in ("e3-hlora", "e3-zeropad", "e3-flora", "e1-fedavg", "e1-hlora")
        }
    # its references would train the example's way: the cell refuses them
    del env["REFS"]
    refused = subprocess.run(command[:4], cwd=ROOT, env=env, capture_output=True, text=True)
    assert refused.returncode == 2 and "run it with REFS=" in refused.stderr


@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
def test_search_resume_continues_a_run_that_saved_its_config(tmp_path: Path) -> None:
    log = tmp_path / "calls.jsonl"
    bin_dir = _recording_hlora(tmp_path, log)
    out = tmp_path / "out"
    name = "fedavg-fedsgd-adam1e-3-noclip-k4bs4-s1"  # stage fedsgd-local's first run
    (out / name).mkdir(parents=True)
    (out / name / "config.toml").write_text("[federation]\n")
    (out / f"{name}.log").write_text("round 1\n")
    env = {"PATH": "/usr/bin:/bin", "HLORA": str(bin_dir / "hlora"), "RESUME": "1"}
    command = ["bash", str(ROOT / "experiments/recipe_search.sh"), str(out), "fedsgd-local"]
    subprocess.run(command, cwd=ROOT, check=True, env=env)
    calls = [json.loads(line) for line in log.read_text().splitlines()]
    assert ["run", "--resume", f"{out}/{name}", "--no-progress"] in calls
    assert len(calls) == 2 and (out / name / "config.toml").is_file()
    assert (out / f"{name}.log").read_text() == "round 1\ntrained --no-progress\n"
    started = [c for c in calls if c[1] != "--resume"]
    assert started[0][-1] == "output.name=fedavg-fedsgd-adam1e-3-noclip-k4bs4-s0"


RECIPE_STAGES = (
    "screen", "screen2", "split", "silent", "iid", "dirichlet-sgd2",
    "cap", "shorter", "sgd", "steps", "epsilon", "qqp", "qqp2", "central",
    "mrpc-lr", "iid2", "babu", "global-rank", "keep", "ccvr", "decorr", "fedsgd",
    "fedsgd-rank", "fedsgd-eps", "fedsgd-server-factors", "fedsgd-factor-steps", "fedsgd-depth",
    "fedsgd-noclip", "fedsgd-local", "qqp-fedsgd", "qqp-window", "qqp-la",
)  # fmt: skip
SEARCHES = [
    *(
        ("sft_search.sh", stage, 0.2)
        for stage in ("participation", "fewer", "iid", "seed1", "system", "longer", "momentum")
    ),
    *(("recipe_search.sh", stage, 0.1) for stage in RECIPE_STAGES),
]


@pytest.mark.parametrize(("script", "stage", "held_out"), SEARCHES)
@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
def test_searches_run_valid_configurations_on_their_validation_split(
    tmp_path: Path, script: str, stage: str, held_out: float
) -> None:
    """Every run of a stage of a settings search is a valid configuration that evaluates on the
    held-out split, never on dev, under its own name, with its log beside it; a second start
    skips the finished runs."""
    log = tmp_path / "calls.jsonl"
    bin_dir = _recording_hlora(tmp_path, log)
    out = tmp_path / "out"
    env = {"PATH": "/usr/bin:/bin", "HLORA": str(bin_dir / "hlora")}
    command = ["bash", str(ROOT / "experiments" / script), str(out), stage]
    subprocess.run(command, cwd=ROOT, check=True, env=env)
    calls = [json.loads(line) for line in log.read_text().splitlines()]
    assert calls
    names = set()
    for call in calls:
        assert call[0] == "run"
        path = None if call[1] == "--set" else ROOT / call[1]
        config = load_config(path, _sets(call))
        assert config.data.validation_fraction == held_out
        assert config.output.dir == str(out)
        names.add(config.output.name)
        assert (out / f"{config.output.name}.log").read_text().startswith("trained")
    assert len(names) == len(calls)
    for name in names:  # as if every run had finished
        (out / name).mkdir(exist_ok=True)
        (out / name / "summary.json").write_text("{}")
    log.unlink()
    subprocess.run(command, cwd=ROOT, check=True, env=env)
    assert not log.exists()
