"""HTTP ingest for one tenant: ``POST /messages`` and ``GET /health`` (aiohttp).

Served on the unix socket ``<run_dir>/<tenant>.sock`` (mode 0600) and, if
the tenant has a ``port``, on 127.0.0.1:port. A request is answered 202 only
after its rows are committed; a refused request (400, 413, 503) writes
nothing.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Awaitable, Callable, Sequence
from contextlib import contextmanager
from enum import Enum
from pathlib import Path
from typing import Any

from aiohttp import web

from chatq.shared.errors import StoreError
from chatq.tenant_worker.messages import MAX_TEXT_CHARS, Message, storable
from chatq.tenant_worker.pipeline import Accepted

MAX_BODY_BYTES = 1 << 20  # 1 MiB
MAX_ID_CHARS = 256
# At stop, how long requests still in progress get (aiohttp's default is 60 s):
# one whose body is still arriving would otherwise hold the worker's exit past
# the supervisor's stop_grace. Its client gets no answer and sends it again.
SHUTDOWN_GRACE = 0.5

Accept = Callable[[Sequence[Message]], Awaitable[Accepted]]
Probe = Callable[[], dict[str, Any]]


class IngestState(Enum):
    STARTING = "starting"
    RUNNING = "running"
    DRAINING = "draining"


class BadMessage(ValueError):
    """A request body that does not describe valid messages (answered 400)."""


def _error(status: int, message: str) -> web.Response:
    return web.json_response({"error": message}, status=status)


def _string(item: dict[str, Any], where: str, name: str, *, required: bool) -> str | None:
    value = item.get(name)
    if value is None:
        if required:
            raise BadMessage(f"{where}.{name}: missing")
        return None
    if not isinstance(value, str):
        raise BadMessage(f"{where}.{name}: must be a string, got {type(value).__name__}")
    if not storable(value):
        raise BadMessage(f"{where}.{name}: not valid Unicode (a lone UTF-16 surrogate)")
    return value


def _identifier(item: dict[str, Any], where: str, name: str) -> str:
    value = _string(item, where, name, required=True)
    if not value:
        raise BadMessage(f"{where}.{name}: must not be empty")
    assert value is not None
    if len(value) > MAX_ID_CHARS:
        raise BadMessage(f"{where}.{name}: longer than {MAX_ID_CHARS} characters")
    if "\x00" in value:  # the store looks ids up through SQLite JSON, which ends text at NUL
        raise BadMessage(f"{where}.{name}: must not contain NUL characters")
    return value


def _timestamp(item: dict[str, Any], where: str) -> float | None:
    value = item.get("ts")
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise BadMessage(f"{where}.ts: must be a number (seconds since the epoch)")
    try:
        seconds = float(value)  # a huge JSON integer overflows here
    except OverflowError:
        seconds = math.inf
    if not math.isfinite(seconds):
        raise BadMessage(f"{where}.ts: must be a finite number (seconds since the epoch)")
    return seconds


def parse_message(item: object, where: str, tenant_id: str, now: float) -> Message:
    """One message object from the body, checked field by field."""
    if not isinstance(item, dict):
        raise BadMessage(f"{where}: must be an object, got {type(item).__name__}")
    text = _string(item, where, "text", required=True)
    assert text is not None
    if len(text) > MAX_TEXT_CHARS:
        raise BadMessage(f"{where}.text: longer than {MAX_TEXT_CHARS} characters")
    return Message(
        id=_identifier(item, where, "id"),
        chat_id=_identifier(item, where, "chat_id"),
        text=text,
        tenant_id=tenant_id,
        sender=_string(item, where, "from", required=False),
        ts=_timestamp(item, where),
        received_at=now,
    )


def parse_body(raw: bytes, tenant_id: str, now: float) -> list[Message]:
    """The messages of a ``POST /messages`` body: one object or a non-empty list."""
    try:
        body = json.loads(raw)
    except ValueError as exc:  # also bad UTF-8 and integers over 4300 digits
        raise BadMessage(f"body: not valid JSON ({exc})") from None
    except RecursionError:
        raise BadMessage("body: not valid JSON (nested too deeply)") from None
    if isinstance(body, dict):
        return [parse_message(body, "message", tenant_id, now)]
    if isinstance(body, list):
        if not body:
            raise BadMessage("body: empty list")
        return [
            parse_message(item, f"messages[{n}]", tenant_id, now) for n, item in enumerate(body)
        ]
    raise BadMessage(f"body: must be an object or a list, got {type(body).__name__}")


class Ingest:
    """The tenant's HTTP front door; answers 503 unless running."""

    def __init__(
        self,
        tenant_id: str,
        accept: Accept,
        probe: Probe,
        *,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.tenant_id = tenant_id
        self.state = IngestState.STARTING
        self._accept = accept
        self._probe = probe
        self._clock = clock
        self._runner: web.AppRunner | None = None
        self.app = web.Application(client_max_size=MAX_BODY_BYTES)
        self.app.router.add_post("/messages", self.post_messages)
        self.app.router.add_get("/health", self.health)

    async def start(self, socket_path: Path, port: int | None = None) -> None:
        """Listen on the unix socket (0600) and, if given, 127.0.0.1:port."""
        _clear_socket_path(socket_path)
        self._runner = web.AppRunner(
            self.app, access_log=None, handle_signals=False, shutdown_timeout=SHUTDOWN_GRACE
        )
        await self._runner.setup()
        try:
            with _umask(0o177):  # born 0600: no window where others may connect
                await web.UnixSite(self._runner, str(socket_path)).start()
            if port is not None:
                await web.TCPSite(self._runner, "127.0.0.1", port).start()
        except BaseException:
            await self.stop()  # e.g. the port is taken: do not keep the socket open
            raise

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def post_messages(self, request: web.Request) -> web.Response:
        if self.state is not IngestState.RUNNING:
            return _error(503, f"tenant {self.tenant_id} is {self.state.value}")
        if request.content_length is not None and request.content_length > MAX_BODY_BYTES:
            return _error(413, f"body over {MAX_BODY_BYTES} bytes")
        try:
            raw = await request.read()
        except web.HTTPRequestEntityTooLarge:
            return _error(413, f"body over {MAX_BODY_BYTES} bytes")
        try:
            messages = parse_body(raw, self.tenant_id, self._clock())
        except BadMessage as exc:
            return _error(400, str(exc))
        try:
            result = await self._accept(messages)
        except StoreError as exc:
            return _error(503, f"store unavailable: {exc}")
        return web.json_response(
            {
                "accepted": result.accepted,
                "duplicates": result.duplicates,
                "rejected": result.rejected,
            },
            status=202,
        )

    async def health(self, _request: web.Request) -> web.Response:
        body = {"tenant": self.tenant_id, "status": self.state.value, **self._probe()}
        return web.json_response(body, status=200 if self.state is IngestState.RUNNING else 503)


def _clear_socket_path(path: Path) -> None:
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)  # like the supervisor does
    path.unlink(missing_ok=True)  # a stale socket from a killed run


@contextmanager
def _umask(mask: int) -> Any:
    old = os.umask(mask)
    try:
        yield
    finally:
        os.umask(old)
