"""The gateway's small HTTP/1.1 client: answers it reads, answers it refuses, dropped links."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from sandbox import short_run_dir

from chatq.supervisor.gateway.unix_http import BadAnswer, Dropped, UnixHTTP, Unreachable

OK = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 2\r\n\r\n{}"


async def read_request(reader: asyncio.StreamReader) -> bytes:
    head = await reader.readuntil(b"\r\n\r\n")
    length = int(head.split(b"Content-Length: ")[1].split(b"\r\n")[0])
    return await reader.readexactly(length)


@pytest.fixture
async def socket_path() -> AsyncIterator[Path]:
    folder = short_run_dir()
    yield folder / "w.sock"
    for item in folder.iterdir():
        item.unlink()
    folder.rmdir()


async def serve(path: Path, answers: list[bytes | None]) -> asyncio.Server:
    """Answers each request with the next of `answers`; None closes the connection instead."""

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while answers:
                await read_request(reader)
                answer = answers.pop(0)
                if answer is None:
                    break
                writer.write(answer)
                await writer.drain()
        except asyncio.IncompleteReadError:
            pass
        writer.close()
        await writer.wait_closed()

    return await asyncio.start_unix_server(handle, str(path))


async def test_posts_reuse_one_connection(socket_path: Path) -> None:
    server = await serve(socket_path, [OK, OK])
    client = UnixHTTP(socket_path, timeout=5.0)
    assert await client.post("/x", b"{}") == (200, b"{}")
    assert await client.post("/x", b"{}") == (200, b"{}")
    await client.aclose()
    server.close()


@pytest.mark.parametrize(
    ("answer", "error"),
    [
        (None, Dropped),  # the connection closes before the answer
        (b"HTTP/1.0 200 OK\r\nContent-Length: 2\r\n\r\n{}", BadAnswer),
        (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\n{}\r\n0\r\n\r\n", BadAnswer),
        (b"garbage\r\n\r\n", BadAnswer),
    ],
)
async def test_answers_it_cannot_use_are_errors(
    socket_path: Path, answer: bytes | None, error: type[Exception]
) -> None:
    server = await serve(socket_path, [answer])
    client = UnixHTTP(socket_path, timeout=5.0)
    with pytest.raises(error):
        await client.post("/x", b"{}")
    await client.aclose()
    server.close()


async def test_no_server_is_unreachable(socket_path: Path) -> None:
    with pytest.raises(Unreachable):
        await UnixHTTP(socket_path, timeout=5.0).post("/x", b"{}")


async def test_a_silent_server_times_out(socket_path: Path) -> None:
    held: list[asyncio.StreamWriter] = []

    async def hold(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        held.append(writer)  # never answers

    server = await asyncio.start_unix_server(hold, str(socket_path))
    with pytest.raises(TimeoutError):
        await UnixHTTP(socket_path, timeout=0.05).post("/x", b"{}")
    for writer in held:
        writer.close()
        await writer.wait_closed()
    server.close()
    await server.wait_closed()


async def test_a_kept_connection_the_server_closed_is_not_reused(socket_path: Path) -> None:
    """A worker that restarted closed its end: the next post opens a new connection."""
    connections = 0

    async def once(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal connections
        connections += 1
        await read_request(reader)
        writer.write(OK)  # keep-alive as far as the head says, then closed
        await writer.drain()
        writer.close()
        await writer.wait_closed()

    server = await asyncio.start_unix_server(once, str(socket_path))
    client = UnixHTTP(socket_path, timeout=5.0)
    assert await client.post("/x", b"{}") == (200, b"{}")
    await asyncio.sleep(0.05)  # the close reaches the client
    assert await client.post("/x", b"{}") == (200, b"{}")
    assert connections == 2
    await client.aclose()
    server.close()
    await server.wait_closed()
