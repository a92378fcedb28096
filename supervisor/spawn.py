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
import multiprocessing
import multiprocessing.process
import os
import signal
import sys
import types
from collections.abc import Callable, Iterator
from multiprocessing import forkserver
from multiprocessing.connection import Connection
from multiprocessing.context import ForkServerContext
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
    (supervisor/forkserver_logging.py).
    """
    context()
    if fork_server_pid() is not None:
        forkserver.ensure_running()
        return
    if ready_flag is not None:
        ready_flag.unlink(missing_ok=True)
    told = {READY_ENV: str(ready_flag)} if ready_flag is not None else {}
    if log is not None:
        told[LOG_ENV] = " ".join(log)
    os.environ.update(told)
    try:
        forkserver.ensure_running()
    finally:
        for name in told:
            del os.environ[name]
    if ready_flag is not None:
        _awaited.append(ready_flag)


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
    process = ctx.Process(target=target, args=(*args, theirs), name=name)
    try:
        with _no_main_module():
            process.start()
    finally:
        theirs.close()  # only the child may hold its end, or EOF never comes
    _untracked(process)
    return process, ours


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
