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
import contextlib
from pathlib import Path

__all__ = ["MAX_HEAD_BYTES", "BadAnswer", "Dropped", "UnixHTTP", "Unreachable"]

MAX_HEAD_BYTES = 64 * 1024
MAX_ANSWER_BYTES = 1 << 20
MAX_IDLE = 4
_ONE_WRITE = 256 * 1024


class Unreachable(ConnectionError):
    """Nothing accepts connections on the socket."""


class Dropped(ConnectionError):
    """The connection ended before the whole answer came."""


class BadAnswer(ValueError):
    """The answer is not HTTP/1.1 with a Content-Length this client can read."""


_Conn = tuple[asyncio.StreamReader, asyncio.StreamWriter]


class UnixHTTP:
    """Posts to one unix socket over kept-alive connections."""

    def __init__(self, path: Path, *, timeout: float, host: str = "worker") -> None:
        self._path = str(path)
        self._timeout = timeout
        self._host = host
        self._idle: list[_Conn] = []

    async def post(self, target: str, body: bytes) -> tuple[int, bytes]:
        """POST `body` (JSON) to `target`; the status and the answer's body."""
        head = (
            f"POST {target} HTTP/1.1\r\nHost: {self._host}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
        ).encode()
        async with asyncio.timeout(self._timeout):
            conn = self._idle.pop() if self._idle else await self._connect()
            try:
                status, keep, answer = await _exchange(conn, head, body)
            except BaseException:
                _close(conn)
                raise
        if keep and len(self._idle) < MAX_IDLE:
            self._idle.append(conn)
        else:
            _close(conn)
        return status, answer

    async def aclose(self) -> None:
        idle, self._idle = self._idle, []
        for conn in idle:
            _close(conn)
            with contextlib.suppress(OSError):
                await conn[1].wait_closed()

    async def _connect(self) -> _Conn:
        try:
            return await asyncio.open_unix_connection(self._path, limit=MAX_HEAD_BYTES)
        except (FileNotFoundError, ConnectionRefusedError) as exc:
            raise Unreachable(f"nothing listens on {self._path} ({exc.strerror})") from None


async def _exchange(conn: _Conn, head: bytes, body: bytes) -> tuple[int, bool, bytes]:
    reader, writer = conn
    try:
        if len(body) <= _ONE_WRITE:  # one send() for the usual small post
            writer.write(head + body)
        else:
            writer.write(head)
            writer.write(body)
        await writer.drain()
        raw_head = await reader.readuntil(b"\r\n\r\n")
        status, length, keep = _parse_head(raw_head)
        return status, keep, await reader.readexactly(length)
    except (asyncio.IncompleteReadError, ConnectionResetError, BrokenPipeError) as exc:
        raise Dropped(f"connection ended mid-answer ({type(exc).__name__})") from None
    except asyncio.LimitOverrunError:
        raise BadAnswer(f"answer head over {MAX_HEAD_BYTES} bytes") from None


def _parse_head(raw: bytes) -> tuple[int, int, bool]:
    """(status, Content-Length, keep-alive) of an answer's head."""
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


def _close(conn: _Conn) -> None:
    conn[1].close()
