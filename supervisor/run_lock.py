"""One supervisor per run folder: an exclusive lock on ``<run_dir>/supervisor.lock``.

A second ``chatq run`` on the same run_dir (say, after someone deleted the
control socket) would take over the control socket and start a second
worker for every tenant, each fighting the first one's over its store. The
lock is flock(2): the kernel drops it when its holder exits, however it
exits, so a SIGKILLed supervisor leaves no stale lock. The file holds the
holder's pid, for the error message. It is opened with O_NOFOLLOW, so a
symlink planted in its place is refused instead of followed, and it is not
inherited by the fork server or the workers (os.open's default).
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from pathlib import Path

from chatq.shared.errors import ControlError, SupervisorRunning

__all__ = ["LOCK_NAME", "hold_run_dir"]

LOCK_NAME = "supervisor.lock"


def hold_run_dir(run_dir: Path) -> int:
    """Lock `run_dir` for this process's lifetime; the lock's fd (keep it open).

    SupervisorRunning naming the holder's pid if another supervisor has it.
    """
    path = run_dir / LOCK_NAME
    try:
        run_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o600)
    except OSError as exc:
        raise ControlError(f"cannot lock the run folder: {path}: {exc.strerror or exc}") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = _holder(fd)
        os.close(fd)
        raise SupervisorRunning(
            f"another supervisor (pid {holder}) is running on {run_dir} (lock {path})"
        ) from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return fd


def _holder(fd: int) -> str:
    with contextlib.suppress(OSError, ValueError):
        return str(int(os.pread(fd, 32, 0).decode().strip()))
    return "unknown"
