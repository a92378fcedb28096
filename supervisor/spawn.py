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
import os
import signal
import sys
from collections.abc import Callable, Iterator
from multiprocessing.connection import Connection
from multiprocessing.context import ForkServerContext
from multiprocessing.process import BaseProcess
from typing import Any

from chatq.config import ChatqConfig
from chatq.shared import stack_dump

# Imported by the fork server only (never by the supervisor itself), in this
# order: signal set-up, what workers and the gateway run, then freeze the lot
# (keep it last).
PRELOAD = [
    "chatq.supervisor.forkserver_setup",
    "chatq.tenant_worker.worker",
    "chatq.supervisor.gateway.main",
    "chatq.supervisor.forkserver_ready",
]


def context() -> ForkServerContext:
    """The multiprocessing context every worker is started from."""
    ctx = multiprocessing.get_context("forkserver")
    assert isinstance(ctx, ForkServerContext)
    ctx.set_forkserver_preload(PRELOAD)
    return ctx


def _own_group(config: ChatqConfig, name: str, title: str) -> None:
    """In a child: its own process group, default signal handling, stacks on a
    signal, and `title`.

    The title ("chatq worker acme") is what ps and top show, so they tell
    the workers apart (all are otherwise the fork server's command line).

    A Ctrl-C in the supervisor's terminal then reaches only the supervisor,
    which drains its children itself, in order; the fork server ignores the
    signals its children must obey.
    """
    from setproctitle import setproctitle

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
    ctx: ForkServerContext, config: ChatqConfig, tenant_id: str
) -> tuple[BaseProcess, Connection]:
    """Start one tenant's worker; return the process and our end of its pipe."""
    return _spawn(ctx, worker_main, (config, tenant_id), f"chatq-worker-{tenant_id}")


def spawn_gateway(ctx: ForkServerContext, config: ChatqConfig) -> tuple[BaseProcess, Connection]:
    """Start the gateway; return the process and our end of its pipe."""
    return _spawn(ctx, gateway_main, (config,), "chatq-gateway")


def _spawn(
    ctx: ForkServerContext, target: Callable[..., None], args: tuple[Any, ...], name: str
) -> tuple[BaseProcess, Connection]:
    ours, theirs = ctx.Pipe(duplex=True)
    process = ctx.Process(target=target, args=(*args, theirs), name=name)
    try:
        with _main_not_inherited():
            process.start()
    finally:
        theirs.close()  # only the child may hold its end, or EOF never comes
    return process, ours


@contextlib.contextmanager
def _main_not_inherited() -> Iterator[None]:
    """Start a child without it running our ``__main__`` module again.

    multiprocessing tells every child to import the parent's ``__main__``
    afresh (as ``__mp_main__``), for functions pickled from it. Ours is the
    CLI (``chatq`` or ``python -m chatq.supervisor.cli``); no child needs it,
    and running it in every worker made ~3.4 MB of each worker's private
    memory. Without ``__spec__`` and ``__file__`` it names no main to import.
    """
    main = sys.modules["__main__"].__dict__
    saved: dict[str, Any] = {key: main[key] for key in ("__spec__", "__file__") if key in main}
    main["__spec__"] = None
    main.pop("__file__", None)
    try:
        yield
    finally:
        main.update(saved)
