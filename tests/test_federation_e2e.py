"""End-to-end federated runs on a tiny random BERT and real MRPC slices (in-process engine)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from hlora.checkpoint import load_state
from hlora.cli import main
from hlora.config import load_config
from hlora.federation import run
from hlora.runtime import ModelRuntime
from tiny_models import tiny_overrides


def _records(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize(
    ("strategy", "ranks"),
    [
        ("hlora", "[2, 4]"),
        ("fedavg", "[4]"),
        ("zeropad", "[2, 4]"),
        ("flora", "[2, 4]"),
        ("centralized", "[2, 4]"),
        ("local", "[2, 4]"),
    ],
)
def test_every_strategy_end_to_end(
    strategy: str, ranks: str, tiny_bert_dir: Path, glue_dir: Path, tmp_path: Path
) -> None:
    overrides = tiny_overrides(
        tiny_bert_dir,
        glue_dir,
        tmp_path,
        **{"federation.strategy": strategy, "federation.ranks": ranks, "output.name": strategy},
    )
    result = run(load_config(None, tuple(overrides)), progress=False)
    records = _records(result.run_dir)
    assert [r["round"] for r in records] == [1, 2]
    for record in records:
        assert set(record["eval"]) >= {"accuracy", "f1", "loss"}
        assert 0.0 <= record["eval"]["accuracy"] <= 1.0
        assert record["bytes_sent"] > 0 and record["bytes_received"] > 0
        assert all(c["accepted"] for c in record["clients"])
    expected_clients = 1 if strategy == "centralized" else 3
    assert len(records[0]["clients"]) == expected_clients
    summary = json.loads((result.run_dir / "summary.json").read_text())
    assert summary["rounds"] == 2 and summary["strategy"] == strategy
    assert (result.run_dir / "convergence.png").stat().st_size > 1000
    assert load_state(result.run_dir / "checkpoint.safetensors").round_num == 2
    adapters = sorted(p.name for p in (result.run_dir / "adapters").glob("r*"))
    if strategy == "local":
        assert adapters == []
    elif strategy == "centralized":
        assert adapters == ["r4"]
    else:
        assert adapters == sorted({f"r{r}" for r in json.loads(ranks)})
    if strategy in ("hlora", "zeropad"):
        assert set(records[-1]["eval_by_rank"]) == {"2", "4"}


@pytest.mark.parametrize("strategy", ["hlora", "zeropad", "fedavg"])
def test_single_client_global_update_is_its_own_update(
    strategy: str,
    tiny_bert_dir: Path,
    glue_dir: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    replies = []
    original = ModelRuntime.train_client

    def spy(self, instruction, features):  # type: ignore[no-untyped-def]
        reply = original(self, instruction, features)
        replies.append(reply)
        return reply

    monkeypatch.setattr(ModelRuntime, "train_client", spy)
    overrides = tiny_overrides(
        tiny_bert_dir,
        glue_dir,
        tmp_path,
        **{
            "federation.strategy": strategy,
            "federation.num_clients": 1,
            "federation.ranks": "[4]",
            "federation.rounds": 1,
        },
    )
    result = run(load_config(None, tuple(overrides)), progress=False)
    state = load_state(result.run_dir / "checkpoint.safetensors")
    assert state.global_update is not None
    (reply,) = replies
    scaling = reply.update.scaling
    for name, factors in reply.update.factors.items():
        own = factors.delta(scaling)
        assert float(own.norm()) > 0
        torch.testing.assert_close(
            state.global_update.layers[name].dense(), own, rtol=1e-5, atol=1e-6
        )


def test_bad_inputs_exit_with_one_line_and_write_nothing(
    tiny_bert_dir: Path, glue_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "runs"
    cases = [
        (["--set", "model.name=./no/such/model"], "model folder './no/such/model' does not exist"),
        (
            ["--set", f'data.data_dir="{tmp_path / "nodata"}"', "--set", "data.task=rte"],
            "HLORA_DATA_DIR",
        ),
        (["--set", "federation.ranks=[64]"], "rank 64"),
        (["--set", "federation.rounds=0"], "invalid value for 'federation.rounds': 0"),
    ]
    for extra, message in cases:
        overrides = tiny_overrides(tiny_bert_dir, glue_dir, out)
        argv = ["run", "--no-progress"]
        for o in overrides:
            argv += ["--set", o]
        code = main([*argv, *extra])
        err = capsys.readouterr().err.strip()
        assert code == 2, err
        assert err.startswith("hlora: error: ") and len(err.splitlines()) == 1
        assert message in err
        assert not out.exists() or not any(out.iterdir())


def test_resume_after_sigkill_matches_uninterrupted_run(
    tiny_bert_dir: Path, glue_dir: Path, tmp_path: Path
) -> None:
    # The tiny model trains a round in a fraction of a second: many rounds make sure the kill
    # lands inside the run, and the kill comes as soon as two rounds are logged (so the process
    # is inside a later round, or between a metrics line and its checkpoint).
    ROUNDS = 25

    def command(name: str) -> list[str]:
        overrides = tiny_overrides(
            tiny_bert_dir,
            glue_dir,
            tmp_path,
            **{"federation.rounds": ROUNDS, "output.name": name, "data.train_limit": 96},
        )
        argv = [sys.executable, "-m", "hlora.cli", "run", "--no-progress"]
        for o in overrides:
            argv += ["--set", o]
        return argv

    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    subprocess.run(command("straight"), check=True, env=env, capture_output=True)

    victim = subprocess.Popen(
        command("killed"), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    metrics = tmp_path / "killed" / "metrics.jsonl"
    deadline = time.monotonic() + 120
    try:
        while time.monotonic() < deadline:
            if metrics.exists() and metrics.read_text().count("\n") >= 2:
                break
            if victim.poll() is not None:
                pytest.fail("the run ended before it could be killed")
            time.sleep(0.01)
        victim.send_signal(signal.SIGKILL)
    finally:
        victim.wait(timeout=30)
    assert victim.returncode == -signal.SIGKILL
    done = len(_records(tmp_path / "killed"))
    assert done < ROUNDS, "the kill came too late to interrupt a round"

    resumed = subprocess.run(
        [
            sys.executable,
            "-m",
            "hlora.cli",
            "run",
            "--no-progress",
            "--resume",
            str(tmp_path / "killed"),
        ],
        env=env,
        capture_output=True,
        text=True,
    )
    assert resumed.returncode == 0, resumed.stderr

    def comparable(records: list[dict]) -> list[dict]:
        keep = ("round", "train_loss", "eval", "eval_by_rank", "bytes_sent", "bytes_received")
        return [
            {**{k: r.get(k) for k in keep}, "losses": [c["loss"] for c in r["clients"]]}
            for r in records
        ]

    straight = comparable(_records(tmp_path / "straight"))
    again = comparable(_records(tmp_path / "killed"))
    assert [r["round"] for r in again] == list(range(1, ROUNDS + 1))
    assert again == straight


def test_resume_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["run", "--resume", str(tmp_path)]) == 2
    assert "is not a run folder" in capsys.readouterr().err


def test_corrupt_checkpoint_is_reported(
    tiny_bert_dir: Path, glue_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    overrides = tiny_overrides(
        tiny_bert_dir, glue_dir, tmp_path, **{"federation.rounds": 1, "output.name": "c"}
    )
    result = run(load_config(None, tuple(overrides)), progress=False)
    checkpoint = result.run_dir / "checkpoint.safetensors"
    checkpoint.write_bytes(checkpoint.read_bytes()[:100])
    assert main(["run", "--resume", str(result.run_dir)]) == 2
    assert "checkpoint.safetensors' is corrupt or unreadable" in capsys.readouterr().err
    assert main(["export", str(result.run_dir), "--rank", "2"]) == 2
    assert "is corrupt or unreadable" in capsys.readouterr().err


def test_export_adapter_and_merged_model_agree(
    tiny_bert_dir: Path, glue_dir: Path, tmp_path: Path
) -> None:
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    overrides = tiny_overrides(
        tiny_bert_dir, glue_dir, tmp_path, **{"federation.rounds": 1, "output.name": "e"}
    )
    result = run(load_config(None, tuple(overrides)), progress=False)
    # Rank 32 = min(out, in) of the tiny model's layers: the adapter is the whole update.
    assert main(["export", str(result.run_dir), "--rank", "32", "--out", str(tmp_path / "a")]) == 0
    assert (
        main(["export", str(result.run_dir), "--rank", "2", "--merged", str(tmp_path / "m")]) == 0
    )
    tokenizer = AutoTokenizer.from_pretrained(tiny_bert_dir)
    batch = tokenizer(["the movie was good"], ["the film was great"], return_tensors="pt")
    base = AutoModelForSequenceClassification.from_pretrained(tiny_bert_dir, num_labels=2)
    adapted = PeftModel.from_pretrained(base, tmp_path / "a").eval()
    merged = AutoModelForSequenceClassification.from_pretrained(tmp_path / "m").eval()
    with torch.no_grad():
        torch.testing.assert_close(
            adapted(**batch).logits, merged(**batch).logits, rtol=1e-4, atol=1e-5
        )
    assert main(["export", str(result.run_dir), "--rank", "0"]) == 2


def test_compare_draws_one_plot_and_one_table(
    tiny_bert_dir: Path, glue_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["compare", "--no-progress", "--strategies", "hlora,zeropad"]
    for o in tiny_overrides(
        tiny_bert_dir, glue_dir, tmp_path, **{"federation.rounds": 1, "output.name": "cmp"}
    ):
        argv += ["--set", o]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "hlora" in out and "zeropad" in out
    assert (tmp_path / "cmp" / "comparison.png").stat().st_size > 1000
    assert len(json.loads((tmp_path / "cmp" / "comparison.json").read_text())) == 2


@pytest.mark.slow
def test_real_minilm_on_a_64_example_mrpc_slice(glue_dir: Path, tmp_path: Path) -> None:
    overrides = (
        f'data.data_dir="{glue_dir}"',
        "data.train_limit=64",
        "data.dev_limit=32",
        "federation.num_clients=2",
        "federation.rounds=1",
        "federation.ranks=[2, 8]",
        f'output.dir="{tmp_path}"',
        "output.progress=false",
    )
    result = run(load_config(None, overrides), progress=False)
    (record,) = _records(result.run_dir)
    assert record["eval"]["accuracy"] > 0.0
    assert [c["rank"] for c in record["clients"]] == [2, 8]
    assert (result.run_dir / "adapters" / "r8" / "adapter_model.safetensors").is_file()


@pytest.mark.slow
def test_smollm2_decoder_federation(glue_dir: Path, tmp_path: Path) -> None:
    overrides = (
        "model.name=smollm2-135m",
        f'data.data_dir="{glue_dir}"',
        "data.train_limit=8",
        "data.dev_limit=8",
        "federation.num_clients=2",
        "federation.rounds=1",
        "federation.ranks=[2, 4]",
        "train.batch_size=4",
        "model.max_length=48",
        f'output.dir="{tmp_path}"',
        "output.progress=false",
    )
    result = run(load_config(None, overrides), progress=False)
    (record,) = _records(result.run_dir)
    assert 0.0 <= record["eval"]["accuracy"] <= 1.0
    assert (result.run_dir / "adapters" / "r4" / "adapter_config.json").is_file()


def test_export_takes_the_label_count_from_the_task(
    glue_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A RoBERTa head's first tensor is a (hidden, hidden) dense layer, not the label vector.
    from transformers import BertTokenizerFast, RobertaConfig, RobertaForSequenceClassification

    from tiny_models import build_tiny_backbone

    tokenizer: BertTokenizerFast = build_tiny_backbone().tokenizer
    config = RobertaConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=80,
        type_vocab_size=2,
        num_labels=2,
        pad_token_id=tokenizer.pad_token_id,
    )
    folder = tmp_path / "tiny-roberta"
    torch.manual_seed(0)
    RobertaForSequenceClassification(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    overrides = tiny_overrides(
        folder, glue_dir, tmp_path, **{"federation.rounds": 1, "model.target_modules": '["query"]'}
    )
    result = run(load_config(None, tuple(overrides)), progress=False)
    assert main(["export", str(result.run_dir), "--rank", "2", "--out", str(tmp_path / "a")]) == 0
    saved = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    assert saved["r"] == 2
