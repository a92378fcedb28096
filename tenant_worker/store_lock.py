"""One worker per store: an exclusive lock on a file beside the SQLite file.

Two workers on one store would both replay its queued messages and answer
them twice, and the second would take over the first one's socket. That can
happen when a worker outlives its supervisor's record of it, or when
``python -m chatq.tenant_worker`` is started by hand beside a supervised worker.
The lock is flock(2) on ``<store>.lock``: the kernel drops it when its holder
exits, however it exits, so a SIGKILLed worker never leaves a stale lock. The
file holds the holder's pid, for the error message only. A starting worker
waits a while for the lock, since its predecessor may still be draining.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import os
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

from loguru import logger

from chatq.shared.errors import StoreError, StoreInUse

POLL_SECONDS = 0.1


def lock_path(store: Path) -> Path:
    return store.with_name(store.name + ".lock")


class StoreLock:
    """Held from ``acquire`` until ``release`` (or until the process exits)."""

    def __init__(self, path: Path, fd: int) -> None:
        self.path = path
        self._fd: int | None = fd

    @classmethod
    async def acquire(
        cls,
        store: Path,
        *,
        wait: float = 0.0,
        give_up: Callable[[], bool] = lambda: False,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> StoreLock | None:
        """Take the store's lock, waiting up to ``wait`` s for its holder to exit.

        Raises StoreInUse naming the holder's pid if it is still held then;
        returns None if ``give_up()`` turns true while waiting (a stop).
        """
        path = lock_path(store)
        try:
            path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o600)
        except OSError as exc:
            raise StoreError(f"store lock {path}: {exc.strerror or exc}") from exc
        try:
            deadline = monotonic() + wait
            if not _try_lock(fd) and wait > 0:
                logger.warning(
                    "store {} is in use by another worker (pid {}); waiting up to {:g}s",
                    store,
                    _holder(fd),
                    wait,
                )
            while not _try_lock(fd):
                if monotonic() >= deadline:
                    holder = _holder(fd)
                    raise StoreInUse(
                        f"store {store} is in use by another worker (pid {holder}; lock {path})"
                    )
                await sleep(POLL_SECONDS)
                if give_up():
                    os.close(fd)
                    return None
            with contextlib.suppress(OSError):  # the pid only informs: a full disk must not stop us
                _write_pid(fd)
        except BaseException:
            os.close(fd)
            raise
        return cls(path, fd)

    def release(self) -> None:
        """Let the next worker in. Idempotent."""
        if self._fd is not None:
            os.close(self._fd)  # closing the only descriptor drops the flock
            self._fd = None


def _write_pid(fd: int) -> None:
    """Our pid as the file's one line. Truncated only if the last holder's was
    longer: truncating to nothing and writing again cost ~130 us of CPU (the
    file system's journal) in every worker's boot."""
    line = f"{os.getpid()}\n".encode()
    os.pwrite(fd, line, 0)
    if os.fstat(fd).st_size > len(line):
        os.ftruncate(fd, len(line))


def _try_lock(fd: int) -> bool:
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    return True


def _holder(fd: int) -> str:
    with contextlib.suppress(OSError, ValueError):
        return str(int(os.pread(fd, 32, 0).decode().strip()))
    return "unknown"
