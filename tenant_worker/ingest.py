"""HTTP ingest for one tenant: ``POST /messages``, ``POST /whatsapp/updates``, ``GET /health``.

Served on the unix socket ``<run_dir>/<tenant>.sock`` (mode 0600) and, if
the tenant has a ``port``, on 127.0.0.1:port, by the lean HTTP/1.1 server the
gateway uses too (shared/http_server.py): aiohttp's web Application cost a
worker ~250 us of CPU per request more (7 % of its CPU under the gateway
bench) and ~2 MB of memory (BENCHMARKS.md, gateway fifth pass). A request is
answered 202 (200 for updates) only after its rows are committed; a refused
request (400, 404, 405, 408, 413, 503) writes nothing. Connections are capped
and timed (tenant_worker/ingest_guard.py). Other parts of the worker add
routes of their own (`add_route`; redrive.py), some for the unix socket only.

``POST /whatsapp/updates`` is the gateway's way in (supervisor/gateway/):
``{"messages": [message, ...], "statuses": [{"id", "status", "error"?}, ...]}``
where a message is what ``/messages`` takes; the statuses are applied to the
replies with that provider_id in the same commit as the messages (when the
store groups them, as it does for writes submitted together).
"""

from __future__ import annotations

import asyncio
import math
import os
import time
from collections.abc import Awaitable, Callable, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Any, TypeVar

from chatq.shared import json_codec
from chatq.shared.errors import StoreError
from chatq.shared.http_server import Answer, HttpServer, Request
from chatq.tenant_worker.ingest_guard import (
    BODY_TIMEOUT,
    IDLE_TIMEOUT,
    LINGER,
    MAX_CONNECTIONS,
    IngestCounters,
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
Route = Callable[[Request], Awaitable[Answer]]
T = TypeVar("T")


class IngestState(Enum):
    STARTING = "starting"
    RUNNING = "running"
    DRAINING = "draining"


class BadMessage(ValueError):
    """A request body that does not describe valid messages (answered 400)."""


def error_answer(status: int, message: str) -> Answer:
    return json_answer(status, {"error": message})


def json_answer(status: int, body: dict[str, Any]) -> Answer:
    return Answer(status, json_codec.dumps(body))  # an error may quote a lone surrogate


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
        return json_codec.loads(raw)
    except ValueError as exc:  # json's: also bad UTF-8 and integers over 4300 digits
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


@dataclass(frozen=True, slots=True)
class _Route:
    serve: Route
    max_body: int  # bytes; a body over it is answered 413 unread
    unix_only: bool  # over TCP: 403


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
        self._servers: list[HttpServer] = []
        self._unix: tuple[HttpServer, Path, int | None] | None = None  # server, path, inode
        self.counters = IngestCounters()
        self.max_connections = MAX_CONNECTIONS
        self.idle_timeout = IDLE_TIMEOUT
        self.body_timeout = BODY_TIMEOUT
        self._routes: dict[str, dict[str, _Route]] = {}  # path -> method -> route
        self.add_route("POST", "/messages", self.post_messages, MAX_BODY_BYTES)
        self.add_route("POST", "/whatsapp/updates", self.post_updates, MAX_UPDATES_BYTES)
        self.add_route("GET", "/health", self.health)

    def add_route(
        self, method: str, path: str, serve: Route, max_body: int = 0, *, unix_only: bool = False
    ) -> None:
        """Serve `method` on `path`; its body is at most `max_body` bytes (413 beyond)."""
        if max_body > MAX_UPDATES_BYTES:
            raise ValueError(f"a route's body limit is at most {MAX_UPDATES_BYTES} bytes")
        self._routes.setdefault(path, {})[method] = _Route(serve, max_body, unix_only)

    async def start(self, socket_path: Path, port: int | None = None) -> None:
        """Listen on the unix socket (0600) and, if given, 127.0.0.1:port."""
        _clear_socket_path(socket_path)
        try:
            await self._bind(self._server(self._serve_unix), socket_path)
            if port is not None:
                await self._server(self._serve_tcp).listen("127.0.0.1", port)
        except BaseException:
            await self.stop()  # e.g. the port is taken: do not keep the socket open
            raise

    def _server(self, serve: Route) -> HttpServer:
        server = HttpServer(
            serve,
            max_body_bytes=MAX_UPDATES_BYTES,
            keepalive=self.idle_timeout,
            body_timeout=self.body_timeout,
            max_connections=self.max_connections,
            limit_for=self._limit_for,
            linger=LINGER,
            on_refused=self._count_refused,
            on_timeout=self._count_timeout,
        )
        self._servers.append(server)
        return server

    async def _bind(self, server: HttpServer, path: Path) -> None:
        with _umask(0o177):  # born 0600: no window where others may connect
            await server.listen_unix(str(path))
        self._unix = (server, path, _inode(path))

    def socket_replaced(self) -> bool:
        """Whether the unix socket's file was deleted or replaced (one stat call)."""
        if self._unix is None:
            return False
        _server, path, inode = self._unix
        return _inode(path) != inode

    async def keep_socket(self) -> bool:
        """Bind the unix socket again if its file was deleted or replaced; True if it was.

        A listening socket whose file is gone takes no new connection: the
        tenant would be unreachable while shown running.
        """
        if self._unix is None:
            return False
        server, path, inode = self._unix
        if _inode(path) == inode:
            return False
        server.stop_listening()  # its open connections go on
        _clear_socket_path(path)
        await self._bind(server, path)
        return True

    async def stop(self) -> None:
        servers, self._servers = self._servers, []
        await asyncio.gather(*(server.close(grace=SHUTDOWN_GRACE) for server in servers))

    def _count_refused(self) -> None:
        self.counters.refused += 1

    def _count_timeout(self) -> None:
        self.counters.timeouts += 1

    def _limit_for(self, path: str) -> int:
        """The largest body a route on `path` takes; 0 (unread) for an unknown path."""
        return max((r.max_body for r in self._routes.get(path, {}).values()), default=0)

    async def _serve_unix(self, request: Request) -> Answer:
        return await self._dispatch(request, over_tcp=False)

    async def _serve_tcp(self, request: Request) -> Answer:
        """Requests on the tenant's TCP port must pass `tcp_refusal`; the unix socket is trusted."""
        if refusal := tcp_refusal(request.method, request.headers, self._token):
            return error_answer(*refusal)
        return await self._dispatch(request, over_tcp=True)

    async def _dispatch(self, request: Request, *, over_tcp: bool) -> Answer:
        methods = self._routes.get(request.path)
        if methods is None:
            return error_answer(404, f"no such path: {request.path[:100]}")
        route = methods.get("GET" if request.method == "HEAD" else request.method)
        if route is None:
            allowed = ", ".join(sorted(methods))
            return error_answer(405, f"{request.method[:20]} not allowed here; use {allowed}")
        if over_tcp and route.unix_only:
            return error_answer(403, f"{request.path} is served on the unix socket only")
        if request.body is None and route.max_body:
            return error_answer(413, f"body over {route.max_body} bytes")
        return await route.serve(request)

    def _parse(self, request: Request, parse: Callable[[bytes, str, float], T]) -> T | Answer:
        """The parsed body, or the answer that refuses it (503, 400)."""
        if self.state is not IngestState.RUNNING:
            return error_answer(503, f"tenant {self.tenant_id} is {self.state.value}")
        assert request.body is not None  # over its limit: answered 413 (`_dispatch`)
        try:
            return parse(request.body, self.tenant_id, self._clock())
        except BadMessage as exc:
            return error_answer(400, str(exc))

    async def post_messages(self, request: Request) -> Answer:
        messages = self._parse(request, parse_body)
        if isinstance(messages, Answer):
            return messages
        try:
            result = await self._accept(messages)
        except StoreError as exc:
            return error_answer(503, f"store unavailable: {exc}")
        return json_answer(
            202,
            {
                "accepted": result.accepted,
                "duplicates": result.duplicates,
                "rejected": result.rejected,
            },
        )

    async def post_updates(self, request: Request) -> Answer:
        """The gateway's messages and statuses: 200 with counts once all are committed."""
        parsed = self._parse(request, parse_updates)
        if isinstance(parsed, Answer):
            return parsed
        messages, statuses = parsed
        try:
            accepted, counts = await self._commit_updates(messages, statuses)
        except StoreError as exc:
            return error_answer(503, f"store unavailable: {exc}")
        body = {
            "accepted": accepted.accepted,
            "duplicates": accepted.duplicates,
            "rejected": accepted.rejected,
            "statuses_applied": counts.applied,
            "statuses_stale": counts.stale,
            "statuses_unknown": counts.unknown,
        }
        return json_answer(200, body)

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

    async def health(self, _request: Request) -> Answer:
        body = {"tenant": self.tenant_id, "status": self.state.value, **self._probe()}
        return json_answer(200 if self.state is IngestState.RUNNING else 503, body)


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
