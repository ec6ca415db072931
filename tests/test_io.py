"""Atomic writes: the old file or the new one, never a part, and no temporary file left."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from hlora.io import RunFolderBusyError, run_folder_lock, write_bytes_atomic, write_text_atomic


def test_write_replaces_and_leaves_nothing_else(tmp_path: Path) -> None:
    target = tmp_path / "run" / "config.toml"
    write_text_atomic(target, "a = 1\n")
    write_text_atomic(target, "a = 2\n")
    assert target.read_text() == "a = 2\n"
    assert [p.name for p in target.parent.iterdir()] == ["config.toml"]


def test_a_failed_write_keeps_the_old_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    target = tmp_path / "checkpoint.safetensors"
    write_bytes_atomic(target, b"old")

    def broken(src: str, dst: str) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", broken)
    with pytest.raises(OSError, match="disk full"):
        write_bytes_atomic(target, b"new")
    assert target.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint.safetensors"]


def test_one_process_at_a_time_writes_a_run_folder(tmp_path: Path) -> None:
    folder = tmp_path / "run"
    busy = pytest.raises(RunFolderBusyError, match="being written by another process")
    with run_folder_lock(folder), busy, run_folder_lock(folder):
        pass
    with run_folder_lock(folder):  # released when the holder is done
        pass


def test_resume_refuses_a_folder_another_process_is_writing(tmp_path: Path) -> None:
    from hlora.config import load_config, to_toml
    from hlora.federation import resume

    folder = tmp_path / "run"
    folder.mkdir()
    (folder / "config.toml").write_text(to_toml(load_config()))
    with run_folder_lock(folder), pytest.raises(RunFolderBusyError):
        resume(folder, progress=False)
