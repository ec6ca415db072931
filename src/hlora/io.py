"""Atomic file writes (the one place a run folder's files are written), the run folder's lock,
and where hlora caches what it derives once (converted models, tokenized features).

A crash, even ``SIGKILL``, leaves either the old file or the new one, never a part of one: the
data goes to a uniquely named temporary file in the same folder, is flushed with ``fsync``, moved
over the target with :func:`os.replace`, and the folder's entry table is synced.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

from hlora.errors import HloraError

CACHE_DIR_ENV = "HLORA_CACHE_DIR"
"""Environment variable naming hlora's cache folder."""


def default_cache_dir() -> Path:
    """hlora's cache folder: ``$HLORA_CACHE_DIR``, else ``$XDG_CACHE_HOME/hlora``, else
    ``~/.cache/hlora``."""
    env = os.environ.get(CACHE_DIR_ENV, "").strip()
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME", "").strip()
    return (Path(xdg).expanduser() if xdg else Path.home() / ".cache") / "hlora"


class RunFolderBusyError(HloraError):
    """Another process is writing the run folder."""


def _fsync_dir(folder: Path) -> None:
    """Flush a folder's entry table to disk (so a rename survives a power cut); POSIX only."""
    if os.name != "posix":
        return
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_bytes_atomic(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` all at once: temporary file, ``fsync``, :func:`os.replace`.

    Readers see either the old file or the new one, never a part. The temporary file lies in the
    same folder (a rename across file systems would not be atomic) and is removed on failure.

    Args:
        path: The file to write; its parent folders are created.
        data: The complete new contents.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as tmp:
            tmp.write(data)
            tmp.flush()
            os.fsync(tmp.fileno())
        os.replace(tmp_name, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp_name)
        raise
    _fsync_dir(path.parent)


def write_text_atomic(path: str | Path, text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` atomically (see :func:`write_bytes_atomic`)."""
    write_bytes_atomic(Path(path), text.encode("utf-8"))


LOCK_FILE = ".lock"


@contextlib.contextmanager
def run_folder_lock(folder: Path) -> Iterator[None]:
    """Hold ``folder``'s lock: one process at a time writes a run folder.

    An exclusive ``flock`` on ``folder/.lock``, released when the block ends or the process dies
    (even by ``SIGKILL``), so a crashed run never leaves a stale lock. POSIX only; elsewhere the
    block runs unlocked.

    Raises:
        RunFolderBusyError: Another process holds the lock.
    """
    folder.mkdir(parents=True, exist_ok=True)
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not POSIX
        yield
        return
    with open(folder / LOCK_FILE, "a+b") as handle:
        try:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError as err:
            raise RunFolderBusyError(
                f"run folder '{folder}' is being written by another process (its '{LOCK_FILE}' "
                "is locked): wait for it to finish or stop it first"
            ) from err
        try:
            yield
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)
