"""Ingest's connection limits, over a real unix socket: idle, header and body
timeouts close what trickles or idles; past the cap a connection gets 503 at once."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Sequence
from pathlib import Path

import pytest
from sandbox import short_run_dir

from chatq.tenant_worker.ingest import Ingest, IngestState
from chatq.tenant_worker.messages import Message
from chatq.tenant_worker.pipeline import Accepted

LIMIT = 0.3  # idle and body timeouts, seconds
BODY = json.dumps({"id": "m1", "chat_id": "c1", "text": "hi"}).encode()


async def accept(messages: Sequence[Message]) -> Accepted:
    return Accepted(len(messages), 0, 0)


@pytest.fixture
async def ingest() -> AsyncIterator[tuple[Ingest, Path]]:
    folder = short_run_dir()
    socket = folder / "t1.sock"
    ingest = Ingest("t1", accept, dict)
    ingest.max_connections, ingest.idle_timeout, ingest.body_timeout = 3, LIMIT, 2 * LIMIT
    await ingest.start(socket)
    ingest.state = IngestState.RUNNING
    try:
        yield ingest, socket
    finally:
        await ingest.stop()
        socket.unlink(missing_ok=True)
        folder.rmdir()


def request(body: bytes = BODY, *, length: int | None = None) -> bytes:
    head = (
        "POST /messages HTTP/1.1\r\nHost: w\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body) if length is None else length}\r\n\r\n"
    )
    return head.encode() + body


async def closed_within(reader: asyncio.StreamReader, seconds: float) -> bytes:
    """What the server sent before it closed the connection (fails if it did not)."""
    return await asyncio.wait_for(reader.read(), seconds)


async def test_connections_that_send_nothing_or_half_a_header_are_closed(
    ingest: tuple[Ingest, Path],
) -> None:
    _, socket = ingest
    silent = await asyncio.open_unix_connection(socket)
    half = await asyncio.open_unix_connection(socket)
    half[1].write(b"POST /messages HTTP/1.1\r\nHost: w\r\n")
    began = time.monotonic()
    assert await closed_within(silent[0], 3.0) == b""
    assert await closed_within(half[0], 3.0) == b""
    assert time.monotonic() - began < 2.0
    for _, writer in (silent, half):
        writer.close()


async def test_an_idle_keep_alive_is_closed_after_its_answer(
    ingest: tuple[Ingest, Path],
) -> None:
    _, socket = ingest
    reader, writer = await asyncio.open_unix_connection(socket)
    writer.write(request())
    answer = await closed_within(reader, 3.0)  # 202, then closed once idle
    assert answer.startswith(b"HTTP/1.1 202")
    writer.close()


async def test_half_a_body_gets_408_and_is_counted(ingest: tuple[Ingest, Path]) -> None:
    guard, socket = ingest
    reader, writer = await asyncio.open_unix_connection(socket)
    writer.write(request(BODY[:10], length=len(BODY)))
    answer = await closed_within(reader, 3.0)
    assert answer.startswith(b"HTTP/1.1 408")
    assert guard.counters.timeouts == 1
    writer.close()


async def test_past_the_cap_a_connection_gets_503_at_once_and_is_counted(
    ingest: tuple[Ingest, Path],
) -> None:
    guard, socket = ingest
    held = [await asyncio.open_unix_connection(socket) for _ in range(3)]
    reader, writer = await asyncio.open_unix_connection(socket)
    answer = await closed_within(reader, 0.2)  # well before any timeout
    assert answer.startswith(b"HTTP/1.1 503")
    assert b"too many connections" in answer
    assert guard.counters.refused == 1
    writer.close()

    for held_reader, _ in held:  # the idle ones time out: room again
        assert await closed_within(held_reader, 3.0) == b""
    reader, writer = await asyncio.open_unix_connection(socket)
    writer.write(request())
    assert (await reader.readline()).startswith(b"HTTP/1.1 202")
    writer.close()
    for _, held_writer in held:
        held_writer.close()
