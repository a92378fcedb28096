"""Ingest's limits on connections: how many, and how long one may idle or trickle.

Without them, connections that send nothing, half a header or half a body,
and idle keep-alives stayed open for ever: 300 of them exhausted a worker's
file descriptors while `chatq list` showed it running. So:

- **idle** (`IDLE_TIMEOUT`): a connection that has not sent a whole request
  header that long after it opened or after its last answer is closed
  (aiohttp's keep-alive timer, which also runs from the open in the
  aiohttp pyproject.toml asks for);
- **body** (`BODY_TIMEOUT`): a body not fully arrived that long after its
  header is answered 408 and the connection closed (`LINGER` later);
- **cap** (`MAX_CONNECTIONS`): a connection past the cap is answered 503
  (``Connection: close``) at once and closed, before reading anything.

Refusals (cap) and timeouts (body) are counted; they reach `chatq status`
and the metrics through the heartbeat.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass

from aiohttp import web
from aiohttp.web_protocol import RequestHandler

from chatq.shared.http_busy import busy_answer

__all__ = [
    "BODY_TIMEOUT",
    "IDLE_TIMEOUT",
    "LINGER",
    "MAX_CONNECTIONS",
    "IngestCounters",
    "cap_connections",
]

MAX_CONNECTIONS = 256  # far above what the gateway (4 idle) and any sane sender keep open
IDLE_TIMEOUT = 10.0
BODY_TIMEOUT = 10.0
# After an early answer (408, 413), how long the rest of a body is read and
# dropped so the client sees the answer (aiohttp's default: 10 s more).
LINGER = 1.0


@dataclass(slots=True)
class IngestCounters:
    """What ingest turned away since the worker started."""

    refused: int = 0  # connections past the cap (answered 503)
    timeouts: int = 0  # bodies too slow to arrive (answered 408)


def cap_connections(server: web.Server, limit: int, on_refused: Callable[[], None]) -> None:
    """Answer 503 and close every connection `server` gets past `limit` open ones."""
    admit = server.connection_made
    answer = busy_answer(limit)

    def connection_made(handler: RequestHandler, transport: asyncio.Transport) -> None:
        admit(handler, transport)
        if len(server.connections) > limit:
            on_refused()
            transport.write(answer)
            transport.close()  # once the answer is written; the handler sees it lost

    server.connection_made = connection_made  # type: ignore[method-assign]
