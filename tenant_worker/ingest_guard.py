"""Ingest's limits on connections: how many, and how long one may idle or trickle.

Without them, connections that send nothing, half a header or half a body,
and idle keep-alives stayed open for ever: 300 of them exhausted a worker's
file descriptors while `chatq list` showed it running. So
(shared/http_server.py enforces them):

- **idle** (`IDLE_TIMEOUT`): a connection that has not sent a whole request
  header that long after it opened or after its last answer is closed;
- **body** (`BODY_TIMEOUT`): a body not fully arrived that long after its
  header is answered 408 and the connection closed (`LINGER` later);
- **cap** (`MAX_CONNECTIONS`, each for the unix socket and the TCP port): a
  connection past the cap is answered 503 (``Connection: close``) at once
  and closed, before reading anything.

Refusals (cap) and timeouts (body) are counted; they reach `chatq status`
and the metrics through the heartbeat.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = [
    "BODY_TIMEOUT",
    "IDLE_TIMEOUT",
    "LINGER",
    "MAX_CONNECTIONS",
    "IngestCounters",
]

MAX_CONNECTIONS = 256  # far above what the gateway (4 idle) and any sane sender keep open
IDLE_TIMEOUT = 10.0
BODY_TIMEOUT = 10.0
# After an early answer (408, 413), how long the rest of a body is read and
# dropped so the client sees the answer.
LINGER = 1.0


@dataclass(slots=True)
class IngestCounters:
    """What ingest turned away since the worker started."""

    refused: int = 0  # connections past the cap (answered 503)
    timeouts: int = 0  # bodies too slow to arrive (answered 408)
