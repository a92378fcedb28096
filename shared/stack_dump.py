"""A hung child's Python stacks, dumped on a signal for its supervisor to log.

A child whose event loop is blocked cannot send anything up its pipe, but
faulthandler's handler is C code that runs whatever the interpreter is doing:
on `DUMP_SIGNAL` it writes every thread's stack to a file in run_dir. The
supervisor sends the signal when it finds the child hung, SIGKILLs it a
moment later (a blocked loop cannot drain), then logs the file and removes
it, so the operator sees where it hung (gunicorn does this on a worker timeout).
"""

from __future__ import annotations

import contextlib
import faulthandler
import os
import signal
from pathlib import Path

__all__ = ["DUMP_SIGNAL", "MAX_STACK_LINES", "arm", "collect", "stacks_path"]

DUMP_SIGNAL = signal.SIGUSR1
MAX_STACK_LINES = 200  # a few dozen threads' stacks; a runaway dump is cut
_MAX_BYTES = 256 * 1024
_armed: list[int] = []  # faulthandler writes to the fd: keep it open


def stacks_path(run_dir: Path, name: str) -> Path:
    """Where the program `name` (a tenant id, or "gateway") dumps its stacks."""
    return run_dir / f"{name}.stacks"


def arm(path: Path) -> None:
    """In the child: dump every thread's stack to `path` on DUMP_SIGNAL.

    Best effort: without the file the child is still killed, only without stacks.
    """
    flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC
    try:
        fd = os.open(path, flags, 0o600)
    except OSError:
        return
    # A bare descriptor, not a text file object: creating the first text file
    # in a fresh worker cost ~0.8 MB of its private memory.
    faulthandler.register(DUMP_SIGNAL, file=fd, all_threads=True)
    _armed[:] = [fd]


def collect(path: Path) -> list[str]:
    """In the supervisor: the dumped stack lines (at most MAX_STACK_LINES); removes the file."""
    try:
        with open(path, "rb") as file:
            raw = file.read(_MAX_BYTES)
    except OSError:
        return []
    finally:
        with contextlib.suppress(OSError):
            path.unlink()
    lines = [line for line in raw.decode("utf-8", "replace").splitlines() if line.strip()]
    if len(lines) > MAX_STACK_LINES:
        lines = [*lines[:MAX_STACK_LINES], f"... {len(lines) - MAX_STACK_LINES} more lines"]
    return lines
