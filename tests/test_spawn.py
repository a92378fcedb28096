"""Spawning workers while other threads of the parent hold locks (logging)."""

from __future__ import annotations

import contextlib
import importlib.util
import logging
import os
import shutil
import signal
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from multiprocessing import forkserver
from multiprocessing.connection import Connection, wait
from pathlib import Path

import pytest
from loguru import logger
from sandbox import short_run_dir

from chatq.config import ChatqConfig, load_config
from chatq.shared import protocol
from chatq.supervisor import spawn
from chatq.supervisor.pipes import FrameReader


@pytest.fixture
def config(tmp_path: Path) -> Iterator[ChatqConfig]:
    run_dir = short_run_dir()  # socket paths are limited
    path = tmp_path / "tenants.toml"
    path.write_text(
        f'[supervisor]\nrun_dir = "{run_dir}"\ndata_dir = "data"\nheartbeat_interval_ms = 100\n'
        'log_level = "WARNING"\n[[tenants]]\nid = "t1"\n'
    )
    yield load_config(path, env={})
    shutil.rmtree(run_dir, ignore_errors=True)


@pytest.fixture
def chatty_threads() -> Iterator[None]:
    """Two threads logging flat out (loguru and stdlib): locks held at any moment."""
    stop = threading.Event()
    sink_calls = 0

    def sink(_message: object) -> None:
        nonlocal sink_calls
        sink_calls += 1

    handler_id = logger.add(sink, level="DEBUG")
    stdlib = logging.getLogger("chatty")
    stdlib.addHandler(logging.NullHandler())

    def hammer() -> None:
        while not stop.is_set():
            logger.debug("busy")
            stdlib.warning("busy")

    threads = [threading.Thread(target=hammer, daemon=True) for _ in range(2)]
    for thread in threads:
        thread.start()
    yield
    stop.set()
    for thread in threads:
        thread.join(5)
    logger.remove(handler_id)
    assert sink_calls > 0


def wait_ready(reader: FrameReader, within: float) -> protocol.Ready:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        for frame in reader.read():
            if isinstance(frame, protocol.Ready):
                return frame
        time.sleep(0.01)
    raise AssertionError(f"no Ready within {within}s")


@pytest.mark.timeout(90)
@pytest.mark.usefixtures("chatty_threads")
def test_workers_boot_while_parent_threads_are_logging(config: ChatqConfig) -> None:
    forkserver.ensure_running()
    ctx = spawn.context()
    for _ in range(5):
        process, conn = spawn.spawn_worker(ctx, config, config.tenant("t1"))
        try:
            ready = wait_ready(FrameReader(conn), within=20)
            assert ready.pid == spawn.take_pid(process)
        finally:
            if process.pid is not None:
                os.kill(process.pid, signal.SIGTERM)
            process.join(15)
            if process.exitcode is None:
                process.kill()
                process.join(5)
            conn.close()
        assert process.exitcode == 0


def _exit_at_once(conn: Connection) -> None:
    conn.close()


def test_children_do_not_run_the_parents_main_again(monkeypatch: pytest.MonkeyPatch) -> None:
    """multiprocessing's default re-runs __main__ (our CLI, under `python -m`) in every
    child: ~2.3 MB of each worker's private memory."""
    marker = Path(tempfile.gettempdir()) / f"chatq-main-marker-{os.getpid()}"
    marker.unlink(missing_ok=True)
    monkeypatch.setattr(
        sys.modules["__main__"], "__spec__", importlib.util.find_spec("main_marker")
    )
    process, conn = spawn._spawn(spawn.context(), _exit_at_once, (), "chatq-test-main")
    try:
        process.join(10)
        assert process.exitcode == 0
        assert not marker.exists()
    finally:
        conn.close()
        marker.unlink(missing_ok=True)


def _wait_for_eof(conn: Connection) -> None:
    with contextlib.suppress(EOFError, OSError):
        conn.recv_bytes()


def test_a_spawn_does_not_poll_the_children_already_running(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Regression (issue 15): `Process.start` polled every child multiprocessing still
    listed (a selector each), so starting 2,000 tenants cost the square of that."""
    ctx = spawn.context()
    first, first_conn = spawn._spawn(ctx, _wait_for_eof, (), "chatq-test-first")
    polled: list[object] = []
    popen_type = type(first._popen)  # type: ignore[attr-defined]
    real_poll = popen_type.poll
    monkeypatch.setattr(
        popen_type, "poll", lambda self, *args: (polled.append(self), real_poll(self, *args))[1]
    )
    second, second_conn = spawn._spawn(ctx, _wait_for_eof, (), "chatq-test-second")
    try:
        assert first._popen not in polled  # type: ignore[attr-defined]
        assert first.is_alive() and second.is_alive()
    finally:
        for process, conn in ((first, first_conn), (second, second_conn)):
            conn.close()  # EOF: the child returns
            process.join(10)
            if process.exitcode is None:
                process.kill()
                process.join(5)
    assert (first.exitcode, second.exitcode) == (0, 0)


@pytest.mark.timeout(60)
def test_a_spawn_returns_before_the_fork_server_has_forked() -> None:
    """The supervisor's loop waited inside each spawn for the fork server to fork and
    answer with the pid (a quarter of its time starting 2,000 tenants): now a spawn
    returns once asked, and the pid is read when the fork server has answered."""
    ctx = spawn.context()
    forkserver.ensure_running()
    warm, warm_conn = spawn._spawn(ctx, _exit_at_once, (), "chatq-test-warm")  # preloaded
    warm.join(30)
    warm_conn.close()
    server = spawn.fork_server_pid()
    assert server is not None
    os.kill(server, signal.SIGSTOP)
    waking = threading.Timer(3.0, os.kill, (server, signal.SIGCONT))  # a spawn that waits ends
    waking.start()
    try:
        asked = time.monotonic()
        process, conn = spawn._spawn(ctx, _wait_for_eof, (), "chatq-test-late-pid")
        took = time.monotonic() - asked
        pending = spawn.pid_pending(process) and process.pid is None
        assert process.exitcode is None  # asking does not wait for the fork server either
    finally:
        waking.cancel()
        os.kill(server, signal.SIGCONT)
    try:
        assert took < 2.0 and pending
        assert wait([process.sentinel], 20)  # the fork server answers
        pid = spawn.take_pid(process)
        assert process.pid == pid and not spawn.pid_pending(process)
        assert process.is_alive()
    finally:
        conn.close()  # EOF: the child returns
        process.join(10)
        if process.exitcode is None:
            process.kill()
            process.join(5)
    assert process.exitcode == 0


@pytest.mark.timeout(60)
def test_a_pid_the_fork_server_died_before_writing_is_an_eof() -> None:
    """A fork server that dies (e.g. out of file descriptors) with a request in hand:
    that spawn fails (the supervisor retries it), and nothing waits for it."""
    ctx = spawn.context()
    forkserver.ensure_running()
    server = spawn.fork_server_pid()
    assert server is not None
    os.kill(server, signal.SIGSTOP)  # it takes the request, but never answers it
    process, conn = spawn._spawn(ctx, _wait_for_eof, (), "chatq-test-no-pid")
    try:
        os.kill(server, signal.SIGKILL)
        assert wait([process.sentinel], 20)
        with pytest.raises(EOFError):
            spawn.take_pid(process)
        assert process.exitcode == 255  # never started: nothing to wait for
        process.close()
    finally:
        conn.close()
        with contextlib.suppress(ProcessLookupError):
            os.kill(server, signal.SIGKILL)
        forkserver.ensure_running()  # reaps the dead one, starts another
