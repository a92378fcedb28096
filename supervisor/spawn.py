"""Starting worker processes.

We use the ``forkserver`` start method, not ``fork``. The supervisor runs
threads (the metrics server; libraries may start more): a plain ``fork``
copies the parent while some thread may hold a lock -- the logging lock, the
allocator's, an import lock -- and the child deadlocks on it the first time
it takes that lock. The fork server is started early, single-threaded, with
the worker's modules preloaded, so forking from it is fast and inherits no
held locks, no supervisor sockets and no sibling's pipe ends. That last part
is what makes pipe EOF a reliable "the supervisor died" signal for workers.
"""

from __future__ import annotations

import contextlib
import io
import multiprocessing
import multiprocessing.process
import os
import select
import signal
import sys
import time
import types
from collections.abc import Callable, Iterator
from multiprocessing import forkserver, popen_forkserver, reduction, util
from multiprocessing import spawn as mp_spawn
from multiprocessing.connection import Connection
from multiprocessing.connection import wait as mp_wait
from multiprocessing.context import ForkServerContext, ForkServerProcess, set_spawning_popen
from multiprocessing.process import BaseProcess
from pathlib import Path
from typing import Any

from setproctitle import setproctitle

from chatq.config import ChatqConfig, TenantConfig
from chatq.shared import stack_dump

# Imported by the fork server only (never by the supervisor itself), in this
# order: signal set-up, what workers and the gateway run (this module too: a
# child unpickles its target from here), their logging, then freeze the lot,
# then say so (keep those two last).
# What a child imports itself costs it boot CPU and private memory.
PRELOAD = [
    "chatq.supervisor.forkserver_setup",
    "chatq.tenant_worker.worker",
    "chatq.supervisor.gateway.main",
    "chatq.supervisor.spawn",
    "chatq.supervisor.forkserver_logging",
    "chatq.supervisor.forkserver_ready",
    "chatq.supervisor.forkserver_up",
]
READY_ENV = "CHATQ_FORKSERVER_READY"  # the file forkserver_up.py creates
LOG_ENV = "CHATQ_FORKSERVER_LOG"  # "LEVEL FORMAT": the logging forkserver_logging.py sets up


def context() -> ForkServerContext:
    """The multiprocessing context every worker is started from."""
    ctx = multiprocessing.get_context("forkserver")
    assert isinstance(ctx, ForkServerContext)
    ctx.set_forkserver_preload(PRELOAD)
    return ctx


def start_fork_server(ready_flag: Path | None = None, log: tuple[str, str] | None = None) -> None:
    """Start the fork server now, if it is not running: call it early.

    It imports every preloaded module (~0.6 s of CPU) while the supervisor
    goes on with its own start, and creates `ready_flag` once done (see
    supervisor/forkserver_up.py). A spawn before that waits for it. `log`
    (level, format): the children's logging, set up there once
    (supervisor/forkserver_logging.py), by this fork server and by any that
    a spawn starts after this one died.
    """
    context()
    if log is not None:
        use_log(*log)
    if fork_server_pid() is not None:
        with _told_fork_server():
            forkserver.ensure_running()
        return
    if ready_flag is not None:
        ready_flag.unlink(missing_ok=True)
    told = {READY_ENV: str(ready_flag)} if ready_flag is not None else {}
    with _told_fork_server(told):
        forkserver.ensure_running()
    if ready_flag is not None:
        _awaited.append(ready_flag)


_told: dict[str, str] = {}  # what every fork server is told at its start (LOG_ENV)


def use_log(level: str, fmt: str) -> None:
    """The logging a fork server started from now on sets up for its children."""
    _told[LOG_ENV] = f"{level} {fmt}"


@contextlib.contextmanager
def _told_fork_server(extra: dict[str, str] | None = None) -> Iterator[None]:
    """The environment a fork server started in this block is told (then dropped again).

    multiprocessing starts a new fork server by itself, inside a spawn, when
    the last one died: it too must be told, or each of its children sets up
    its logging from scratch (~20 ms of boot CPU).
    """
    told = {**_told, **(extra or {})}
    os.environ.update(told)
    try:
        yield
    finally:
        for name in told:
            os.environ.pop(name, None)


_awaited: list[Path] = []  # the flag of the fork server started with one (a process has one)


def awaited_flag() -> Path | None:
    """The ready flag of the fork server `start_fork_server` started, if it was given one."""
    return _awaited[-1] if _awaited else None


def ready_flag(run_dir: Path) -> Path:
    """The file the fork server started by `chatq run` creates once it can fork."""
    return run_dir / "forkserver.ready"


def fork_server_pid() -> int | None:
    """The fork server's pid, if one was started (it may have died since)."""
    server = getattr(forkserver, "_forkserver", None)
    pid = getattr(server, "_forkserver_pid", None)
    return pid if isinstance(pid, int) else None


def _own_group(config: ChatqConfig, name: str, title: str) -> None:
    """In a child: its own process group, default signal handling, stacks on a
    signal, and `title`.

    The title ("chatq worker acme") is what ps and top show, so they tell
    the workers apart (all are otherwise the fork server's command line).

    A Ctrl-C in the supervisor's terminal then reaches only the supervisor,
    which drains its children itself, in order; the fork server ignores the
    signals its children must obey.
    """
    setproctitle(title)
    os.setpgrp()
    for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, signal.SIG_DFL)
    stack_dump.arm(stack_dump.stacks_path(config.supervisor.run_dir, name))


def worker_main(config: ChatqConfig, tenant_id: str, conn: Connection) -> None:
    """The function a worker process runs (in the child)."""
    _own_group(config, tenant_id, f"chatq worker {tenant_id}")
    from chatq.tenant_worker.worker import run_worker

    code = run_worker(config, tenant_id, conn)
    conn.close()
    raise SystemExit(code)


def gateway_main(config: ChatqConfig, conn: Connection) -> None:
    """The function the gateway process runs (in the child)."""
    _own_group(config, "gateway", "chatq gateway")
    from chatq.supervisor.gateway.main import run_gateway

    code = run_gateway(config, conn)
    conn.close()
    raise SystemExit(code)


def spawn_worker(
    ctx: ForkServerContext, config: ChatqConfig, tenant: TenantConfig
) -> tuple[BaseProcess, Connection]:
    """Start one tenant's worker; return the process and our end of its pipe."""
    own = own_config(config, tenant)
    return _spawn(ctx, worker_main, (own, tenant.id), f"chatq-worker-{tenant.id}")


def own_config(config: ChatqConfig, tenant: TenantConfig) -> ChatqConfig:
    """What one worker is sent: the supervisor settings and its own tenant only.

    The whole config was pickled for every spawn, so a fleet's start cost
    grew with the square of its size (7.9 s of supervisor CPU at 1,000
    tenants), and every worker held every other tenant's tokens and secrets.
    """
    return config.model_copy(update={"tenants": (tenant,), "gateway": None})


def spawn_gateway(ctx: ForkServerContext, config: ChatqConfig) -> tuple[BaseProcess, Connection]:
    """Start the gateway; return the process and our end of its pipe."""
    return _spawn(ctx, gateway_main, (config,), "chatq-gateway")


def _spawn(
    ctx: ForkServerContext, target: Callable[..., None], args: tuple[Any, ...], name: str
) -> tuple[BaseProcess, Connection]:
    ours, theirs = ctx.Pipe(duplex=True)
    process = _Process(target=target, args=(*args, theirs), name=name)
    try:
        with _no_main_module():
            process.start()
    finally:
        theirs.close()  # only the child may hold its end, or EOF never comes
    _untracked(process)
    return process, ours


class _LatePid(popen_forkserver.Popen):
    """A fork server spawn that returns once the request is sent: the pid comes later.

    multiprocessing's own waits for the fork server to fork and write the
    pid back; the supervisor's loop, and so `list` and the workers' frames,
    waited with it (a quarter of its time while 2,000 tenants started on a
    busy host). Here the pid is read once the status pipe (``sentinel``) is
    readable (`take_pid`: the supervisor waits on it with everything else),
    or, if asked for first, by `poll` and `wait`, which block for it.
    """

    def _launch(self, process_obj: BaseProcess) -> None:
        # popen_forkserver.Popen._launch without its last line, the wait for the pid.
        prep_data = mp_spawn.get_preparation_data(process_obj.name)
        buf = io.BytesIO()
        set_spawning_popen(self)
        try:
            reduction.dump(prep_data, buf)
            reduction.dump(process_obj, buf)
        finally:
            set_spawning_popen(None)
        fds: list[int] = self._fds  # type: ignore[attr-defined]  # what the child inherits
        with _told_fork_server():  # a fork server started here (the last one died)
            self.sentinel, data_w = forkserver.connect_to_new_process(fds)
        # Unlike multiprocessing, no copy of the data pipe's write end is kept
        # open while the child lives: it is only what the child's
        # `multiprocessing.parent_process()` watches, which chatq never asks
        # about, and one descriptor per worker (the watchdog's kept statm file
        # takes its place: supervisor/limits.py).
        self.finalizer = util.Finalize(self, _close_fds, (self.sentinel,))
        with open(data_w, "wb", closefd=True) as file:
            file.write(buf.getbuffer())
        self.pid = None  # type: ignore[assignment]

    def take_pid(self) -> int:
        """The child's pid: read from the fork server (it blocks until written).

        EOFError: the fork server died before it forked; there is no child.
        """
        if self.pid is None:
            try:
                self.pid = forkserver.read_signed(self.sentinel)
            except (OSError, EOFError):
                self.returncode = 255  # never started: nothing to wait for
                raise
        return self.pid

    def poll(self, flag: int = os.WNOHANG) -> int | None:
        if self.pid is None:
            if flag == os.WNOHANG and not readable(self.sentinel):
                return None
            with contextlib.suppress(OSError, EOFError):
                self.take_pid()
            if self.pid is None:
                return self.returncode
        return super().poll(flag)

    def wait(self, timeout: float | None = None) -> int | None:
        if self.pid is None:
            end = None if timeout is None else time.monotonic() + timeout
            if timeout is not None and not mp_wait([self.sentinel], timeout):
                return None
            try:
                self.take_pid()
            except (OSError, EOFError):
                return self.returncode
            if end is not None:
                timeout = max(0.0, end - time.monotonic())
        return super().wait(timeout)


class _Process(ForkServerProcess):
    """A fork server child whose pid is read later (`_LatePid`)."""

    @staticmethod
    def _Popen(process_obj: BaseProcess) -> _LatePid:
        return _LatePid(process_obj)


def pid_pending(process: BaseProcess) -> bool:
    """Whether `process` was spawned and its pid not read yet (see `take_pid`)."""
    return process.pid is None and isinstance(_popen(process), _LatePid)


def take_pid(process: BaseProcess) -> int:
    """Read the pid of a spawned `process` from the fork server (at once once its
    ``sentinel`` is readable; else it waits). EOFError: the fork server died first."""
    popen = _popen(process)
    if isinstance(popen, _LatePid):
        return popen.take_pid()
    assert process.pid is not None
    return process.pid


def _popen(process: BaseProcess) -> object:
    return getattr(process, "_popen", None)


def _close_fds(*fds: int) -> None:
    for fd in fds:
        with contextlib.suppress(OSError):
            os.close(fd)


def readable(fd: int) -> bool:
    """Whether reading `fd` would not block now (data, or EOF)."""
    poller = select.poll()
    poller.register(fd, select.POLLIN)
    return bool(poller.poll(0))


def _untracked(process: BaseProcess) -> None:
    """Take a started child out of multiprocessing's own list of children.

    Every ``Process.start`` first polls each child in that list (a new
    selector per child, ~25 us), so a fleet's start cost grew with the
    square of its size: ~28% of the supervisor's time starting 1,000
    tenants. The supervisor watches its children itself (pidfds, the
    handles), and stops them itself at exit.
    """
    multiprocessing.process._children.discard(process)  # type: ignore[attr-defined]


@contextlib.contextmanager
def _no_main_module() -> Iterator[None]:
    """Hide ``__main__`` from multiprocessing while it describes a child.

    A forkserver child runs the parent's main module again (as
    ``__mp_main__``) in case its target lives there. Ours never does (the
    targets are in this module), and running ``chatq.supervisor.cli`` again
    cost each worker ~12 ms of CPU at boot. Only the loop thread spawns, and
    nothing reads ``__main__`` while it does.
    """
    main = sys.modules["__main__"]
    sys.modules["__main__"] = types.ModuleType("__main__")  # no __spec__, no __file__
    try:
        yield
    finally:
        sys.modules["__main__"] = main
