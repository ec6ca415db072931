"""Shared pytest setup: test helper modules importable, GPU tests skipped without CUDA, one
thread per xdist worker (``make test`` runs two), fixed Hypothesis examples under CI, and the
Flower tests' temporary homes."""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from hypothesis import settings

sys.path.insert(0, str(Path(__file__).parent))

# CI draws the same examples on every run, so that a run that passed here passes there; local
# runs keep drawing new ones.
settings.register_profile("ci", derandomize=True, print_blob=True)
if os.environ.get("CI"):
    settings.load_profile("ci")

if os.environ.get("PYTEST_XDIST_WORKER"):
    # One worker a core: each worker, and every process it starts (Flower's SuperNodes and
    # ClientApps inherit the variable), computes on one thread instead of oversubscribing.
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Skip tests marked ``gpu`` when no CUDA device is present."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def glue_dir() -> Path:
    """The GLUE folder ($HLORA_DATA_DIR, else ../shared/data/glue); skip when absent."""
    env = os.environ.get("HLORA_DATA_DIR")
    candidates = [Path(env)] if env else []
    candidates.append(Path(__file__).resolve().parents[2] / "shared" / "data" / "glue")
    for folder in candidates:
        if (folder / "MRPC" / "train.tsv").is_file():
            return folder
    pytest.skip("GLUE data not found: set HLORA_DATA_DIR")


@pytest.fixture(scope="session")
def tiny_bert_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random BERT classifier saved as a local model folder (loadable by path)."""
    from tiny_models import build_tiny_backbone

    folder = tmp_path_factory.mktemp("tiny-bert")
    backbone = build_tiny_backbone(num_labels=2, seed=0)
    backbone.model.save_pretrained(folder)
    backbone.tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(autouse=True)
def _offline_and_quiet(
    monkeypatch: pytest.MonkeyPatch, tmp_path_factory: pytest.TempPathFactory
) -> None:
    """No hub access and no writes into the home folder from any test.

    hlora's model cache is one folder for the whole session, shared by its xdist workers (the
    parent of a worker's base folder): the SmolLM2 copy is converted once, not once a worker.
    """
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TOKENIZERS_PARALLELISM", "false")
    base = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        base = base.parent
    monkeypatch.setenv("HLORA_CACHE_DIR", str(base / "hlora-cache"))


@pytest.fixture
def flower_env(monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """Temporary homes for Flower, Ray, uv and torch; no telemetry. Yields the folder."""
    # Ray's socket paths must stay short: a folder directly under /tmp, not pytest's tmp_path.
    home = Path(tempfile.mkdtemp(prefix="hlora-flwr-", dir="/tmp"))
    for name, sub in [
        ("FLWR_HOME", "flwr"),
        ("RAY_TMPDIR", "ray"),
        ("UV_CACHE_DIR", "uv"),
        ("TORCHINDUCTOR_CACHE_DIR", "inductor"),
    ]:
        (home / sub).mkdir()
        monkeypatch.setenv(name, str(home / sub))
    monkeypatch.setenv("FLWR_TELEMETRY_ENABLED", "0")
    monkeypatch.setenv("RAY_DEDUP_LOGS", "0")
    try:
        yield home
    finally:
        shutil.rmtree(home, ignore_errors=True)
