"""A minimal HTTP/1.1 client for one unix socket: POST a body, read a sized answer.

The gateway's forwards are its hot path, and all go to chatq's own workers
(aiohttp servers that always answer with a Content-Length): a general client
(aiohttp's ClientSession) cost more CPU per post than the rest of a webhook
put together (bench/gateway_bench.py). This one keeps idle connections for
reuse and knows exactly what it needs: a status line, headers, a body of
Content-Length bytes.

    client = UnixHTTP(path, timeout=10.0)
    status, body = await client.post("/whatsapp/updates", b'{"messages": []}')
    await client.aclose()

Errors: `Unreachable` (nothing listens: connect refused or no socket file),
`Dropped` (the connection ended mid-exchange, e.g. a worker restarted and its
kept-alive connection went stale), `TimeoutError`, `BadAnswer`.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import cast

__all__ = ["MAX_HEAD_BYTES", "BadAnswer", "Dropped", "UnixHTTP", "Unreachable"]

MAX_HEAD_BYTES = 64 * 1024
MAX_ANSWER_BYTES = 1 << 20
MAX_IDLE = 4


class Unreachable(ConnectionError):
    """Nothing accepts connections on the socket."""


class Dropped(ConnectionError):
    """The connection ended before the whole answer came."""


class BadAnswer(ValueError):
    """The answer is not HTTP/1.1 with a Content-Length this client can read."""


class UnixHTTP:
    """Posts to one unix socket over kept-alive connections."""

    def __init__(self, path: Path, *, timeout: float, host: str = "worker") -> None:
        self._path = str(path)
        self._timeout = timeout
        self._host = host
        self._idle: list[_Connection] = []

    async def post(self, target: str, body: bytes) -> tuple[int, bytes]:
        """POST `body` (JSON) to `target`; the status and the answer's body."""
        head = (
            f"POST {target} HTTP/1.1\r\nHost: {self._host}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
        ).encode()
        async with asyncio.timeout(self._timeout):
            conn = self._reuse() or await self._connect()
            try:
                status, keep, answer = await conn.exchange(head + body)
            except BaseException:
                conn.close()
                raise
        if keep and len(self._idle) < MAX_IDLE:
            self._idle.append(conn)
        else:
            conn.close()
        return status, answer

    async def aclose(self) -> None:
        idle, self._idle = self._idle, []
        for conn in idle:
            conn.close()

    def _reuse(self) -> _Connection | None:
        """An idle connection still open (a worker that restarted closed its old ones)."""
        while self._idle:
            conn = self._idle.pop()
            if conn.open:
                return conn
        return None

    async def _connect(self) -> _Connection:
        loop = asyncio.get_running_loop()
        try:
            _, conn = await loop.create_unix_connection(_Connection, self._path)
        except (FileNotFoundError, ConnectionRefusedError) as exc:
            raise Unreachable(f"nothing listens on {self._path} ({exc.strerror})") from None
        return conn


class _Connection(asyncio.Protocol):
    """One connection: writes a request, gathers the bytes of its answer."""

    def __init__(self) -> None:
        self._transport: asyncio.Transport | None = None
        self._buffer = bytearray()
        self._waiter: asyncio.Future[tuple[int, bool, bytes]] | None = None
        self.open = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass
        self.open = True

    def connection_lost(self, exc: Exception | None) -> None:
        self.open = False
        reason = type(exc).__name__ if exc is not None else "closed"
        self._settle(Dropped(f"connection ended mid-answer ({reason})"))

    def data_received(self, data: bytes) -> None:
        self._buffer += data
        if self._waiter is None:
            return
        try:
            answer = _answer(self._buffer)
        except BadAnswer as exc:
            self._settle(exc)
            return
        if answer is not None:
            self._settle(answer)

    async def exchange(self, request: bytes) -> tuple[int, bool, bytes]:
        """Send one request; its (status, keep-alive, body)."""
        assert self._transport is not None and self._waiter is None
        if not self.open:
            raise Dropped("connection ended before the request")
        self._waiter = asyncio.get_running_loop().create_future()
        self._buffer.clear()
        self._transport.write(request)
        return await self._waiter

    def close(self) -> None:
        self.open = False
        if self._transport is not None:
            self._transport.close()

    def _settle(self, outcome: tuple[int, bool, bytes] | Exception) -> None:
        waiter, self._waiter = self._waiter, None
        if waiter is None or waiter.done():
            return
        if isinstance(outcome, Exception):
            waiter.set_exception(outcome)
        else:
            waiter.set_result(outcome)


def _answer(buffer: bytearray) -> tuple[int, bool, bytes] | None:
    """(status, keep-alive, body) once the whole answer is in `buffer`; None before."""
    end = buffer.find(b"\r\n\r\n")
    if end < 0:
        if len(buffer) > MAX_HEAD_BYTES:
            raise BadAnswer(f"answer head over {MAX_HEAD_BYTES} bytes")
        return None
    status, length, keep = _parse_head(bytes(buffer[:end]))
    if len(buffer) < end + 4 + length:
        return None
    return status, keep, bytes(buffer[end + 4 : end + 4 + length])


def _parse_head(raw: bytes) -> tuple[int, int, bool]:
    """(status, Content-Length, keep-alive) of an answer's head (without its blank line)."""
    lines = raw.decode("latin-1").split("\r\n")
    parts = lines[0].split(" ", 2)
    if len(parts) < 2 or parts[0] != "HTTP/1.1" or not parts[1].isdigit():
        raise BadAnswer(f"not an HTTP/1.1 status line: {lines[0][:80]!r}")
    headers = {}
    for line in lines[1:]:
        name, sep, value = line.partition(":")
        if sep:
            headers[name.strip().lower()] = value.strip()
    length = headers.get("content-length", "")
    if not length.isdigit() or int(length) > MAX_ANSWER_BYTES:
        raise BadAnswer(f"answer without a usable Content-Length: {length[:20]!r}")
    keep = headers.get("connection", "").lower() != "close"
    return int(parts[1]), int(length), keep
