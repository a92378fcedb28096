"""An HTTP/1.1 server: aiohttp's request parser under a lean connection protocol.

    server = await HttpServer(handle, max_body_bytes=4 << 20).listen("127.0.0.1", 8080)
    server = await HttpServer(handle, max_body_bytes=1 << 20).listen_unix("run/acme.sock")
    ...
    await server.close(grace=11.0)   # stop listening; finish answers in progress

It serves the gateway's public endpoint and each worker's ingest (its unix
socket, and its TCP port if it has one).

`handle(request)` gets a `Request` whose body is already read (None: over
`max_body_bytes`, not read; the connection closes after the answer) and
returns an `Answer`. aiohttp's web Application (request and response
objects, router, middlewares, its writer) cost ~100 us of CPU per request on
this box; aiohttp's own parser (llhttp, in C: framing, chunked bodies,
header limits, Content-Encoding) under this protocol ~35 us
(BENCHMARKS.md, gateway third pass). What the protocol keeps of HTTP/1.1:
keep-alive (closed when the client asks, after an error or a refused body,
and when idle `KEEPALIVE_S`), pipelined requests answered one at a time in
order, ``Expect: 100-continue``, HEAD, and a 400 that closes the connection
for what the parser refuses. A body still arriving `body_timeout` seconds
after its head is answered 408 and its connection closed: on a public
endpoint, clients that trickle bodies must not hold connections (and file
descriptors) for ever. Past `max_connections` open ones, a new connection
is answered 503 (``Retry-After: 1``, ``Connection: close``) before anything
is read, and closed: a flood of connections cannot take the file
descriptors the process needs (the gateway's forwards to the workers).

A path can have its own body limit (`limit_for`). When an answer goes
before the body was read (413, 408, a broken chunk), the connection is
half-closed and what still comes is read and dropped for `linger` seconds
before it is closed: closed at once with input unread, the client's
connection is reset and it may never see the answer.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import deque
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from email.utils import formatdate
from http import HTTPStatus
from typing import Any

import orjson
from aiohttp.base_protocol import BaseProtocol
from aiohttp.http import HttpProcessingError, HttpRequestParser, RawRequestMessage
from aiohttp.streams import StreamReader
from loguru import logger
from multidict import CIMultiDictProxy

__all__ = [
    "BODY_TIMEOUT_S",
    "KEEPALIVE_S",
    "LINGER_S",
    "MAX_CONNECTIONS",
    "Answer",
    "Handler",
    "HttpServer",
    "Request",
]

KEEPALIVE_S = 75.0  # an idle keep-alive connection is closed after this (aiohttp's default)
LINGER_S = 1.0  # after an early answer, how long the rest of a body is read and dropped
BODY_TIMEOUT_S = 10.0  # a body not whole this long after its head: 408, closed
MAX_CONNECTIONS = 1024  # open at once: far above what a webhook sender keeps (the bench: 64)
READ_BUFSIZE = 1 << 16
MAX_PIPELINED = 8  # requests queued on one connection before it stops reading


@dataclass(frozen=True, slots=True)
class Request:
    """One parsed request; `body` None when it is over the size limit (not read)."""

    message: RawRequestMessage
    body: bytes | None

    @property
    def method(self) -> str:
        return self.message.method

    @property
    def path(self) -> str:
        """The decoded path, without the query."""
        return self.message.url.path

    @property
    def query(self) -> Mapping[str, str]:
        return self.message.url.query

    @property
    def headers(self) -> CIMultiDictProxy[str]:
        return self.message.headers


@dataclass(frozen=True, slots=True)
class Answer:
    status: int
    body: bytes
    content_type: str = "application/json"
    headers: tuple[tuple[str, str], ...] = ()

    @classmethod
    def json(cls, status: int, value: Any) -> Answer:
        return cls(status, orjson.dumps(value))


Handler = Callable[[Request], Awaitable[Answer]]
_Queued = tuple[RawRequestMessage, StreamReader] | HttpProcessingError


class HttpServer:
    """The listening socket and its connections."""

    def __init__(
        self,
        handle: Handler,
        *,
        max_body_bytes: int,
        keepalive: float = KEEPALIVE_S,
        body_timeout: float = BODY_TIMEOUT_S,
        max_connections: int = MAX_CONNECTIONS,
        limit_for: Callable[[str], int] | None = None,
        linger: float = LINGER_S,
        on_refused: Callable[[], None] = lambda: None,
        on_timeout: Callable[[], None] = lambda: None,
    ) -> None:
        self.handle = handle
        self.max_body = max_body_bytes
        # A path's body limit (at most `max_body_bytes`); without it, that for all.
        self.limit_for = limit_for or (lambda _path: max_body_bytes)
        self.linger = linger
        self.on_timeout = on_timeout  # a body did not arrive within body_timeout (408)
        self.keepalive = keepalive
        self.body_timeout = body_timeout
        self.max_connections = max_connections
        self.on_refused = on_refused  # a connection past the cap was turned away
        self.busy = _busy_answer(max_connections)
        self.connections: set[_Connection] = set()
        self.closing = False
        self.port = 0  # the port listened on (a port 0 asked for is chosen by the system)
        self._all_closed = asyncio.Event()  # set when closing and the last connection ends
        self._listeners: list[asyncio.Server] = []
        self._sweeper: asyncio.Task[None] | None = None
        self._date = (0, b"")

    async def listen(self, host: str, port: int) -> HttpServer:
        """Listen on host:port; itself (OSError as the loop raises it, e.g. EADDRINUSE)."""
        loop = asyncio.get_running_loop()
        listener = await loop.create_server(
            lambda: _Connection(self, loop), host, port, reuse_address=True
        )
        self.port = int(listener.sockets[0].getsockname()[1])
        return self._listening(listener)

    async def listen_unix(self, path: str) -> HttpServer:
        """Listen on a unix socket at `path` (the caller sets its mode, e.g. by umask)."""
        loop = asyncio.get_running_loop()
        listener = await loop.create_unix_server(lambda: _Connection(self, loop), path)
        return self._listening(listener)

    def stop_listening(self) -> None:
        """Take no new connection (to listen again elsewhere); the open ones go on."""
        for listener in self._listeners:
            listener.close()
        self._listeners.clear()

    def _listening(self, listener: asyncio.Server) -> HttpServer:
        self._listeners.append(listener)
        if self._sweeper is None:
            self._sweeper = asyncio.create_task(self._sweep())
        return self

    async def close(self, grace: float) -> None:
        """Stop listening, close idle connections, give answers in progress `grace` s."""
        self.closing = True
        if self._sweeper is not None:
            self._sweeper.cancel()
        listeners = list(self._listeners)
        self.stop_listening()
        for conn in list(self.connections):
            conn.close_if_idle()
        if self.connections:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(grace):
                    await self._all_closed.wait()
        for conn in list(self.connections):
            conn.abort()
        for listener in listeners:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(1.0):
                    await listener.wait_closed()

    def forget(self, conn: _Connection) -> None:
        """A connection ended."""
        self.connections.discard(conn)
        if self.closing and not self.connections:
            self._all_closed.set()

    def date(self) -> bytes:
        """The Date header's value, formatted once a second."""
        now = int(time.time())
        if self._date[0] != now:
            self._date = (now, formatdate(now, usegmt=True).encode())
        return self._date[1]

    async def _sweep(self) -> None:
        """Close keep-alive connections idle for longer than `keepalive`."""
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(self.keepalive / 4)
            idle_before = loop.time() - self.keepalive
            for conn in list(self.connections):
                if conn.idle_since is not None and conn.idle_since < idle_before:
                    conn.close_if_idle()


class _Connection(BaseProtocol):
    """One client connection: parse, queue, answer one request at a time."""

    def __init__(self, server: HttpServer, loop: asyncio.AbstractEventLoop) -> None:
        parser = HttpRequestParser(self, loop, READ_BUFSIZE, payload_exception=BadBody)
        super().__init__(loop, parser)
        self._server = server
        self._queue: deque[_Queued] = deque()
        self._busy = False
        self._closing = False  # no more requests read; close after the current answer
        self._task: asyncio.Task[None] | None = None
        self._reading: StreamReader | None = None  # the body being read, if any
        self._unread = False  # answered before its body was read: linger before closing
        self._lingering: asyncio.TimerHandle | None = None
        self.idle_since: float | None = loop.time()  # None while a request is handled

    # -- the protocol ---------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        self._server.connections.add(self)
        if len(self._server.connections) > self._server.max_connections:
            self._server.on_refused()
            self._closing = True  # nothing of it is read
            self._send(self._server.busy)
            transport.close()  # once the answer is written

    def connection_lost(self, exc: BaseException | None) -> None:
        super().connection_lost(exc)
        self._server.forget(self)
        self._closing = True
        if self._lingering is not None:
            self._lingering.cancel()
        self._fail_bodies(ConnectionResetError("connection lost"))
        self._queue.clear()

    def data_received(self, data: bytes) -> None:
        if self._closing or self._parser is None:
            return
        try:
            messages, upgraded, _ = self._parser.feed_data(data)
        except HttpProcessingError as exc:
            self._fail_bodies(BadBody(exc.message))  # a broken chunk: the body being read
            self._queue.append(exc)
            self._closing = True
        else:
            self._queue.extend(messages)
            if upgraded:  # nothing here speaks another protocol: answer, then close
                self._closing = True
        if len(self._queue) >= MAX_PIPELINED:
            self._pause_reading_for_buffer()
        if not self._busy and self._queue:
            self._next()

    def _fail_bodies(self, exc: Exception) -> None:
        """Wake whoever reads a body that will not be completed, with `exc`."""
        payloads = [item[1] for item in self._queue if not isinstance(item, HttpProcessingError)]
        for payload in [self._reading, *payloads]:
            if payload is not None and not payload.is_eof():
                payload.set_exception(exc)

    def resume_reading(self, resume_parser: bool = True) -> None:
        """Only when paused: a body's reader calls this after every read, and the
        base class then re-feeds the parser an empty chunk (~10 us each time)."""
        if self._reading_paused:
            super().resume_reading(resume_parser)

    # -- requests -----------------------------------------------------------------------

    def close_if_idle(self) -> None:
        self._closing = True
        if not self._busy and self.transport is not None:
            self.transport.close()

    def abort(self) -> None:
        if self.transport is not None:
            self.transport.abort()

    def _next(self) -> None:
        self._busy = True
        self.idle_since = None
        item = self._queue.popleft()
        if self._buffer_paused and len(self._queue) < MAX_PIPELINED // 2:
            self._resume_reading_for_buffer()
        self._task = asyncio.create_task(self._run(item))

    async def _run(self, item: _Queued) -> None:
        head_only = False
        try:
            if isinstance(item, HttpProcessingError):
                self._unread = True  # the rest of the input is not read
                answer, close = _refusal(item), True
            else:
                head_only = item[0].method == "HEAD"
                answer, close = await self._answer(*item)
        except ConnectionResetError:  # the client went away mid-body: nobody to answer
            return
        except Exception as exc:
            logger.opt(exception=exc).error("HTTP request failed")
            answer, close = Answer.json(500, {"error": "internal error"}), True
        finally:
            self._busy = False
            self._task = None
        self._write(answer, close or self._closing or self._server.closing, head_only)
        if self._closing or self.transport is None or self.transport.is_closing():
            return
        if self._queue:
            self._next()
        else:
            self.idle_since = self._loop.time()

    async def _answer(
        self, message: RawRequestMessage, payload: StreamReader
    ) -> tuple[Answer, bool]:
        self._reading = payload
        try:
            body = await self._body(message, payload)
        except BadBody as exc:
            self._unread = True
            return Answer.json(400, {"error": f"bad request body: {exc}"[:300]}), True
        except TimeoutError:
            self._unread = True
            self._server.on_timeout()
            within = f"{self._server.body_timeout:g}"
            return Answer.json(408, {"error": f"body not received within {within}s"}), True
        finally:
            self._reading = None
        self._unread = body is None
        answer = await self._server.handle(Request(message, body))
        return answer, message.should_close or body is None

    async def _body(self, message: RawRequestMessage, payload: StreamReader) -> bytes | None:
        """The whole body; None (unread) when over the path's limit."""
        limit = min(self._server.max_body, self._server.limit_for(message.url.path))
        length = message.headers.get("Content-Length")
        if length is not None and int(length) > limit:
            return None
        if payload.is_eof():  # the usual small request: all of it came with the head
            body = payload.read_nowait()
            return body if len(body) <= limit else None
        if message.headers.get("Expect", "").lower() == "100-continue":
            self._send(b"HTTP/1.1 100 Continue\r\n\r\n")
        chunks: list[bytes] = []
        size = 0
        async with asyncio.timeout(self._server.body_timeout):
            while chunk := await payload.readany():
                size += len(chunk)
                if size > limit:
                    return None
                chunks.append(chunk)
        return b"".join(chunks)

    def _write(self, answer: Answer, close: bool, head_only: bool) -> None:
        reason = _REASONS.get(answer.status, b"")
        head = b"HTTP/1.1 %d %s\r\nContent-Type: %s\r\nContent-Length: %d\r\nDate: %s\r\n" % (
            answer.status,
            reason,
            answer.content_type.encode(),
            len(answer.body),
            self._server.date(),
        )
        for name, value in answer.headers:
            head += f"{name}: {value}\r\n".encode("latin-1")
        if close:
            head += b"Connection: close\r\n"
            self._closing = True
        self._send(head + b"\r\n" if head_only else head + b"\r\n" + answer.body)
        if close:
            self._end()

    def _end(self) -> None:
        """Close after the answer; first read and drop what may still come of an unread body."""
        transport = self.transport
        if transport is None:
            return
        if not self._unread or not transport.can_write_eof():
            transport.close()
            return
        transport.write_eof()  # the client reads the answer, then the end
        self._lingering = self._loop.call_later(self._server.linger, transport.close)

    def _send(self, data: bytes) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(data)


class BadBody(Exception):
    """The body's framing was broken (e.g. a bad chunk); answered 400."""


def _busy_answer(limit: int) -> bytes:
    """The whole answer to a connection past `limit` open ones, sent before reading it."""
    body = orjson.dumps({"error": f"too many connections (over {limit}); try again"})
    head = (
        "HTTP/1.1 503 Service Unavailable\r\n"
        "Content-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n"
        "Retry-After: 1\r\n"
        "Connection: close\r\n\r\n"
    )
    return head.encode() + body


def _refusal(exc: HttpProcessingError) -> Answer:
    status = exc.code if 400 <= exc.code < 500 else 400
    return Answer.json(status, {"error": f"bad request: {exc.message}"[:300]})


_REASONS = {status.value: status.phrase.encode() for status in HTTPStatus}
