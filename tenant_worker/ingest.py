"""HTTP ingest for one tenant: ``POST /messages``, ``POST /whatsapp/updates``, ``GET /health``.

Served (aiohttp) on the unix socket ``<run_dir>/<tenant>.sock`` (mode 0600)
and, if the tenant has a ``port``, on 127.0.0.1:port. A request is answered
202 (200 for updates) only after its rows are committed; a refused request
(400, 408, 413, 503) writes nothing. Connections are capped and timed
(tenant_worker/ingest_guard.py).

``POST /whatsapp/updates`` is the gateway's way in (supervisor/gateway/):
``{"messages": [message, ...], "statuses": [{"id", "status", "error"?}, ...]}``
where a message is what ``/messages`` takes; the statuses are applied to the
replies with that provider_id in the same commit as the messages (when the
store groups them, as it does for writes submitted together).
"""

from __future__ import annotations

import asyncio
import json
import math
import os
import time
from collections.abc import Awaitable, Callable, Sequence
from contextlib import contextmanager
from enum import Enum
from pathlib import Path
from typing import Any, TypeVar

import orjson
from aiohttp import web

from chatq.shared.errors import StoreError
from chatq.tenant_worker.ingest_guard import (
    BODY_TIMEOUT,
    IDLE_TIMEOUT,
    LINGER,
    MAX_CONNECTIONS,
    IngestCounters,
    cap_connections,
)
from chatq.tenant_worker.ingest_tcp import tcp_refusal
from chatq.tenant_worker.messages import (
    MAX_TEXT_CHARS,
    Message,
    StatusCounts,
    StatusUpdate,
    storable,
)
from chatq.tenant_worker.pipeline import Accepted

MAX_BODY_BYTES = 1 << 20  # 1 MiB
# The gateway forwards Meta's batches (up to 3 MB each, raw objects included),
# several at once: a bound far above that, far below harm.
MAX_UPDATES_BYTES = 32 << 20
MAX_TYPE_CHARS = 64
STATUS_NAMES = ("sent", "delivered", "read", "failed")
MAX_ID_CHARS = 256
# At stop, how long requests still in progress get (aiohttp's default is 60 s):
# one whose body is still arriving would otherwise hold the worker's exit past
# the supervisor's stop_grace. Its client gets no answer and sends it again.
SHUTDOWN_GRACE = 0.5

Accept = Callable[[Sequence[Message]], Awaitable[Accepted]]
# Queue status updates now (to share the messages' commit); await the outcome later.
ApplyStatuses = Callable[[Sequence[StatusUpdate]], Awaitable[StatusCounts]]
Probe = Callable[[], dict[str, Any]]
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
T = TypeVar("T")


class IngestState(Enum):
    STARTING = "starting"
    RUNNING = "running"
    DRAINING = "draining"


class BadMessage(ValueError):
    """A request body that does not describe valid messages (answered 400)."""


def _error(status: int, message: str) -> web.Response:
    return _json_response({"error": message}, status)


def _json_response(body: dict[str, Any], status: int) -> web.Response:
    """`web.json_response`, encoded by orjson (a few us less a request)."""
    try:
        raw = orjson.dumps(body)
    except orjson.JSONEncodeError:  # a lone surrogate from the body, quoted in an error
        raw = json.dumps(body).encode()
    return web.Response(body=raw, status=status, content_type="application/json")


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
        type=_kind(item, where),
        payload=_payload(item, where),
    )


def _kind(item: dict[str, Any], where: str) -> str:
    value = _string(item, where, "type", required=False)
    if value is None:
        return "text"
    if not value or len(value) > MAX_TYPE_CHARS:
        raise BadMessage(f"{where}.type: must be 1 to {MAX_TYPE_CHARS} characters")
    return value


def _payload(item: dict[str, Any], where: str) -> dict[str, Any] | None:
    value = item.get("payload")
    if value is not None and not isinstance(value, dict):
        raise BadMessage(f"{where}.payload: must be an object, got {type(value).__name__}")
    return value


def _status_update(item: object, where: str) -> StatusUpdate:
    if not isinstance(item, dict):
        raise BadMessage(f"{where}: must be an object, got {type(item).__name__}")
    status = item.get("status")
    if status not in STATUS_NAMES:
        raise BadMessage(f"{where}.status: must be one of {', '.join(STATUS_NAMES)}")
    error = _string(item, where, "error", required=False)
    return StatusUpdate(_identifier(item, where, "id"), str(status), error)


def _json_body(raw: bytes) -> Any:
    try:
        return json.loads(raw)
    except ValueError as exc:  # also bad UTF-8 and integers over 4300 digits
        raise BadMessage(f"body: not valid JSON ({exc})") from None
    except RecursionError:
        raise BadMessage("body: not valid JSON (nested too deeply)") from None


def parse_updates(
    raw: bytes, tenant_id: str, now: float
) -> tuple[list[Message], list[StatusUpdate]]:
    """The messages and statuses of a ``POST /whatsapp/updates`` body."""
    body = _json_body(raw)
    if not isinstance(body, dict):
        raise BadMessage(f"body: must be an object, got {type(body).__name__}")
    unknown = sorted(set(body) - {"messages", "statuses"})
    if unknown:
        raise BadMessage(f"body.{unknown[0][:80]}: unknown field")
    items, states = body.get("messages", []), body.get("statuses", [])
    if not isinstance(items, list) or not isinstance(states, list):
        raise BadMessage("body: messages and statuses must be lists")
    messages = [parse_message(m, f"messages[{n}]", tenant_id, now) for n, m in enumerate(items)]
    statuses = [_status_update(s, f"statuses[{n}]") for n, s in enumerate(states)]
    return messages, statuses


def parse_body(raw: bytes, tenant_id: str, now: float) -> list[Message]:
    """The messages of a ``POST /messages`` body: one object or a non-empty list."""
    body = _json_body(raw)
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
        apply_statuses: ApplyStatuses | None = None,
        token: str | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.tenant_id = tenant_id
        self.state = IngestState.STARTING
        self._accept = accept
        self._probe = probe
        self._apply_statuses = apply_statuses
        self._clock = clock
        self._token = token  # asked of TCP requests (ingest_tcp.py); never logged
        self._port: int | None = None  # the tenant's TCP port, once listening
        self._unix: tuple[web.UnixSite, Path, int | None] | None = None  # site, path, inode
        self._runner: web.AppRunner | None = None
        self.counters = IngestCounters()
        self.max_connections = MAX_CONNECTIONS
        self.idle_timeout = IDLE_TIMEOUT
        self.body_timeout = BODY_TIMEOUT
        # Each route checks its own limit (`_read`); this is the largest.
        # `_check_tcp` joins the middlewares only with a TCP port (`start`):
        # the unix socket's requests, the gateway's, then skip a layer.
        self.app = web.Application(client_max_size=MAX_UPDATES_BYTES)
        self.app.router.add_post("/messages", self.post_messages)
        self.app.router.add_post("/whatsapp/updates", self.post_updates)
        self.app.router.add_get("/health", self.health)

    async def start(self, socket_path: Path, port: int | None = None) -> None:
        """Listen on the unix socket (0600) and, if given, 127.0.0.1:port."""
        _clear_socket_path(socket_path)
        if port is not None:
            self.app.middlewares.append(self._check_tcp)
        self._runner = web.AppRunner(
            self.app,
            access_log=None,
            handle_signals=False,
            shutdown_timeout=SHUTDOWN_GRACE,
            keepalive_timeout=self.idle_timeout,
            lingering_time=LINGER,
        )
        await self._runner.setup()
        assert self._runner.server is not None
        cap_connections(self._runner.server, self.max_connections, self._count_refused)
        try:
            await self._bind(socket_path)
            if port is not None:
                self._port = port
                await web.TCPSite(self._runner, "127.0.0.1", port).start()
        except BaseException:
            await self.stop()  # e.g. the port is taken: do not keep the socket open
            raise

    async def _bind(self, path: Path) -> None:
        assert self._runner is not None
        site = web.UnixSite(self._runner, str(path))
        with _umask(0o177):  # born 0600: no window where others may connect
            await site.start()
        self._unix = (site, path, _inode(path))

    def socket_replaced(self) -> bool:
        """Whether the unix socket's file was deleted or replaced (one stat call)."""
        if self._unix is None:
            return False
        _site, path, inode = self._unix
        return _inode(path) != inode

    async def keep_socket(self) -> bool:
        """Bind the unix socket again if its file was deleted or replaced; True if it was.

        A listening socket whose file is gone takes no new connection: the
        tenant would be unreachable while shown running.
        """
        if self._unix is None:
            return False
        site, path, inode = self._unix
        if _inode(path) == inode:
            return False
        await site.stop()
        _clear_socket_path(path)
        await self._bind(path)
        return True

    @web.middleware
    async def _check_tcp(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        """Requests on the tenant's TCP port must pass `tcp_refusal`; the unix socket is trusted."""
        here = request.transport.get_extra_info("sockname") if request.transport else None
        over_tcp = self._port is not None and isinstance(here, tuple) and here[1] == self._port
        if over_tcp and (refusal := tcp_refusal(request.method, request.headers, self._token)):
            return _error(*refusal)
        return await handler(request)

    def _count_refused(self) -> None:
        self.counters.refused += 1

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def _body(
        self, request: web.Request, limit: int, parse: Callable[[bytes, str, float], T]
    ) -> T | web.Response:
        """The parsed body, or the answer that refuses it (503, 408, 413, 400)."""
        if self.state is not IngestState.RUNNING:
            return _error(503, f"tenant {self.tenant_id} is {self.state.value}")
        try:
            if request.content.is_eof():  # all here (the usual small body): no timer to arm
                raw = await _read(request, limit)
            else:
                async with asyncio.timeout(self.body_timeout):
                    raw = await _read(request, limit)
        except TimeoutError:
            self.counters.timeouts += 1
            answer = _error(408, f"body not received within {self.body_timeout:g}s")
            answer.force_close()  # what is left of the body is not read: close after
            return answer
        if isinstance(raw, web.Response):
            return raw
        try:
            return parse(raw, self.tenant_id, self._clock())
        except BadMessage as exc:
            return _error(400, str(exc))

    async def post_messages(self, request: web.Request) -> web.Response:
        messages = await self._body(request, MAX_BODY_BYTES, parse_body)
        if isinstance(messages, web.Response):
            return messages
        try:
            result = await self._accept(messages)
        except StoreError as exc:
            return _error(503, f"store unavailable: {exc}")
        return _json_response(
            {
                "accepted": result.accepted,
                "duplicates": result.duplicates,
                "rejected": result.rejected,
            },
            202,
        )

    async def post_updates(self, request: web.Request) -> web.Response:
        """The gateway's messages and statuses: 200 with counts once all are committed."""
        parsed = await self._body(request, MAX_UPDATES_BYTES, parse_updates)
        if isinstance(parsed, web.Response):
            return parsed
        messages, statuses = parsed
        try:
            accepted, counts = await self._commit_updates(messages, statuses)
        except StoreError as exc:
            return _error(503, f"store unavailable: {exc}")
        body = {
            "accepted": accepted.accepted,
            "duplicates": accepted.duplicates,
            "rejected": accepted.rejected,
            "statuses_applied": counts.applied,
            "statuses_stale": counts.stale,
            "statuses_unknown": counts.unknown,
        }
        return _json_response(body, 200)

    async def _commit_updates(
        self, messages: list[Message], statuses: list[StatusUpdate]
    ) -> tuple[Accepted, StatusCounts]:
        """Statuses first (queued, not awaited), then the messages: one group commit."""
        applying: Awaitable[StatusCounts] | None = None
        if statuses:
            if self._apply_statuses is None:
                raise StoreError("this worker takes no delivery statuses")
            applying = self._apply_statuses(statuses)
        try:
            accepted = await self._accept(messages) if messages else Accepted(0, 0, 0)
        finally:
            counts = await applying if applying is not None else StatusCounts()
        return accepted, counts

    async def health(self, _request: web.Request) -> web.Response:
        body = {"tenant": self.tenant_id, "status": self.state.value, **self._probe()}
        return web.json_response(body, status=200 if self.state is IngestState.RUNNING else 503)


async def _read(request: web.Request, limit: int) -> bytes | web.Response:
    """The whole body, or the 413 answer when it is over `limit` bytes."""
    if request.content_length is not None and request.content_length > limit:
        return _error(413, f"body over {limit} bytes")
    try:
        raw = await request.read()
    except web.HTTPRequestEntityTooLarge:
        raw = None
    if raw is None or len(raw) > limit:
        return _error(413, f"body over {limit} bytes")
    return raw


def _inode(path: Path) -> int | None:
    """The inode of the file at `path` (None if there is none): a cheap stat."""
    try:
        return os.stat(path).st_ino
    except FileNotFoundError:
        return None


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
