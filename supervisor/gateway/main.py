"""The gateway process: serve Meta's webhooks at [gateway] listen until asked to stop.

    python -m chatq.supervisor.gateway --config PATH     # standalone, foreground

The supervisor runs it like a tenant's worker (supervisor/spawn.py): one end
of a duplex pipe carries heartbeats, log lines and the boot outcome up and
``Stop`` down; pipe EOF means the supervisor is gone. Stop (SIGTERM/SIGINT,
``Stop``, EOF): the listening socket closes at once, webhooks in progress get
``forward_timeout`` (+1 s) to finish their forwards, then the process exits.
"""

from __future__ import annotations

import asyncio
import errno
import os
import signal
import sys
import time
from multiprocessing.connection import Connection
from pathlib import Path

from loguru import logger

from chatq.config import ChatqConfig
from chatq.config.settings import GatewaySettings
from chatq.shared import event_loop, protocol
from chatq.shared.errors import ChatqError, ConfigError
from chatq.shared.http_server import HttpServer
from chatq.shared.log import setup_logging
from chatq.shared.pipe_link import EXIT_FLUSH_S, PipeLink, beat
from chatq.supervisor.gateway.app import GatewayApp
from chatq.supervisor.gateway.forwarder import Forwarder
from chatq.supervisor.gateway.routes import Routes
from chatq.supervisor.gateway.stats import GatewayStats

__all__ = ["EXIT_BOOT_FAILED", "Gateway", "main", "run_gateway"]

EXIT_OK = 0
EXIT_RETRY = 1  # `listen` is in use, maybe by a gateway still draining: a restart may work
EXIT_BOOT_FAILED = 3  # no [gateway], or `listen` cannot be bound: restarting will not help
ID = "gateway"


class _AddressInUse(Exception):
    """The listen address is taken (worth a retry, unlike a bad address)."""


class Gateway:
    """Runs the webhook endpoint until asked to stop."""

    def __init__(self, config: ChatqConfig, link: PipeLink | None) -> None:
        assert config.gateway is not None
        self.config = config
        self.settings: GatewaySettings = config.gateway
        self.link = link
        self.stats = GatewayStats()
        self._stop = asyncio.Event()
        self._stop_reason = ""

    def request_stop(self, reason: str) -> None:
        if not self._stop.is_set():
            self._stop_reason = reason
            self._stop.set()

    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, self.request_stop, signal.Signals(signum).name)
        beats = None
        if self.link is not None:
            self.link.watch(self.request_stop)
            interval = self.config.supervisor.heartbeat_interval_s
            beats = asyncio.create_task(
                beat(self.link, interval, lambda seq: self.stats.heartbeat(seq, time.time()))
            )
        try:
            return await self._serve()
        finally:
            if beats is not None:
                beats.cancel()

    async def _serve(self) -> int:
        routes = Routes(self.config)
        sockets = {tenant: self.config.socket_path(tenant) for tenant in routes.tenant_of.values()}
        forwarder = Forwarder(sockets, self.settings.forward_timeout, self.stats)
        app = GatewayApp(
            routes,
            self.settings.whatsapp.verify_token.get_secret_value(),
            forwarder.forward,
            self.stats,
            max_body_bytes=self.settings.max_body_bytes,
        )
        server: HttpServer | None = None
        try:
            try:
                server = await self._listen(app)
            except _AddressInUse as exc:  # e.g. the last gateway, orphaned, still draining
                logger.error("cannot listen yet: {}; exiting to be restarted", exc)
                return EXIT_RETRY
            except ConfigError as exc:
                return self._boot_failed(exc)
            if self.link is not None:
                self.link.send(protocol.Ready(pid=os.getpid()))
            logger.info(
                "gateway ready on {} for {} WhatsApp numbers", self.settings.listen, len(sockets)
            )
            await self._stop.wait()
            logger.info("draining ({}): finishing webhooks in progress", self._stop_reason)
        finally:
            if server is not None:  # stops listening, then waits for webhooks in progress
                await server.close(grace=self.settings.forward_timeout + 1.0)
            await forwarder.aclose()
        logger.info("stopped ({})", self._stop_reason)
        return EXIT_OK

    async def _listen(self, app: GatewayApp) -> HttpServer:
        host, port = self.settings.host, self.settings.port
        try:
            server = HttpServer(
                app.handle,
                max_body_bytes=self.settings.max_body_bytes,
                on_refused=app.stats.refused_connections.inc,
            )
            return await server.listen(host, port)
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                raise _AddressInUse(f"{self.settings.listen} is in use") from exc
            raise ConfigError(
                f"gateway: cannot listen on {self.settings.listen}: {exc.strerror or exc}"
            ) from exc

    def _boot_failed(self, exc: ChatqError) -> int:
        logger.error("failed to boot: {}", exc)
        if self.link is not None:
            self.link.send(protocol.BootFailed(reason=str(exc)))
        return EXIT_BOOT_FAILED


def run_gateway(config: ChatqConfig, conn: Connection | None = None) -> int:
    """The entry point in the gateway process; returns its exit code."""
    link = PipeLink(conn) if conn is not None else None
    try:
        return _run_gateway(config, link)
    finally:
        if link is not None:
            link.flush(EXIT_FLUSH_S)  # its last words: BootFailed, "stopped"


def _run_gateway(config: ChatqConfig, link: PipeLink | None) -> int:
    settings = config.supervisor
    try:
        setup_logging(
            settings.log_level,
            settings.log_format,
            tenant_id=ID,
            sink=link.log_sink if link is not None else None,
        )
        if config.gateway is None:
            raise ConfigError(f"{config.path}: no [gateway] table")
    except ChatqError as exc:
        print(f"chatq gateway: {exc}", file=sys.stderr)
        if link is not None:
            link.send(protocol.BootFailed(reason=str(exc)))
        return EXIT_BOOT_FAILED
    return event_loop.run(Gateway(config, link).run())


def main(argv: list[str] | None = None) -> int:
    """``python -m chatq.supervisor.gateway --config PATH``."""
    import argparse

    from chatq.config import load_config

    parser = argparse.ArgumentParser(prog="python -m chatq.supervisor.gateway", description=__doc__)
    parser.add_argument("--config", type=Path, default=None, help="tenants TOML file")
    args = parser.parse_args(argv)
    try:
        config = load_config(args.config)
    except ChatqError as exc:
        print(f"chatq gateway: {exc}", file=sys.stderr)
        return 2
    return run_gateway(config)
