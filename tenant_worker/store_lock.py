"""One worker per store: an exclusive lock on a file beside the SQLite file.

Two workers on one store would both replay its queued messages and answer
them twice, and the second would take over the first one's socket. That can
happen when a worker outlives its supervisor's record of it, or when
``python -m tenant_worker`` is started by hand beside a supervised worker.
The lock is flock(2) on ``<store>.lock``: the kernel drops it when its holder
exits, however it exits, so a SIGKILLed worker never leaves a stale lock. The
file holds the holder's pid, for the error message only.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from pathlib import Path

from shared.errors import StoreError


def lock_path(store: Path) -> Path:
    return store.with_name(store.name + ".lock")


class StoreLock:
    """Held from ``acquire`` until ``release`` (or until the process exits)."""

    def __init__(self, path: Path, fd: int) -> None:
        self.path = path
        self._fd: int | None = fd

    @classmethod
    def acquire(cls, store: Path) -> StoreLock:
        """Take the store's lock; StoreError naming the holder's pid if it is held.

        No waiting: a worker's lock goes with its process, and the supervisor
        starts a tenant's next worker only after the last one has exited.
        """
        path = lock_path(store)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        except OSError as exc:
            raise StoreError(f"store lock {path}: {exc.strerror or exc}") from exc
        try:
            _lock(fd, store, path)
        except BaseException:
            os.close(fd)
            raise
        return cls(path, fd)

    def release(self) -> None:
        """Let the next worker in. Idempotent."""
        if self._fd is not None:
            os.close(self._fd)  # closing the only descriptor drops the flock
            self._fd = None


def _lock(fd: int, store: Path, path: Path) -> None:
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        raise StoreError(
            f"store {store} is in use by another worker (pid {_holder(fd)}; lock {path})"
        ) from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)


def _holder(fd: int) -> str:
    with contextlib.suppress(OSError, ValueError):
        return str(int(os.pread(fd, 32, 0).decode().strip()))
    return "unknown"
