"""What ingest asks of a request that came over TCP (the optional ``port``).

The unix socket is the safe default: mode 0600, only the service user (and
root) can connect, and no browser can reach it. A TCP port on 127.0.0.1 is
open to every local user and to any web page in a browser on the host, which
may POST cross-origin as ``text/plain`` without a preflight. So over TCP:

- a request carrying an ``Origin`` header (sent by browsers) is refused: 403;
- with the tenant's ``ingest_token`` set, ``Authorization: Bearer <token>``
  is required (compared in constant time): 401;
- a POST must be ``Content-Type: application/json`` (a type a page cannot
  send cross-origin without a preflight, which nothing here answers): 415.
"""

from __future__ import annotations

import hmac
from collections.abc import Mapping

__all__ = ["tcp_refusal"]


def tcp_refusal(
    method: str, headers: Mapping[str, str], token: str | None
) -> tuple[int, str] | None:
    """Why a TCP request is refused (status, message), or None to serve it."""
    if "Origin" in headers:
        return 403, "requests from web pages (with an Origin header) are refused"
    if token is not None and not _bearer_matches(headers.get("Authorization", ""), token):
        return 401, "missing or wrong bearer token (Authorization: Bearer ...)"
    content_type = headers.get("Content-Type", "").partition(";")[0].strip().lower()
    if method == "POST" and content_type != "application/json":
        return 415, "Content-Type must be application/json"
    return None


def _bearer_matches(header: str, token: str) -> bool:
    scheme, _, given = header.partition(" ")
    return scheme.lower() == "bearer" and hmac.compare_digest(
        given.strip().encode(), token.encode()
    )
