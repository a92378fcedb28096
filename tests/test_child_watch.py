"""ChildWatch: a worker's exit seen through its pidfd, its code read by waitid."""

from __future__ import annotations

import contextlib
import os
import select
import signal
import time
from typing import Any

import psutil
import pytest

from chatq.supervisor.child_watch import ChildWatch, kill_if_ours, reap_orphans


def fork_child(code: int | None) -> int:
    """A child of this process that exits with `code`, or waits to be killed (None)."""
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        if code is None:
            time.sleep(30)
        os._exit(code or 0)
    return pid


def wait_readable(fd: int) -> None:
    assert select.select([fd], [], [], 5.0)[0] == [fd], "no exit seen"


NOT_USED: Any = None  # the fork server's process object: not needed for our own children


@pytest.mark.parametrize(("code", "expected"), [(7, 7), (None, -signal.SIGKILL)])
def test_an_own_childs_exit_is_seen_and_its_code_read(code: int | None, expected: int) -> None:
    pid = fork_child(code)
    watch = ChildWatch.open(pid)
    assert watch is not None
    try:
        if code is None:
            assert not select.select([watch.fd], [], [], 0.05)[0]  # alive: not readable
            os.kill(pid, signal.SIGKILL)
        wait_readable(watch.fd)
        assert watch.exit_code(NOT_USED) == expected
        with pytest.raises(ChildProcessError):
            os.waitpid(pid, os.WNOHANG)  # reaped: no zombie left
    finally:
        watch.close()


def test_a_pid_that_is_gone_cannot_be_watched() -> None:
    pid = fork_child(0)
    os.waitpid(pid, 0)
    assert ChildWatch.open(pid) is None
    assert ChildWatch.open(None) is None


def test_orphans_are_reaped_but_watched_children_are_left() -> None:
    watched, orphan = fork_child(0), fork_child(0)
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        states = {pid: psutil.Process(pid).status() for pid in (watched, orphan)}
        if set(states.values()) == {psutil.STATUS_ZOMBIE}:
            break
        time.sleep(0.01)
    try:
        assert orphan in reap_orphans({watched})
        assert psutil.Process(watched).status() == psutil.STATUS_ZOMBIE  # left to its watcher
        with pytest.raises(ChildProcessError):
            os.waitpid(orphan, os.WNOHANG)
    finally:
        os.waitpid(watched, 0)


def test_a_worker_reported_gone_but_running_is_killed_if_ours() -> None:
    pid = fork_child(None)  # runs until killed
    try:
        assert not kill_if_ours(1)  # init: not ours
        assert kill_if_ours(pid)
        _, status = os.waitpid(pid, 0)
        assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL
    finally:
        with contextlib.suppress(ChildProcessError):
            os.waitpid(pid, os.WNOHANG)
