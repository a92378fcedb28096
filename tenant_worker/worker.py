"""One tenant's worker process: boot, replay, serve, heartbeat, drain.

    python -m tenant_worker --config PATH --tenant ID     # standalone, foreground

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
import json
import os
import signal
import sys
import threading
import time
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

from loguru import logger

from config import ChatqConfig, TenantConfig
from shared import protocol
from shared.errors import ChatqError
from shared.log import setup_logging
from tenant_worker.handlers import Handler, load_handler
from tenant_worker.ingest import Ingest, IngestState
from tenant_worker.outbox import Outbox
from tenant_worker.pipeline import Pipeline
from tenant_worker.stats import WorkerStats
from tenant_worker.store import Store
from tenant_worker.transports import Transport, make_transport

EXIT_OK = 0
EXIT_FATAL = 1  # a store failure while running: restart and replay
EXIT_BOOT_FAILED = 3  # bad handler, unopenable store: restarting will not help
MAX_LOG_LINE = 64 * 1024  # a huge traceback is cut, not dropped with its frame


class PipeLink:
    """The worker's end of the supervisor pipe; safe to write from any thread."""

    def __init__(self, conn: Connection) -> None:
        self.conn = conn
        self._lock = threading.Lock()
        self.broken = False

    def send(self, frame: protocol.WorkerFrame) -> None:
        if self.broken:
            return
        try:
            with self._lock:
                protocol.send(self.conn, frame)
        except protocol.ProtocolError as exc:  # a bug on our side; never lose the pipe
            print(f"chatq worker: unsendable frame: {exc}", file=sys.stderr)
        except (OSError, ValueError):
            self.broken = True  # the supervisor is gone; the reader will see EOF

    def log_sink(self, line: str) -> None:
        if len(line) > MAX_LOG_LINE:
            line = line[:MAX_LOG_LINE] + " …[truncated]"
        self.send(protocol.LogRecord(line=line, level=_level_of(line)))


def _level_of(line: str) -> str:
    """The level name in a formatted line (text: third word; json: its field)."""
    if line.startswith("{"):
        try:
            level = json.loads(line).get("level")
        except ValueError:
            return "INFO"
        return level if isinstance(level, str) and level else "INFO"
    words = line.split(" ", 3)
    return words[2] if len(words) > 3 else "INFO"


@dataclass
class Parts:
    """What a booted worker is made of, closed in reverse order."""

    store: Store
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

    def request_stop(self, reason: str, code: int = EXIT_OK) -> None:
        if not self._stop.is_set():
            self._stop_reason = reason
            self._exit = max(self._exit, code)
            self._stop.set()

    async def run(self) -> int:
        self._watch_signals()
        # Beats start with the loop, so a worker hung while booting is seen too.
        beat = asyncio.create_task(self._heartbeats())
        try:
            return await self._run()
        finally:
            beat.cancel()

    async def _run(self) -> int:
        try:
            parts = await self._boot()
        except ChatqError as exc:
            logger.error("failed to boot: {}", exc)
            if self.link is not None:
                self.link.send(protocol.BootFailed(reason=str(exc)))
            return EXIT_BOOT_FAILED
        try:
            await self._serve(parts)
        finally:
            await _close(parts)
        logger.info("stopped ({})", self._stop_reason)
        return self._exit

    async def _boot(self) -> Parts:
        # Tenant handler modules live next to the config file, like relative paths.
        folder = str(self.config.path.parent)
        if folder not in sys.path:
            sys.path.insert(0, folder)
        handler = load_handler(self.tenant)
        store = await Store.open(self.config.store_path(self.tenant.id), self.tenant.id)
        return Parts(store=store, handler=handler, transport=make_transport(self.tenant))

    async def _serve(self, parts: Parts) -> None:
        tenant = self.tenant
        counts = await parts.store.counts()
        stats = parts.stats
        stats.processed, stats.failed = counts["processed"], counts["failed"]
        stats.rejected = counts["rejected"]
        outbox = Outbox(
            parts.store,
            parts.transport,
            stats,
            per_chat_per_minute=tenant.rate_limit_per_minute,
            tenant_per_minute=tenant.tenant_rate_limit_per_minute,
            retry_backoff=tenant.retry_backoff,
        )
        pipeline = Pipeline(
            tenant,
            parts.store,
            parts.handler,
            outbox,
            stats,
            on_fatal=lambda exc: self.request_stop(f"store failure: {exc}", EXIT_FATAL),
        )
        unfinished = [row.message for row in await parts.store.unfinished_messages()]
        await pipeline.replay(unfinished, await parts.store.pending_replies())
        ingest = Ingest(tenant.id, pipeline.accept, lambda: _probe(pipeline, outbox))
        await ingest.start(self.config.socket_path(tenant.id), tenant.port)
        ingest.state = IngestState.RUNNING
        self._pipeline = pipeline
        if self.link is not None:
            self.link.send(protocol.Ready(pid=os.getpid()))
        logger.info("ready on {}", self.config.socket_path(tenant.id))
        await self._stop.wait()
        logger.info("draining ({})", self._stop_reason)
        ingest.state = IngestState.DRAINING
        await pipeline.drain(tenant.drain_timeout)
        await outbox.wait_empty(grace=min(1.0, tenant.drain_timeout))
        await outbox.aclose()
        await ingest.stop()

    async def _heartbeats(self) -> None:
        """Beat from the event loop, so a blocked loop goes silent.

        After the first beat, beats fall on multiples of the interval in wall
        time: every worker beats at the same instants, and the supervisor
        wakes once per interval for all of them instead of once per worker.
        """
        if self.link is None:
            return
        interval = self.config.supervisor.heartbeat_interval_s
        seq = 0
        while True:
            seq += 1
            self.link.send(self._heartbeat(seq))
            await asyncio.sleep(interval - time.time() % interval)

    def _heartbeat(self, seq: int) -> protocol.Heartbeat:
        pipeline = self._pipeline
        if pipeline is None:  # still booting: alive, nothing counted yet
            return protocol.Heartbeat(
                seq=seq,
                time=time.time(),
                queued=0,
                in_flight=0,
                processed=0,
                failed=0,
                rejected=0,
                duplicates=0,
                rate_limited=0,
            )
        queue, stats = pipeline.queue, pipeline.stats
        return protocol.Heartbeat(
            seq=seq,
            time=time.time(),
            queued=queue.get_total_queued(),
            in_flight=queue.in_flight(),
            processed=stats.processed,
            failed=stats.failed,
            rejected=stats.rejected,
            duplicates=stats.duplicates,
            rate_limited=stats.rate_limited,
            busiest=queue.busiest(protocol.MAX_BUSIEST),
        )

    def _watch_signals(self) -> None:
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, self.request_stop, signal.Signals(signum).name)
        if self.link is not None:
            loop.add_reader(self.link.conn.fileno(), self._on_pipe)

    def _on_pipe(self) -> None:
        assert self.link is not None
        try:
            frame = protocol.recv(self.link.conn)
        except (EOFError, OSError, protocol.ProtocolError):
            asyncio.get_running_loop().remove_reader(self.link.conn.fileno())
            self.link.broken = True
            self.request_stop("supervisor went away")
            return
        if isinstance(frame, protocol.Stop):
            self.request_stop(frame.reason)


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


def run_worker(config: ChatqConfig, tenant_id: str, conn: Connection | None = None) -> int:
    """The entry point in the worker process; returns its exit code."""
    link = PipeLink(conn) if conn is not None else None
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
    return asyncio.run(Worker(config, tenant, link).run())


def main(argv: list[str] | None = None) -> int:
    """``python -m tenant_worker --config PATH --tenant ID``."""
    import argparse

    from config import load_config

    parser = argparse.ArgumentParser(prog="python -m tenant_worker", description=__doc__)
    parser.add_argument("--config", type=Path, default=None, help="tenants TOML file")
    parser.add_argument("--tenant", required=True, help="tenant id to run")
    args = parser.parse_args(argv)
    try:
        config = load_config(args.config)
    except ChatqError as exc:
        print(f"chatq worker: {exc}", file=sys.stderr)
        return 2
    return run_worker(config, args.tenant)
