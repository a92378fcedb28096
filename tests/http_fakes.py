"""A fake web service on a real local aiohttp server, for the http handler and webhook tests.

Use it from a fixture::

    @pytest.fixture
    async def service() -> AsyncIterator[FakeService]:
        async with serving("/h") as svc:
            yield svc
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import AsyncIterator
from typing import Any

from aiohttp import web
from aiohttp.test_utils import TestServer

__all__ = ["FakeService", "free_port", "serving"]


def free_port() -> int:
    """A port nothing listens on (bound, then released)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


class FakeService:
    """Answers POSTs with the status, body and headers a test sets; records the requests."""

    def __init__(self) -> None:
        self.url = ""
        self.requests: list[Any] = []
        self.status = 200
        self.body = b""
        self.delay = 0.0
        self.raw: list[bytes] = []  # request bodies as sent (signatures cover these)
        self.headers: list[dict[str, str]] = []
        self.reply_headers: dict[str, str] = {}

    async def handle(self, request: web.Request) -> web.Response:
        self.raw.append(await request.read())
        self.headers.append(dict(request.headers))
        self.requests.append(await request.json())
        if self.delay:
            await asyncio.sleep(self.delay)
        return web.Response(status=self.status, body=self.body or None, headers=self.reply_headers)

    def answer(self, status: int, body: bytes = b"") -> None:
        self.status, self.body = status, body


@contextlib.asynccontextmanager
async def serving(path: str) -> AsyncIterator[FakeService]:
    """A `FakeService` answering POST `path` on 127.0.0.1, its `url` set; stopped on exit."""
    service = FakeService()
    app = web.Application()
    app.router.add_post(path, service.handle)
    async with TestServer(app, host="127.0.0.1") as server:
        service.url = str(server.make_url(path))
        yield service
