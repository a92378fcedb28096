"""ProcessSampler on real processes; the pure memory-limit rule."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator

import pytest

from chatq.supervisor.watchdog import ProcessSampler, ProcStats, over_memory


@pytest.fixture
def child() -> Iterator[subprocess.Popen[bytes]]:
    """A child that burns CPU until killed; yielded once it runs (a process
    sampled in the middle of its exec can show no memory at all)."""
    code = "print('up', flush=True)\nwhile True: pass"
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE)
    assert proc.stdout is not None and proc.stdout.readline() == b"up\n"
    yield proc
    proc.kill()
    proc.wait(timeout=10)
    proc.stdout.close()


def test_sample_own_process() -> None:
    stats = ProcessSampler().sample(os.getpid())
    assert stats is not None
    assert stats.pid == os.getpid()
    assert stats.rss_bytes > 1024 * 1024
    assert stats.num_fds >= 3  # at least stdin, stdout, stderr
    assert stats.cpu_percent >= 0.0


def test_sample_child_and_cpu_between_calls(child: subprocess.Popen[bytes]) -> None:
    sampler = ProcessSampler()
    first = sampler.sample(child.pid)
    assert first is not None
    assert first.rss_bytes > 0
    assert first.cpu_percent == 0.0  # psutil's first reading has no interval yet
    time.sleep(0.3)
    second = sampler.sample(child.pid)
    assert second is not None
    assert second.cpu_percent > 0.0  # the cached Process measured the interval


def test_exited_child_is_gone_even_before_reaping(child: subprocess.Popen[bytes]) -> None:
    sampler = ProcessSampler()
    assert sampler.sample(child.pid) is not None
    child.kill()
    deadline = time.monotonic() + 5
    while sampler.sample(child.pid) is not None:  # a zombie until wait() reaps it
        assert time.monotonic() < deadline
        time.sleep(0.01)
    child.wait(timeout=5)
    assert sampler.sample(child.pid) is None


def test_never_existing_pid_is_none() -> None:
    assert ProcessSampler().sample(2**31 - 1) is None


def test_forget_starts_a_pid_afresh(child: subprocess.Popen[bytes]) -> None:
    sampler = ProcessSampler()
    sampler.sample(child.pid)
    time.sleep(0.1)
    sampler.forget(child.pid)
    again = sampler.sample(child.pid)
    assert again is not None
    assert again.cpu_percent == 0.0  # a new psutil.Process: no interval yet
    sampler.forget(12345678)  # unknown pids are fine


def _open_files() -> int:
    return len(os.listdir("/proc/self/fd"))


def test_rss_keeps_one_file_open_per_pid_until_forgotten(child: subprocess.Popen[bytes]) -> None:
    """Opening /proc/PID/statm for each reading was most of its cost (100 readings a
    second at 500 workers): the file is kept, and read again from its start."""
    sampler = ProcessSampler()
    before = _open_files()
    first = sampler.rss(child.pid)
    assert first is not None and first > 0
    assert sampler.rss(child.pid) is not None
    assert _open_files() == before + 1
    sampler.forget(child.pid)
    assert _open_files() == before


def test_rss_of_a_reaped_child_is_none_and_closes_its_file(
    child: subprocess.Popen[bytes],
) -> None:
    sampler = ProcessSampler()
    before = _open_files()
    assert sampler.rss(child.pid) is not None
    child.kill()
    child.wait(timeout=5)
    assert sampler.rss(child.pid) is None
    assert _open_files() == before


def stats(rss_bytes: int) -> ProcStats:
    return ProcStats(pid=1, rss_bytes=rss_bytes, cpu_percent=0.0, num_fds=3)


def test_over_memory_rule() -> None:
    mib = 1024 * 1024
    assert not over_memory(stats(10**12), None)
    assert not over_memory(stats(100 * mib), 100)
    assert over_memory(stats(100 * mib + 1), 100)
    assert not over_memory(stats(0), 1)
