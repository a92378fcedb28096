"""Resource readings of worker processes, and the memory-limit rule.

`ProcessSampler.sample(pid)` reads a process's resident memory, CPU use and
open file descriptors through psutil. It keeps one `psutil.Process` per pid
because psutil measures `cpu_percent` between two calls on the *same* object:
the first sample of a pid reports 0.0, later ones the CPU used since the
previous sample (100.0 = one core busy). Call `forget(pid)` when a worker is
gone so the cache does not grow.

`over_memory` is the pure rule the supervisor applies to a sample.
"""

from __future__ import annotations

from dataclasses import dataclass

import psutil

__all__ = ["ProcStats", "ProcessSampler", "over_memory"]

_MIB = 1024 * 1024


@dataclass(frozen=True, slots=True)
class ProcStats:
    """One reading of one process."""

    pid: int
    rss_bytes: int
    cpu_percent: float
    num_fds: int


class ProcessSampler:
    """Samples processes by pid, keeping state between samples for cpu_percent."""

    def __init__(self) -> None:
        self._procs: dict[int, psutil.Process] = {}

    def sample(self, pid: int) -> ProcStats | None:
        """A reading of `pid`, or None if it is gone (exited, even if not yet reaped).

        psutil.AccessDenied (a process of another user) is let through: the
        supervisor only samples its own children.
        """
        try:
            proc = self._process(pid)
            with proc.oneshot():
                # A zombie has exited; only its exit status is left to collect.
                if proc.status() == psutil.STATUS_ZOMBIE:
                    raise psutil.NoSuchProcess(pid)
                stats = ProcStats(
                    pid=pid,
                    rss_bytes=proc.memory_info().rss,
                    cpu_percent=proc.cpu_percent(interval=None),
                    num_fds=proc.num_fds(),
                )
        except psutil.NoSuchProcess:  # includes ZombieProcess
            self.forget(pid)
            return None
        return stats

    def rss(self, pid: int) -> int | None:
        """Only the resident memory of `pid` (one /proc read), or None if it is gone."""
        try:
            return int(self._process(pid).memory_info().rss)
        except psutil.NoSuchProcess:
            self.forget(pid)
            return None

    def forget(self, pid: int) -> None:
        """Drop what is kept for `pid` (a new process with the same pid starts afresh)."""
        self._procs.pop(pid, None)

    def _process(self, pid: int) -> psutil.Process:
        proc = self._procs.get(pid)
        if proc is None:
            proc = self._procs[pid] = psutil.Process(pid)
        elif not proc.is_running():
            # is_running() also compares creation times: if the pid was reused,
            # the process we were asked about is gone, whoever holds it now.
            raise psutil.NoSuchProcess(pid)
        return proc


def over_memory(stats: ProcStats, limit_mb: int | None) -> bool:
    """Whether the process uses more resident memory than `limit_mb` MiB (None: no limit)."""
    return limit_mb is not None and stats.rss_bytes > limit_mb * _MIB
