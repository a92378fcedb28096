"""Resource readings of worker processes, and the memory-limit rule.

`ProcessSampler.sample(pid)` reads a process's resident memory, CPU use and
open file descriptors from /proc: one read of /proc/PID/stat and one listing
of /proc/PID/fd (psutil took several reads, and as much Python, for the same:
with 500 workers the watchdog was most of an idle supervisor's CPU). It keeps
each pid's last CPU reading because `cpu_percent` is the CPU used between two
samples: the first sample of a pid reports 0.0, later ones the CPU used since
the previous sample (100.0 = one core busy). Call `forget(pid)` when a worker
is gone so the cache does not grow (and its kept file closes). `rss(pid)` is
one read of /proc/PID/statm, kept open.

`over_memory` is the pure rule the supervisor applies to a sample.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass

__all__ = ["ProcStats", "ProcessSampler", "over_memory"]

_MIB = 1024 * 1024
_PAGE = os.sysconf("SC_PAGE_SIZE")
_TICKS = os.sysconf("SC_CLK_TCK")
# Fields of /proc/PID/stat after the ")" that ends the command name (proc(5), from 0).
_STATE, _UTIME, _STIME, _START, _RSS = 0, 11, 12, 19, 21


@dataclass(frozen=True, slots=True)
class ProcStats:
    """One reading of one process."""

    pid: int
    rss_bytes: int
    cpu_percent: float
    num_fds: int | None  # None: not counted in this reading


@dataclass(frozen=True, slots=True)
class _CpuReading:
    start: int  # the process's start time: a reused pid has another
    cpu_s: float
    at: float  # monotonic


class ProcessSampler:
    """Samples processes by pid, keeping each one's last CPU reading for cpu_percent."""

    def __init__(self) -> None:
        self._cpu: dict[int, _CpuReading] = {}
        self._statm: dict[int, int] = {}  # pid -> its /proc statm, kept open (`rss`)

    def sample(self, pid: int, fds: bool = True) -> ProcStats | None:
        """A reading of `pid`, or None if it is gone (exited, even if not yet reaped).

        `fds` False: no count of its open files (``num_fds`` None), the dearer
        half of a reading (a directory listing): only `status` shows it.
        """
        try:
            fields = _read(f"/proc/{pid}/stat").rpartition(b")")[2].split()
            num_fds = len(os.listdir(f"/proc/{pid}/fd")) if fds else None
        except (FileNotFoundError, ProcessLookupError):
            self.forget(pid)
            return None
        if fields[_STATE] in (b"Z", b"X"):  # exited; only its exit status is left to collect
            self.forget(pid)
            return None
        now = time.monotonic()
        reading = _CpuReading(
            start=int(fields[_START]),
            cpu_s=(int(fields[_UTIME]) + int(fields[_STIME])) / _TICKS,
            at=now,
        )
        last = self._cpu.get(pid)
        self._cpu[pid] = reading
        percent = 0.0
        if last is not None and last.start == reading.start and now > last.at:
            percent = max(0.0, (reading.cpu_s - last.cpu_s) / (now - last.at) * 100)
        return ProcStats(
            pid=pid,
            rss_bytes=int(fields[_RSS]) * _PAGE,
            cpu_percent=round(percent, 1),
            num_fds=num_fds,
        )

    def rss(self, pid: int) -> int | None:
        """Only the resident memory of `pid` (one /proc read), or None if it is gone.

        Its statm file is kept open between readings (`forget` closes it): a
        read at offset 0 renders it anew, 2 us against 9 for open, read and
        close, 100 times a second with 500 workers. A kept file also stays
        that process's, whatever process gets its pid later.
        """
        try:
            fd = self._statm.get(pid)
            if fd is None:
                fd = self._statm[pid] = os.open(f"/proc/{pid}/statm", os.O_RDONLY | os.O_CLOEXEC)
            return int(os.pread(fd, 4096, 0).split()[1]) * _PAGE
        except (FileNotFoundError, ProcessLookupError, IndexError):
            # IndexError: the pid exited while we read (an empty file).
            self.forget(pid)
            return None
        except OSError:  # e.g. out of file descriptors: this reading only, the old way
            self.forget(pid)
            try:
                return int(_read(f"/proc/{pid}/statm").split()[1]) * _PAGE
            except (OSError, IndexError):
                return None

    def forget(self, pid: int) -> None:
        """Drop what is kept for `pid` (a new process with the same pid starts afresh)."""
        self._cpu.pop(pid, None)
        fd = self._statm.pop(pid, None)
        if fd is not None:
            os.close(fd)


def _read(path: str) -> bytes:
    """A small /proc file in one read (open() alone adds four system calls)."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        return os.read(fd, 4096)
    finally:
        os.close(fd)


def over_memory(stats: ProcStats, limit_mb: int | None) -> bool:
    """Whether the process uses more resident memory than `limit_mb` MiB (None: no limit)."""
    return limit_mb is not None and stats.rss_bytes > limit_mb * _MIB
