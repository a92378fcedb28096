"""The answer to a connection over a server's cap: 503, ``Retry-After: 1``, closed.

Written raw, before anything of the request is read: the gateway's server
(supervisor/gateway/http_server.py) and the worker's ingest
(tenant_worker/ingest_guard.py) both send it past their connection caps.
"""

from __future__ import annotations

import json

__all__ = ["busy_answer"]


def busy_answer(limit: int) -> bytes:
    """The whole HTTP/1.1 answer for a connection past `limit` open ones."""
    body = json.dumps({"error": f"too many connections (over {limit}); try again"}).encode()
    head = (
        "HTTP/1.1 503 Service Unavailable\r\n"
        "Content-Type: application/json; charset=utf-8\r\n"
        f"Content-Length: {len(body)}\r\n"
        "Retry-After: 1\r\n"
        "Connection: close\r\n\r\n"
    )
    return head.encode() + body
