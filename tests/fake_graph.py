"""A fake Graph API (Meta's Cloud API send endpoint) on 127.0.0.1, for tests and benchmarks.

    async with fake_graph() as graph:
        graph.script("15550001", error(130429), error(130429))   # then success
        graph.always = error(190)                                 # every recipient
        ... point a tenant's whatsapp.graph_url at graph.url ...
        graph.requests   # every request: path, headers, JSON body, receive time

It answers ``POST /{version}/{phone_number_id}/messages``: per recipient
(``to``), the scripted answers in order, then success with a fresh wamid.
Answers: `OK`, `error(code)` (Meta's error body, HTTP 400 unless told),
`HTTP_500` (a server page, no JSON) and `HANG` (no answer until the fake
stops: the client's timeout fires).

`fake_graph_in_thread()` runs one on its own loop in a thread, for tests
whose waits block (the supervisor harness) and for benchmarks.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import threading
import time
from collections import defaultdict, deque
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

__all__ = [
    "HANG",
    "HTTP_500",
    "OK",
    "Answer",
    "FakeGraph",
    "GraphRequest",
    "documented_text_message",
    "error",
    "fake_graph",
    "fake_graph_in_thread",
]


@dataclass(frozen=True, slots=True)
class Answer:
    """How the fake answers one request."""

    status: int = 200
    code: int | None = None  # a Graph error code: Meta's error body
    hang: bool = False
    raw: bytes | None = None  # a body that is not Meta's JSON


OK = Answer()
HTTP_500 = Answer(status=500, raw=b"<html><body>Internal Server Error</body></html>")
HANG = Answer(hang=True)


def documented_text_message(to: str, body: str) -> dict[str, Any]:
    """A text message's JSON body as Meta's reference writes it (the oracle for tests)."""
    return {
        "messaging_product": "whatsapp",
        "recipient_type": "individual",
        "to": to,
        "type": "text",
        "text": {"preview_url": False, "body": body},
    }


def error(code: int, status: int = 400, message: str = "") -> Answer:
    """Meta's error answer for `code` (HTTP 400, as Meta sends most of them)."""
    return Answer(status=status, code=code, raw=message.encode() if message else None)


@dataclass(frozen=True, slots=True)
class GraphRequest:
    """One request the fake received."""

    path: str
    headers: dict[str, str]
    body: Any
    at: float  # time.monotonic() when its body was read
    answer: Answer
    wamid: str | None  # the id handed out, for a success

    @property
    def to(self) -> str:
        return str(self.body.get("to")) if isinstance(self.body, dict) else ""

    @property
    def text(self) -> str:
        return str(self.body["text"]["body"])


@dataclass
class FakeGraph:
    """Records requests and answers them by script; `url` is set once serving."""

    url: str = ""
    requests: list[GraphRequest] = field(default_factory=list)
    always: Answer | None = None  # overrides the scripts while set
    clock: Callable[[], float] = time.monotonic
    _scripts: dict[str, deque[Answer]] = field(default_factory=lambda: defaultdict(deque))
    _ids: itertools.count[int] = field(default_factory=lambda: itertools.count(1))
    _release: asyncio.Event = field(default_factory=asyncio.Event)

    def script(self, to: str, *answers: Answer) -> None:
        """Answer the next requests to `to` with `answers`, in order (then OK)."""
        self._scripts[to].extend(answers)

    def sent(self, to: str | None = None) -> list[GraphRequest]:
        """The requests answered with success (to one recipient, if given), in order."""
        return [r for r in self.requests if r.wamid and (to is None or r.to == to)]

    async def handle(self, request: web.Request) -> web.Response:
        raw = await request.read()
        try:
            body = json.loads(raw)
        except ValueError:
            body = None
        received = self.clock()
        answer = self._next(body)
        wamid = f"wamid.fake{next(self._ids)}" if answer == OK else None
        self.requests.append(
            GraphRequest(request.path, dict(request.headers), body, received, answer, wamid)
        )
        if answer.hang:
            await self._release.wait()
        return self._respond(answer, wamid)

    def release(self) -> None:
        """Let hanging requests end (their clients gave up long ago)."""
        self._release.set()

    def _next(self, body: Any) -> Answer:
        if self.always is not None:
            return self.always
        to = str(body.get("to")) if isinstance(body, dict) else ""
        script = self._scripts.get(to)
        return script.popleft() if script else OK

    def _respond(self, answer: Answer, wamid: str | None) -> web.Response:
        if answer.code is not None:
            message = answer.raw.decode() if answer.raw else f"(#{answer.code}) fake error"
            error_body = {
                "error": {
                    "message": message,
                    "type": "OAuthException",
                    "code": answer.code,
                    "error_data": {"messaging_product": "whatsapp", "details": "fake details"},
                    "fbtrace_id": "AfakeTrace",
                }
            }
            return web.json_response(error_body, status=answer.status)
        if answer.raw is not None:
            return web.Response(status=answer.status, body=answer.raw, content_type="text/html")
        return web.json_response(
            {
                "messaging_product": "whatsapp",
                "contacts": [{"input": "x", "wa_id": "x"}],
                "messages": [{"id": wamid}],
            }
        )


@contextlib.asynccontextmanager
async def fake_graph() -> AsyncIterator[FakeGraph]:
    """A `FakeGraph` serving on 127.0.0.1 (a free port), stopped on exit."""
    graph = FakeGraph()
    app = web.Application()
    app.router.add_post("/{version}/{phone_number_id}/messages", graph.handle)
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=1.0)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    graph.url = f"http://127.0.0.1:{port}"
    try:
        yield graph
    finally:
        graph.release()
        await runner.cleanup()


@contextlib.contextmanager
def fake_graph_in_thread() -> Iterator[FakeGraph]:
    """A `fake_graph` served from a daemon thread's own loop; stopped on exit."""
    ready: list[tuple[FakeGraph, asyncio.AbstractEventLoop, asyncio.Event]] = []
    started = threading.Event()

    async def serve() -> None:
        done = asyncio.Event()
        async with fake_graph() as graph:
            ready.append((graph, asyncio.get_running_loop(), done))
            started.set()
            await done.wait()

    thread = threading.Thread(target=asyncio.run, args=(serve(),), daemon=True)
    thread.start()
    if not started.wait(10):
        raise RuntimeError("the fake Graph API did not start")
    graph, loop, done = ready[0]
    try:
        yield graph
    finally:
        loop.call_soon_threadsafe(done.set)
        thread.join(10)
