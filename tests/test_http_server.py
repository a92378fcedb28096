"""The gateway's HTTP/1.1 server over real sockets: framing, limits, keep-alive, order, close."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import orjson
import pytest

from chatq.shared.http_server import Answer, HttpServer, Request

LIMIT = 1024


@dataclass
class Echo:
    """Answers with what it got; a path of /slow waits until `release` is set."""

    seen: list[tuple[str, str, int | None]] = field(default_factory=list)
    release: asyncio.Event = field(default_factory=asyncio.Event)

    async def __call__(self, request: Request) -> Answer:
        body = None if request.body is None else len(request.body)
        self.seen.append((request.method, request.path, body))
        if request.path == "/slow":
            await self.release.wait()
        return Answer.json(200, {"path": request.path, "body": body})


@dataclass
class Rig:
    server: HttpServer
    echo: Echo
    writers: list[asyncio.StreamWriter] = field(default_factory=list)

    async def connect(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        reader, writer = await asyncio.open_connection("127.0.0.1", self.server.port)
        self.writers.append(writer)
        return reader, writer


@pytest.fixture
async def rig() -> AsyncIterator[Rig]:
    echo = Echo()
    server = await HttpServer(echo, max_body_bytes=LIMIT, keepalive=0.2, body_timeout=0.3).listen(
        "127.0.0.1", 0
    )
    made = Rig(server, echo)
    try:
        yield made
    finally:
        echo.release.set()
        await server.close(grace=1.0)
        for writer in made.writers:
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()


def post(path: str, body: bytes, *extra: str) -> bytes:
    head = f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Length: {len(body)}\r\n"
    return (head + "".join(f"{line}\r\n" for line in extra) + "\r\n").encode() + body


async def answer(reader: asyncio.StreamReader) -> tuple[int, dict[str, str], bytes]:
    """One answer: status, headers (lower-case names), body."""
    async with asyncio.timeout(5):
        head = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1").split("\r\n")
        headers = {}
        for line in head[1:]:
            name, _, value = line.partition(":")
            if name:
                headers[name.strip().lower()] = value.strip()
        body = await reader.readexactly(int(headers.get("content-length", "0")))
    return int(head[0].split()[1]), headers, body


async def closed(reader: asyncio.StreamReader) -> bool:
    async with asyncio.timeout(5):
        return await reader.read() == b""


async def test_keep_alive_serves_several_requests_on_one_connection(rig: Rig) -> None:
    reader, writer = await rig.connect()
    for n in range(3):
        writer.write(post(f"/r{n}", b"x" * n))
        status, headers, body = await answer(reader)
        assert (status, orjson.loads(body)) == (200, {"path": f"/r{n}", "body": n})
        assert headers["content-type"] == "application/json" and "date" in headers
        assert "connection" not in headers
    writer.close()


async def test_pipelined_requests_are_answered_in_order(rig: Rig) -> None:
    reader, writer = await rig.connect()
    writer.write(post("/slow", b"1") + post("/fast", b"22"))
    await asyncio.sleep(0.05)
    assert [path for _, path, _ in rig.echo.seen] == ["/slow"]  # one at a time
    rig.echo.release.set()
    first, second = await answer(reader), await answer(reader)
    assert orjson.loads(first[2])["path"] == "/slow" and orjson.loads(second[2])["path"] == "/fast"
    writer.close()


async def test_a_chunked_body_is_read_whole(rig: Rig) -> None:
    reader, writer = await rig.connect()
    writer.write(b"POST /c HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n")
    await asyncio.sleep(0.02)
    writer.write(b"6\r\n world\r\n0\r\n\r\n")
    assert orjson.loads((await answer(reader))[2]) == {"path": "/c", "body": 11}
    writer.close()


async def test_expect_100_continue_is_answered_before_the_body(rig: Rig) -> None:
    reader, writer = await rig.connect()
    writer.write(post("/e", b"", "Expect: 100-continue").replace(b"Length: 0", b"Length: 4"))
    async with asyncio.timeout(5):
        assert await reader.readuntil(b"\r\n\r\n") == b"HTTP/1.1 100 Continue\r\n\r\n"
    writer.write(b"body")
    assert orjson.loads((await answer(reader))[2]) == {"path": "/e", "body": 4}
    writer.close()


async def test_a_declared_length_over_the_limit_is_not_read_and_closes(rig: Rig) -> None:
    reader, writer = await rig.connect()
    writer.write(post("/big", b"y" * (LIMIT + 1)))
    status, headers, body = await answer(reader)
    assert (status, orjson.loads(body), headers["connection"]) == (
        200,
        {"path": "/big", "body": None},
        "close",
    )
    assert await closed(reader)


async def test_after_an_early_answer_the_rest_of_the_body_is_read_and_dropped(rig: Rig) -> None:
    # Closed at once with input unread, the connection would be reset: the
    # client's writes fail and it may never read the answer.
    reader, writer = await rig.connect()
    writer.write(b"POST /big HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % (256 * LIMIT))
    status, headers, body = await answer(reader)  # answered before the body is sent
    assert (status, orjson.loads(body), headers["connection"]) == (
        200,
        {"path": "/big", "body": None},
        "close",
    )
    await asyncio.sleep(0.05)  # past any close the server would make at once
    for _ in range(256):
        writer.write(b"y" * LIMIT)
        await writer.drain()  # raises if the server closed
    assert await closed(reader)  # the answer, then the end


async def test_a_chunked_body_over_the_limit_is_refused_and_closes(rig: Rig) -> None:
    reader, writer = await rig.connect()
    chunk = b"z" * 600
    writer.write(b"POST /cb HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n")
    writer.write(b"%x\r\n%s\r\n" % (len(chunk), chunk) * 2 + b"0\r\n\r\n")
    assert orjson.loads((await answer(reader))[2]) == {"path": "/cb", "body": None}
    assert await closed(reader)


async def test_a_malformed_request_is_400_and_closes(rig: Rig) -> None:
    reader, writer = await rig.connect()
    writer.write(b"NOT HTTP AT ALL\r\n\r\n")
    status, headers, body = await answer(reader)
    assert (status, headers["connection"]) == (400, "close")
    assert orjson.loads(body)["error"].startswith("bad request")
    assert await closed(reader)
    assert rig.echo.seen == []


async def test_a_broken_chunk_is_400_and_closes(rig: Rig) -> None:
    reader, writer = await rig.connect()
    writer.write(b"POST /c HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n")
    await asyncio.sleep(0.02)
    writer.write(b"zz-not-hex\r\nhello\r\n")
    assert (await answer(reader))[0] == 400
    assert await closed(reader)
    assert rig.echo.seen == []


async def test_connection_close_and_http_1_0_are_honoured(rig: Rig) -> None:
    for request in (
        post("/a", b"", "Connection: close"),
        b"POST /b HTTP/1.0\r\nContent-Length: 0\r\n\r\n",
    ):
        reader, writer = await rig.connect()
        writer.write(request)
        assert (await answer(reader))[1]["connection"] == "close"
        assert await closed(reader)
        writer.close()


async def test_head_gets_the_head_only(rig: Rig) -> None:
    reader, writer = await rig.connect()
    writer.write(b"HEAD /h HTTP/1.1\r\nHost: x\r\n\r\n" + post("/next", b""))
    async with asyncio.timeout(5):
        head = await reader.readuntil(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 OK\r\n") and b"Content-Length: 22\r\n" in head
    assert orjson.loads((await answer(reader))[2])["path"] == "/next"  # no body in between
    writer.close()


async def test_an_idle_keep_alive_connection_is_closed(rig: Rig) -> None:
    reader, writer = await rig.connect()
    writer.write(post("/once", b""))
    await answer(reader)
    assert await closed(reader)  # keepalive = 0.2 s in the rig


async def test_close_finishes_the_answer_in_progress_then_stops(rig: Rig) -> None:
    busy_reader, busy_writer = await rig.connect()
    idle_reader, _ = await rig.connect()
    busy_writer.write(post("/slow", b""))
    await asyncio.sleep(0.05)
    closing = asyncio.create_task(rig.server.close(grace=5.0))
    assert await closed(idle_reader)
    with pytest.raises(OSError):
        await rig.connect()  # no longer listening
    assert not closing.done()
    rig.echo.release.set()
    status, headers, _ = await answer(busy_reader)
    assert (status, headers["connection"]) == (200, "close")
    async with asyncio.timeout(5):
        await closing


async def test_close_gives_up_on_an_answer_after_the_grace(rig: Rig) -> None:
    reader, writer = await rig.connect()
    writer.write(post("/slow", b""))
    await asyncio.sleep(0.05)
    async with asyncio.timeout(5):
        await rig.server.close(grace=0.1)
    assert await closed(reader)


async def test_a_client_gone_mid_body_is_not_handled(rig: Rig) -> None:
    reader, writer = await rig.connect()
    writer.write(b"POST /gone HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\nonly-part")
    await asyncio.sleep(0.05)
    writer.close()
    await asyncio.sleep(0.05)
    assert rig.echo.seen == []
    reader, writer = await rig.connect()  # and the server goes on
    writer.write(post("/after", b""))
    assert (await answer(reader))[0] == 200
    writer.close()


async def test_a_body_that_trickles_is_408_and_closes(rig: Rig) -> None:
    reader, writer = await rig.connect()
    writer.write(b"POST /slowloris HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\nonly-part")
    status, headers, body = await answer(reader)  # body_timeout = 0.3 s in the rig
    assert (status, headers["connection"]) == (408, "close")
    assert orjson.loads(body) == {"error": "body not received within 0.3s"}
    assert await closed(reader)
    assert rig.echo.seen == []  # never handed to the handler
    reader, writer = await rig.connect()  # and the server goes on
    writer.write(post("/after", b""))
    assert (await answer(reader))[0] == 200


async def test_a_connection_over_the_cap_is_503_and_closed() -> None:
    refused: list[None] = []
    server = await HttpServer(
        Echo(), max_body_bytes=LIMIT, max_connections=2, on_refused=lambda: refused.append(None)
    ).listen("127.0.0.1", 0)
    writers: list[asyncio.StreamWriter] = []
    try:
        for _ in range(2):
            writers.append((await asyncio.open_connection("127.0.0.1", server.port))[1])
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        writers.append(writer)
        status, headers, body = await answer(reader)  # before sending anything
        assert (status, headers["connection"], headers["retry-after"]) == (503, "close", "1")
        assert orjson.loads(body) == {"error": "too many connections (over 2); try again"}
        assert await closed(reader)
        assert len(refused) == 1
        writers[0].close()  # one of the two goes: room again
        for _ in range(500):  # once the server has seen it go
            if len(server.connections) < 2:
                break
            await asyncio.sleep(0.01)
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        writers.append(writer)
        writer.write(post("/after", b""))
        assert (await answer(reader))[0] == 200
    finally:
        await server.close(grace=1.0)
        for writer in writers:
            writer.close()
