"""One tenant's worker process: boot, replay, serve, heartbeat, drain.

    python -m chatq.tenant_worker --config PATH --tenant ID     # standalone, foreground

The supervisor calls ``run_worker`` in the child it spawns, with one end of a
duplex pipe: heartbeats, log lines and the boot outcome go up; ``Stop`` comes
down. When the pipe reaches EOF the supervisor is gone and the worker drains
and exits, so a SIGKILLed supervisor leaves no orphans behind.

Start: open the store, load the handler, replay unfinished messages and
pending replies, then open ingest. Stop (SIGTERM/SIGINT, ``Stop``, pipe EOF):
ingest answers 503, in-flight handlers get ``drain_timeout`` to finish,
pending messages stay queued in the store for the next start.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import os
import signal
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

from loguru import logger
from pydantic import SecretStr

from chatq.config import ChatqConfig, TenantConfig
from chatq.shared import event_loop, protocol
from chatq.shared.errors import ChatqError, ConfigError, StoreInUse, StoreUnavailable
from chatq.shared.files import PRIVATE_UMASK
from chatq.shared.log import setup_logging
from chatq.shared.pipe_link import EXIT_FLUSH_S, PipeLink, beat
from chatq.tenant_worker.handlers import Handler, load_handler
from chatq.tenant_worker.ingest import Ingest, IngestState
from chatq.tenant_worker.messages import Message
from chatq.tenant_worker.outbox import Outbox
from chatq.tenant_worker.pipeline import Accepted, Pipeline
from chatq.tenant_worker.redrive import Redrive
from chatq.tenant_worker.retention import Retention
from chatq.tenant_worker.stats import WorkerStats
from chatq.tenant_worker.store import Store
from chatq.tenant_worker.store_lock import StoreLock
from chatq.tenant_worker.transports import Transport, make_transport

EXIT_OK = 0
EXIT_FATAL = 1  # a store failure while running: restart and replay
EXIT_BOOT_FAILED = 3  # bad handler, unopenable store: restarting will not help
# What a stopping worker needs beyond drain_timeout: the outbox's last second,
# putting cut-short messages back, closing the store. The supervisor's
# stop_grace should cover drain_timeout + this; a new worker waits as long
# for the last one to let go of the store.
EXIT_MARGIN = 2.0
SOCKET_CHECK_S = 1.0  # how often a worker checks its socket file is still there
# Supervised, the check runs on every this many beats' timer instead (5 s at
# the default 1 s beat): the stat was a fifth of an idle worker's second.
SOCKET_CHECK_BEATS = 5
# Backoff of a store that cannot be opened for now (disk full, locked): the
# worker waits it out, beating, rather than exit into the restart policy.
OPEN_RETRY_INITIAL = 0.1
OPEN_RETRY_MAX = 2.0


class _StoppedWhileBooting(Exception):
    """A stop came while the worker waited for its store."""


@dataclass
class Service:
    """A started worker's moving parts."""

    pipeline: Pipeline
    outbox: Outbox
    ingest: Ingest
    retention: Retention


@dataclass
class Parts:
    """What a booted worker is made of, closed in reverse order."""

    store: Store
    lock: StoreLock
    handler: Handler
    transport: Transport
    stats: WorkerStats = field(default_factory=WorkerStats)


class Worker:
    """Runs one tenant until asked to stop."""

    def __init__(self, config: ChatqConfig, tenant: TenantConfig, link: PipeLink | None) -> None:
        self.config = config
        self.tenant = tenant
        self.link = link
        self._stop = asyncio.Event()
        self._stop_reason = ""
        self._exit = EXIT_OK
        self._pipeline: Pipeline | None = None  # set once booted; heartbeats read it
        self._outbox: Outbox | None = None  # idem
        self._ingest: Ingest | None = None  # idem
        self._store: Store | None = None  # idem
        self._retention: Retention | None = None  # idem
        self._serving: Ingest | None = None  # whose socket file the beats' timer checks
        self._beats_to_socket_check = SOCKET_CHECK_BEATS
        self._rebinding: asyncio.Task[None] | None = None
        self._store_size = (-1, 0)  # (store.commits, bytes): the size changes with commits

    def request_stop(self, reason: str, code: int = EXIT_OK) -> None:
        if not self._stop.is_set():
            self._stop_reason = reason
            self._exit = max(self._exit, code)
            self._stop.set()

    async def run(self) -> int:
        self._watch_signals()
        # Beats start with the loop, so a worker hung while booting is seen too;
        # the first goes out before the handler module is imported, so a
        # blocking import is a hang after heartbeat_timeout, not BOOT_TIMEOUT.
        beat = asyncio.create_task(self._heartbeats())
        await asyncio.sleep(0)
        try:
            return await self._run()
        finally:
            beat.cancel()

    async def _run(self) -> int:
        try:
            parts = await self._boot()
        except _StoppedWhileBooting:
            logger.info("stopped while booting ({})", self._stop_reason)
            return self._exit
        except StoreInUse as exc:  # its holder may yet exit: a restart may work
            logger.error("failed to boot: {}", exc)
            return EXIT_FATAL
        except ChatqError as exc:
            return self._boot_failed(exc)
        try:
            return await self._run_booted(parts)
        finally:
            await _close(parts)

    async def _run_booted(self, parts: Parts) -> int:
        try:
            service = await self._start(parts)
        except StoreUnavailable as exc:  # a read failed for now: a restart retries it
            logger.error("failed to start: {}", exc)
            return EXIT_FATAL
        except ChatqError as exc:  # unreadable store, socket or port we cannot bind
            return self._boot_failed(exc)
        await self._serve(service)
        logger.info("stopped ({})", self._stop_reason)
        return self._exit

    def _boot_failed(self, exc: ChatqError) -> int:
        logger.error("failed to boot: {}", exc)
        if self.link is not None:
            self.link.send(protocol.BootFailed(reason=str(exc)))
        return EXIT_BOOT_FAILED

    async def _boot(self) -> Parts:
        # Tenant handler modules live next to the config file, like relative paths.
        folder = str(self.config.path.parent)
        if folder not in sys.path:
            sys.path.insert(0, folder)
        handler = load_handler(self.tenant)  # first: a bad one fails at once
        try:
            return await self._open(handler)
        except BaseException:
            await handler.aclose()
            raise

    async def _open(self, handler: Handler) -> Parts:
        path = self.config.store_path(self.tenant.id)
        # The previous worker may still be draining: its supervisor lost track
        # of it (it stops when its pipe closes) or it was stopped by hand.
        lock = await StoreLock.acquire(
            path, wait=self.tenant.drain_timeout + EXIT_MARGIN, give_up=self._stop.is_set
        )
        if lock is None:
            raise _StoppedWhileBooting
        try:
            store = await self._open_store(path)
            try:
                transport = make_transport(self.tenant)
            except BaseException:
                await store.close()
                raise
        except BaseException:
            lock.release()
            raise
        return Parts(store=store, lock=lock, handler=handler, transport=transport)

    async def _open_store(self, path: Path) -> Store:
        """Open the store, waiting out a transient failure (disk full, locked, I/O).

        Meanwhile the socket answers 503, so senders retry rather than see
        "connection refused".
        """
        delay, waiting = OPEN_RETRY_INITIAL, None
        try:
            while True:
                try:
                    return await Store.open(path, self.tenant.id)
                except StoreUnavailable as exc:
                    if waiting is None:
                        logger.warning("cannot open the store for now ({}); retrying", exc)
                        waiting = await self._answer_503()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._stop.wait(), delay)
                if self._stop.is_set():
                    raise _StoppedWhileBooting
                delay = min(delay * 2, OPEN_RETRY_MAX)
        finally:
            if waiting is not None:
                await waiting.stop()

    async def _answer_503(self) -> Ingest | None:
        """An ingest that stays `starting` (503) on the socket; None if it cannot listen."""
        ingest = Ingest(self.tenant.id, _refuse, dict)
        try:
            await ingest.start(self.config.socket_path(self.tenant.id))
        except OSError:
            return None
        return ingest

    async def _start(self, parts: Parts) -> Service:
        """Read what the last run left, listen, replay it, then take new input.

        Every step that can fail runs before any message is handled, so a
        failure here is a clean "failed to boot".
        """
        tenant, store = self.tenant, parts.store
        self._store = store  # beats report its size and health from now on
        counts = await store.counts()
        stats = parts.stats
        stats.processed, stats.failed = counts["processed"], counts["failed"]
        stats.rejected = counts["rejected"]
        unfinished = await store.unfinished_messages()
        replies = await store.pending_replies()
        outbox = Outbox(
            store,
            parts.transport,
            stats,
            per_chat_per_minute=tenant.rate_limit_per_minute,
            tenant_per_minute=tenant.tenant_rate_limit_per_minute,
            number_per_second=_number_rate(tenant),
            **_reply_schedule(tenant),
            on_fatal=self._store_failed,
        )
        pipeline = Pipeline(
            tenant, store, parts.handler, outbox, stats, on_fatal=self._store_failed
        )
        ingest = Ingest(
            tenant.id,
            pipeline.accept,
            lambda: _probe(pipeline, outbox),
            apply_statuses=store.apply_statuses_soon,  # queued at once: shares the commit
            token=_secret(tenant.ingest_token),
        )
        redrive = Redrive(store, pipeline, outbox, lambda: ingest.state is IngestState.RUNNING)
        redrive.add_routes(ingest)
        await self._listen(ingest)  # answers 503 (starting) until the replay is queued
        await pipeline.replay(
            [row.message for row in unfinished],
            replies,
            suspects=[row.message.id for row in unfinished if row.status == "processing"],
        )
        ingest.state = IngestState.RUNNING
        self._pipeline, self._outbox, self._ingest = pipeline, outbox, ingest
        self._retention = Retention(store, tenant.retention_days)
        return Service(pipeline, outbox, ingest, self._retention)

    async def _listen(self, ingest: Ingest) -> None:
        path, port = self.config.socket_path(self.tenant.id), self.tenant.port
        try:
            await ingest.start(path, port)
        except OSError as exc:
            where = f"{path}" if port is None else f"{path} and 127.0.0.1:{port}"
            raise ConfigError(
                f"tenant {self.tenant.id}: cannot listen on {where}: {exc.strerror or exc}"
            ) from exc

    def _store_failed(self, exc: BaseException) -> None:
        self.request_stop(f"store failure: {exc}", EXIT_FATAL)

    async def _serve(self, service: Service) -> None:
        """Run until asked to stop, then drain: pending messages stay queued."""
        if self.link is not None:
            self.link.send(protocol.Ready(pid=os.getpid()))
        logger.info("ready on {}", self.config.socket_path(self.tenant.id))
        # Supervised, the beats' timer checks the socket too: one wake-up per beat.
        keeper = asyncio.create_task(self._keep_socket(service.ingest)) if not self.link else None
        self._serving = service.ingest
        pruning = asyncio.create_task(service.retention.run(), name="retention")
        try:
            await self._stop.wait()
        finally:
            self._serving = None
            for task in (keeper, self._rebinding):
                if task is not None:
                    task.cancel()
            pruning.cancel()  # a batch already submitted still commits before the store closes
        logger.info("draining ({})", self._stop_reason)
        service.ingest.state = IngestState.DRAINING
        try:
            await service.pipeline.drain(self.tenant.drain_timeout)
            await service.outbox.wait_empty(grace=min(1.0, self.tenant.drain_timeout))
            await service.outbox.aclose()
        finally:
            await service.ingest.stop()

    async def _keep_socket(self, ingest: Ingest) -> None:
        """Notice a deleted (or replaced) socket file and bind it again."""
        while True:
            await asyncio.sleep(SOCKET_CHECK_S)
            try:
                if await ingest.keep_socket():
                    logger.warning("socket file was deleted or replaced: listening again")
            except OSError as exc:  # e.g. run_dir itself is gone: try again next time
                logger.error("cannot listen again on the socket: {}", exc)

    def _check_socket(self) -> None:
        """On the beats' timer, every SOCKET_CHECK_BEATS beats: what `_keep_socket` does."""
        self._beats_to_socket_check -= 1
        if self._beats_to_socket_check > 0:
            return
        self._beats_to_socket_check = SOCKET_CHECK_BEATS
        ingest = self._serving
        if ingest is None or (self._rebinding is not None and not self._rebinding.done()):
            return
        try:
            replaced = ingest.socket_replaced()
        except OSError as exc:  # e.g. run_dir itself is gone: try again next time
            logger.error("cannot check the socket file: {}", exc)
            return
        if replaced:
            self._rebinding = asyncio.create_task(self._rebind(ingest))

    async def _rebind(self, ingest: Ingest) -> None:
        try:
            if await ingest.keep_socket():
                logger.warning("socket file was deleted or replaced: listening again")
        except OSError as exc:  # e.g. run_dir itself is gone: try again next time
            logger.error("cannot listen again on the socket: {}", exc)

    async def _heartbeats(self) -> None:
        if self.link is not None:
            interval = self.config.supervisor.heartbeat_interval_s
            await beat(
                self.link,
                interval,
                self._heartbeat,
                also=self._check_socket,
                counters=self._counters,
            )

    def _store_bytes(self) -> int:
        """The store's size on disk, read again only after a commit (two stat calls)."""
        store = self._store
        if store is None:
            return 0
        if self._store_size[0] != store.commits:
            self._store_size = (store.commits, store.size_bytes())
        return self._store_size[1]

    def _heartbeat(self, seq: int) -> protocol.Heartbeat:
        return protocol.heartbeat_of(seq, time.time(), self._counters())

    def _counters(self) -> tuple[Any, ...]:
        """The heartbeat's counters (`protocol.heartbeat_of`'s order), read every beat.

        A tuple, not a heartbeat: while it compares equal to the last one sent,
        the beat goes short without a heartbeat built (an idle worker's second).
        """
        pipeline = self._pipeline
        if pipeline is None:  # still booting: alive, nothing counted yet
            return (0, 0, 0, 0, 0, 0, 0, [], 0, 0, 0, None, None, 0, 0, None, 0, 0, None)
        queue, stats, outbox = pipeline.queue, pipeline.stats, self._outbox
        pause = outbox.paused if outbox is not None else None
        turned_away = self._ingest.counters if self._ingest is not None else None
        store = self._store
        return (
            queue.get_total_queued(),
            queue.in_flight(),
            stats.processed,
            stats.failed,
            stats.rejected,
            stats.duplicates,
            stats.rate_limited,
            queue.busiest(protocol.MAX_BUSIEST),
            stats.sent,
            stats.send_failed,
            stats.retried,
            pause.reason if pause else None,
            pause.since if pause else None,
            turned_away.refused if turned_away else 0,
            turned_away.timeouts if turned_away else 0,
            store.unavailable if store is not None else None,
            outbox.unsent() if outbox is not None else 0,
            self._store_bytes(),
            self._retention.oldest_at if self._retention is not None else None,
        )

    def _watch_signals(self) -> None:
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, self.request_stop, signal.Signals(signum).name)
        if self.link is not None:
            self.link.watch(self.request_stop)


def _reply_schedule(tenant: TenantConfig) -> dict[str, Any]:
    """How the outbox retries replies: the webhook transport has its own setting."""
    if tenant.transport == "webhook":
        return {
            "retry_backoff": tenant.webhook_retry_backoff,
            "max_attempts": tenant.webhook_max_attempts,
        }
    return {"retry_backoff": tenant.retry_backoff}


def _number_rate(tenant: TenantConfig) -> int | None:
    """The WhatsApp number's throughput tier (messages a second), if it sends through one."""
    if tenant.transport == "whatsapp" and tenant.whatsapp is not None:
        return tenant.whatsapp.messages_per_second
    return None


async def _refuse(_messages: Sequence[Message]) -> Accepted:
    raise StoreUnavailable("the store is not open yet")  # never called: it stays `starting`


def _secret(value: SecretStr | None) -> str | None:
    return value.get_secret_value() if value is not None else None


def _probe(pipeline: Pipeline, outbox: Outbox) -> dict[str, Any]:
    return {
        "queued": pipeline.queue.get_total_queued(),
        "in_flight": pipeline.queue.in_flight(),
        "replies_pending": outbox.pending(),
    }


async def _close(parts: Parts) -> None:
    for close in (parts.handler.aclose, parts.transport.aclose, parts.store.close):
        try:
            await close()
        except Exception:
            logger.exception("error while closing")
    parts.lock.release()  # last: the next worker may open the store now


def run_worker(config: ChatqConfig, tenant_id: str, conn: Connection | None = None) -> int:
    """The entry point in the worker process; returns its exit code."""
    os.umask(PRIVATE_UMASK)  # the store, its WAL and SHM: 0600, also when started by hand
    link = PipeLink(conn) if conn is not None else None
    try:
        return _run_worker(config, tenant_id, link)
    finally:
        if link is not None:
            link.flush(EXIT_FLUSH_S)  # its last words: BootFailed, "stopped"


def _run_worker(config: ChatqConfig, tenant_id: str, link: PipeLink | None) -> int:
    settings = config.supervisor
    try:
        tenant = config.tenant(tenant_id)
        setup_logging(
            settings.log_level,
            settings.log_format,
            tenant_id=tenant_id,
            sink=link.log_sink if link is not None else None,
        )
    except ChatqError as exc:
        print(f"chatq worker: {exc}", file=sys.stderr)
        if link is not None:
            link.send(protocol.BootFailed(reason=str(exc)))
        return EXIT_BOOT_FAILED
    if link is not None and (warning := stop_grace_warning(config, tenant)) is not None:
        logger.warning(warning)
    _tune_gc()
    return event_loop.run(Worker(config, tenant, link).run())


def stop_grace_warning(config: ChatqConfig, tenant: TenantConfig) -> str | None:
    """Why the supervisor's stop_grace is too short for this tenant's drain, if it is."""
    grace, drain = config.supervisor.stop_grace, tenant.drain_timeout
    if grace >= drain + EXIT_MARGIN:
        return None
    return (
        f"stop_grace ({grace:g}s) < drain_timeout ({drain:g}s) + {EXIT_MARGIN:g}s: a stop may"
        " SIGKILL this worker while it drains, and the messages it cuts short then use up an"
        " attempt"
    )


def _tune_gc() -> None:
    """Collect garbage less often than CPython's default (700, 10, 10).

    A worker keeps a large long-lived heap (store, queues, caches) and makes
    many short-lived containers per message that outlive a young collection
    while they wait for a group commit: with the defaults, full collections
    ran dozens of times a minute and took ~30 % of the CPU under load
    (bench/worker_bench.py). What exists after start-up is frozen: never scanned.
    No collection first: it would write to every object inherited from the
    fork server (frozen there, see supervisor/forkserver_ready.py) and so copy
    the whole inherited heap into this process.
    """
    gc.freeze()
    gc.set_threshold(20_000, 20, 20)


def main(argv: list[str] | None = None) -> int:
    """``python -m chatq.tenant_worker --config PATH --tenant ID``."""
    import argparse

    from chatq.config import load_config

    parser = argparse.ArgumentParser(prog="python -m chatq.tenant_worker", description=__doc__)
    parser.add_argument("--config", type=Path, default=None, help="tenants TOML file")
    parser.add_argument("--tenant", required=True, help="tenant id to run")
    args = parser.parse_args(argv)
    try:
        config = load_config(args.config)
    except ChatqError as exc:
        print(f"chatq worker: {exc}", file=sys.stderr)
        return 2
    return run_worker(config, args.tenant)
