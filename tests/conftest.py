"""Shared pytest setup: test helper modules importable, GPU tests skipped without CUDA."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))


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
    import os

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
    """No hub access and no writes into the home folder from any test."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TOKENIZERS_PARALLELISM", "false")
    monkeypatch.setenv("HLORA_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "hlora-cache"))
