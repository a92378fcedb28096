"""Ingest: what POST /messages accepts, what it refuses (writing nothing), and GET /health."""

from __future__ import annotations

import io
import json
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from ingest_client import served

from chatq.shared.errors import StoreError
from chatq.tenant_worker.ingest import MAX_BODY_BYTES, MAX_ID_CHARS, Ingest, IngestState
from chatq.tenant_worker.messages import MAX_TEXT_CHARS, Message
from chatq.tenant_worker.pipeline import Accepted

NOW = 1_800_000_000.0


@dataclass
class FakeAccept:
    """Stands in for Pipeline.accept: records each call, answers a fixed result."""

    calls: list[list[Message]] = field(default_factory=list)
    duplicates: int = 0
    error: Exception | None = None

    async def __call__(self, messages: Sequence[Message]) -> Accepted:
        self.calls.append(list(messages))
        if self.error is not None:
            raise self.error
        return Accepted(len(messages) - self.duplicates, self.duplicates, 0)


@dataclass
class Rig:
    client: aiohttp.ClientSession
    ingest: Ingest
    accept: FakeAccept

    async def post(self, body: bytes | str) -> tuple[int, dict[str, Any]]:
        data = body.encode() if isinstance(body, str) else body
        # BytesIO: aiohttp warns about large raw bytes bodies (and still sends a Content-Length).
        async with self.client.post("/messages", data=io.BytesIO(data)) as response:
            return response.status, await response.json()


@pytest.fixture
async def rig() -> AsyncIterator[Rig]:
    accept = FakeAccept()
    ingest = Ingest("t1", accept, lambda: {"queued": 3}, clock=lambda: NOW)
    ingest.state = IngestState.RUNNING
    async with served(ingest) as client:
        yield Rig(client, ingest, accept)


def good(**changes: Any) -> dict[str, Any]:
    return {"id": "m1", "chat_id": "c1", "text": "hello", **changes}


def without(key: str) -> dict[str, Any]:
    item = good()
    del item[key]
    return item


MALFORMED: list[tuple[str, object, str]] = [
    # name, body (bytes, or JSON-encoded), what the error must name
    ("bad json", b"{not json", "body: not valid JSON"),
    ("bad utf-8", b'{"id": "\xff"}', "body: not valid JSON"),
    ("nested too deeply", b"[" * 100_000, "body: not valid JSON"),
    ("huge integer", b"1" * 5000, "body: not valid JSON"),
    ("number body", 42, "body: must be an object or a list, got int"),
    ("string body", "hi", "body: must be an object or a list, got str"),
    ("null body", None, "body: must be an object or a list, got NoneType"),
    ("empty list", [], "body: empty list"),
    ("item not an object", [good(), 7], "messages[1]: must be an object, got int"),
    ("missing id", without("id"), "message.id: missing"),
    ("empty id", good(id=""), "message.id: must not be empty"),
    ("null id", good(id=None), "message.id: missing"),
    ("id too long", good(id="x" * (MAX_ID_CHARS + 1)), "message.id: longer than"),
    ("missing chat_id", without("chat_id"), "message.chat_id: missing"),
    ("empty chat_id", good(chat_id=""), "message.chat_id: must not be empty"),
    ("NUL in id", good(id="m\u00001"), "message.id: must not contain NUL characters"),
    ("NUL in chat_id", good(chat_id="c\x00"), "message.chat_id: must not contain NUL"),
    ("missing text", without("text"), "message.text: missing"),
    # A lone surrogate: valid JSON (json.dumps writes "\\ud800"), no UTF-8 for SQLite.
    ("surrogate in text", good(text="half an emoji \ud83d"), "message.text: not valid Unicode"),
    ("surrogate in id", good(id="m\udc00"), "message.id: not valid Unicode"),
    ("surrogate in from", good(**{"from": "\ud800"}), "message.from: not valid Unicode"),
    ("id int", good(id=5), "message.id: must be a string, got int"),
    ("chat_id int", good(chat_id=5), "message.chat_id: must be a string, got int"),
    ("text list", good(text=["a"]), "message.text: must be a string, got list"),
    ("ts string", good(ts="yesterday"), "message.ts: must be a number"),
    ("ts bool", good(ts=True), "message.ts: must be a number"),
    ("ts huge int", good(ts=10**400), "message.ts: must be a finite number"),
    ("from int", good(**{"from": 5}), "message.from: must be a string, got int"),
    ("text too long", good(text="x" * (MAX_TEXT_CHARS + 1)), "message.text: longer than 4096"),
    ("bad item in a list", [good(), good(id="m2", chat_id="")], "messages[1].chat_id"),
]


@pytest.mark.parametrize(
    ("body", "names"), [case[1:] for case in MALFORMED], ids=[case[0] for case in MALFORMED]
)
async def test_malformed_body_is_400_naming_the_field_and_accepts_nothing(
    rig: Rig, body: object, names: str
) -> None:
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()

    status, answer = await rig.post(raw)

    assert status == 400
    assert names in answer["error"]
    assert "\n" not in answer["error"]
    assert rig.accept.calls == []


async def test_one_object_is_accepted_with_counts(rig: Rig) -> None:
    status, answer = await rig.post(
        json.dumps(good(text="x" * MAX_TEXT_CHARS, ts=1.5, **{"from": "alice"}))
    )

    assert status == 202
    assert answer == {"accepted": 1, "duplicates": 0, "rejected": 0}
    (call,) = rig.accept.calls
    assert call == [
        Message(
            id="m1",
            chat_id="c1",
            text="x" * MAX_TEXT_CHARS,
            tenant_id="t1",
            sender="alice",
            ts=1.5,
            received_at=NOW,
        )
    ]


async def test_a_list_is_accepted_in_one_call_in_order(rig: Rig) -> None:
    rig.accept.duplicates = 1
    body = [good(id=f"m{n}", chat_id=f"c{n % 2}", text="") for n in range(3)]

    status, answer = await rig.post(json.dumps(body))

    assert status == 202
    assert answer == {"accepted": 2, "duplicates": 1, "rejected": 0}
    assert [m.id for m in rig.accept.calls[0]] == ["m0", "m1", "m2"]
    assert all(m.sender is None and m.ts is None for m in rig.accept.calls[0])


async def test_body_over_one_mib_is_413(rig: Rig) -> None:
    padded = json.dumps(good()).encode() + b" " * MAX_BODY_BYTES

    status, answer = await rig.post(padded)

    assert status == 413
    assert "body over" in answer["error"]
    assert rig.accept.calls == []


async def test_chunked_body_over_one_mib_is_413(rig: Rig) -> None:
    async def chunks() -> AsyncIterator[bytes]:  # no Content-Length: the limit is met while reading
        yield json.dumps(good()).encode()
        for _ in range(17):
            yield b" " * 65536

    async with rig.client.post("/messages", data=chunks()) as response:
        assert response.status == 413
    assert rig.accept.calls == []


async def test_body_of_exactly_one_mib_is_accepted(rig: Rig) -> None:
    raw = json.dumps(good()).encode()
    raw += b" " * (MAX_BODY_BYTES - len(raw))

    status, _answer = await rig.post(raw)

    assert status == 202


@pytest.mark.parametrize("state", [IngestState.STARTING, IngestState.DRAINING])
async def test_503_while_not_running(rig: Rig, state: IngestState) -> None:
    rig.ingest.state = state

    status, answer = await rig.post(json.dumps(good()))

    assert status == 503
    assert state.value in answer["error"]
    assert rig.accept.calls == []


async def test_store_failure_is_503(rig: Rig) -> None:
    rig.accept.error = StoreError("store t1.sqlite3: disk I/O error")

    status, answer = await rig.post(json.dumps(good()))

    assert status == 503
    assert "disk I/O error" in answer["error"]


@pytest.mark.parametrize(
    ("state", "code"),
    [(IngestState.RUNNING, 200), (IngestState.STARTING, 503), (IngestState.DRAINING, 503)],
)
async def test_health(rig: Rig, state: IngestState, code: int) -> None:
    rig.ingest.state = state

    async with rig.client.get("/health") as response:
        assert response.status == code
        assert await response.json() == {"tenant": "t1", "status": state.value, "queued": 3}


async def test_other_paths_are_404_and_other_methods_405(rig: Rig) -> None:
    async with rig.client.post("/nowhere", data=b"{}") as response:
        assert response.status == 404
        assert await response.json() == {"error": "no such path: /nowhere"}
    async with rig.client.get("/messages") as response:
        assert response.status == 405
        assert await response.json() == {"error": "GET not allowed here; use POST"}
    assert rig.accept.calls == []


async def test_unix_socket_is_0600_and_stale_socket_is_replaced(tmp_path: Path) -> None:
    path = tmp_path / "run" / "t1.sock"
    path.parent.mkdir()
    path.write_text("stale")  # left behind by a killed run
    ingest = Ingest("t1", FakeAccept(), dict)
    await ingest.start(path)
    try:
        assert path.stat().st_mode & 0o777 == 0o600
        connector = aiohttp.UnixConnector(path=str(path))
        async with (
            aiohttp.ClientSession(connector=connector) as session,
            session.get("http://worker/health") as response,
        ):
            assert response.status == 503  # still starting
    finally:
        await ingest.stop()
