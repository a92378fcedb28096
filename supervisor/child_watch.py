"""Knowing each worker by its pid, whatever happens to the fork server.

Workers are the fork server's children. A multiprocessing sentinel is a pipe
from the fork server, so when the fork server dies every sentinel closes and
every live worker looked dead (exit 255): all were "restarted" beside
themselves, and one hung at that moment was orphaned to pid 1, never killed,
holding its store lock. So:

- the supervisor is the **child subreaper** of everything it starts
  (``prctl(PR_SET_CHILD_SUBREAPER)``): orphans come to it, not to pid 1;
- each worker is watched through a **pidfd** (``os.pidfd_open``), which
  becomes readable when that very process exits, not when a pipe closes;
- its exit status comes from ``waitid`` on the pidfd once it is our child
  (reparented), else from the fork server as before;
- `reap_orphans` collects other orphans that end here (a handler's
  daemonised grandchild), so no zombie piles up;
- where no pidfd could be had, an exit reported by the fork server is
  checked: a worker still running is SIGKILLed (`kill_if_ours`) before its
  replacement starts, so two never share a store.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
from multiprocessing import forkserver
from multiprocessing.process import BaseProcess

import psutil

__all__ = ["ChildWatch", "become_subreaper", "kill_if_ours", "reap_orphans"]

_PR_SET_CHILD_SUBREAPER = 36
FORKSERVER_REPORT_S = 1.0  # how long the fork server may take to report an exit


def become_subreaper() -> bool:
    """Make orphaned descendants this process's children; False where unsupported."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return bool(libc.prctl(_PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) == 0)
    except (OSError, AttributeError):
        return False


class ChildWatch:
    """A pidfd on one worker: readable once that process has exited."""

    def __init__(self, pid: int, fd: int) -> None:
        self.pid = pid
        self.fd = fd

    @classmethod
    def open(cls, pid: int | None) -> ChildWatch | None:
        """Watch `pid`; None if it cannot be (already gone, no pidfd support)."""
        if pid is None:
            return None
        try:
            return cls(pid, os.pidfd_open(pid))
        except (OSError, AttributeError):
            return None

    def fileno(self) -> int:
        return self.fd

    def exit_code(self, process: BaseProcess, wait: float = FORKSERVER_REPORT_S) -> int | None:
        """The exit code of the exited process (negative: killed by that signal).

        Our own child (reparented after the fork server died) is reaped here;
        the fork server's child is reaped by the fork server, which reports
        the code a moment after the exit (waited for up to `wait` s). None if
        nobody can tell.
        """
        try:
            result = os.waitid(os.P_PIDFD, self.fd, os.WEXITED | os.WNOHANG)
        except ChildProcessError:
            result = None  # not ours: the fork server reaps it and reports
        if result is not None:
            return -result.si_status if result.si_code != os.CLD_EXITED else result.si_status
        process.join(wait)
        code = process.exitcode
        return None if code == 255 and not _forkserver_alive() else code

    def close(self) -> None:
        with contextlib.suppress(OSError):
            os.close(self.fd)


def _forkserver_pid() -> int | None:
    return getattr(getattr(forkserver, "_forkserver", None), "_forkserver_pid", None)


def _forkserver_alive() -> bool:
    pid = _forkserver_pid()
    if pid is None:
        return False
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def kill_if_ours(pid: int) -> bool:
    """SIGKILL `pid` if it still runs as one of ours (our child or the fork server's)."""
    try:
        proc = psutil.Process(pid)
        if proc.status() == psutil.STATUS_ZOMBIE:
            return False
        if proc.ppid() not in {os.getpid(), _forkserver_pid()}:
            return False  # not ours (or the pid was reused): leave it be
        proc.kill()  # psutil checks the pid was not reused since it looked
    except psutil.Error:
        return False
    return True


def reap_orphans(watched: set[int]) -> list[int]:
    """Reap exited children that nobody else waits for; their pids.

    Skips the workers (their pidfds report them) and the fork server
    (multiprocessing waits for it, and restarts it on the next spawn).
    First a peek (``waitid(WNOWAIT)``): no exited child, the usual case, costs
    one system call; psutil's list of children reads the stat file of every
    process on the host.
    """
    keep = watched | {pid for pid in (_forkserver_pid(),) if pid is not None}
    reaped = []
    while (pid := _exited_child()) is not None and pid not in keep:
        with contextlib.suppress(ChildProcessError):
            os.waitpid(pid, os.WNOHANG)
            reaped.append(pid)
    if pid is None:
        return reaped
    with contextlib.suppress(psutil.Error):  # one of ours is first in line: look at each
        for child in psutil.Process().children():
            if child.pid in keep:
                continue
            with contextlib.suppress(psutil.Error, ChildProcessError):
                if child.status() == psutil.STATUS_ZOMBIE:
                    os.waitpid(child.pid, os.WNOHANG)
                    reaped.append(child.pid)
    return reaped


def _exited_child() -> int | None:
    """The pid of an exited child, left unreaped; None if there is none."""
    try:
        found = os.waitid(os.P_ALL, 0, os.WEXITED | os.WNOHANG | os.WNOWAIT)
    except ChildProcessError:  # no children at all
        return None
    return found.si_pid if found is not None else None
