"""Helpers shared by the Flower engine's tests (simulation and deployment)."""

from __future__ import annotations

import json
from pathlib import Path

from hlora.config import RunConfig, load_config
from hlora.data.glue import load_task
from tiny_models import tiny_overrides


def read_records(run_dir: Path) -> list[dict]:
    """The run's ``metrics.jsonl``, one dict a round."""
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def tiny_config(tiny_bert_dir: Path, glue_dir: Path, out: Path, **extra: object) -> RunConfig:
    """The tiny BERT federation of ``tiny_overrides`` with ``extra`` settings."""
    return load_config(None, tuple(tiny_overrides(tiny_bert_dir, glue_dir, out, **extra)))


def own_files(glue_dir: Path, folder: Path, sizes: list[int]) -> tuple[list[Path], Path]:
    """Disjoint slices of MRPC train written as each node's own JSONL file, and a dev file."""
    from test_own_data import write_jsonl

    task = load_task("mrpc", glue_dir)
    folder.mkdir(parents=True, exist_ok=True)
    files, start = [], 0
    for k, size in enumerate(sizes):
        files.append(write_jsonl(folder / f"node{k}.jsonl", list(task.train[start : start + size])))
        start += size
    return files, write_jsonl(folder / "dev.jsonl", list(task.dev[:24]))
