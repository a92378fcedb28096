"""Ingest: the gateway's POST /whatsapp/updates (messages and delivery statuses)."""

from __future__ import annotations

import io
import json
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import pytest
from ingest_client import served

from chatq.shared.errors import StoreError
from chatq.tenant_worker.ingest import Ingest, IngestState
from chatq.tenant_worker.messages import Message, StatusCounts, StatusUpdate
from chatq.tenant_worker.pipeline import Accepted

NOW = 1_800_000_000.0


@dataclass
class Fakes:
    """Pipeline.accept and Store.apply_statuses_soon stand-ins that record calls."""

    messages: list[list[Message]] = field(default_factory=list)
    statuses: list[list[StatusUpdate]] = field(default_factory=list)
    error: Exception | None = None

    async def accept(self, messages: Sequence[Message]) -> Accepted:
        if self.error is not None:
            raise self.error
        self.messages.append(list(messages))
        return Accepted(len(messages), 0, 0)

    async def apply(self, updates: Sequence[StatusUpdate]) -> StatusCounts:
        self.statuses.append(list(updates))
        return StatusCounts(applied=len(updates) - 1, unknown=1)


@dataclass
class Rig:
    client: aiohttp.ClientSession
    ingest: Ingest
    fakes: Fakes

    async def post(self, body: object) -> tuple[int, dict[str, Any]]:
        raw = body if isinstance(body, bytes) else json.dumps(body).encode()
        async with self.client.post("/whatsapp/updates", data=raw) as response:
            return response.status, await response.json()


@pytest.fixture
async def rig() -> AsyncIterator[Rig]:
    fakes = Fakes()
    ingest = Ingest("t1", fakes.accept, dict, apply_statuses=fakes.apply, clock=lambda: NOW)
    ingest.state = IngestState.RUNNING
    async with served(ingest) as client:
        yield Rig(client, ingest, fakes)


WA_MESSAGE = {
    "id": "wamid.1",
    "chat_id": "15551234",
    "text": "look",
    "from": "Kerry",
    "ts": 1700000000,
    "type": "image",
    "payload": {"type": "image", "image": {"caption": "look"}},
}


async def test_messages_and_statuses_are_committed_and_counted(rig: Rig) -> None:
    status = {"id": "wamid.o1", "status": "failed", "ts": 1, "error": "131047: Re-engagement"}
    body = {"messages": [WA_MESSAGE], "statuses": [status, {"id": "wamid.o2", "status": "read"}]}
    assert await rig.post(body) == (
        200,
        {
            "accepted": 1,
            "duplicates": 0,
            "rejected": 0,
            "statuses_applied": 1,
            "statuses_stale": 0,
            "statuses_unknown": 1,
        },
    )
    (message,) = rig.fakes.messages[0]
    assert (message.type, message.payload, message.sender) == (
        "image",
        WA_MESSAGE["payload"],
        "Kerry",
    )
    assert rig.fakes.statuses == [
        [
            StatusUpdate("wamid.o1", "failed", "131047: Re-engagement"),
            StatusUpdate("wamid.o2", "read"),
        ]
    ]


async def test_statuses_alone_touch_no_messages(rig: Rig) -> None:
    status, _ = await rig.post({"statuses": [{"id": "o", "status": "delivered"}]})
    assert status == 200
    assert rig.fakes.messages == []


@pytest.mark.parametrize(
    ("body", "named"),
    [
        (b"{", "body: not valid JSON"),
        ([], "body: must be an object"),
        ({"messages": {}}, "must be lists"),
        ({"extra": 1}, "body.extra: unknown field"),
        (b'{"\\ud800x": 1}', "x: unknown field"),  # quoted back: orjson refuses a lone surrogate
        ({"messages": [{**WA_MESSAGE, "payload": []}]}, "messages[0].payload: must be an object"),
        ({"messages": [{**WA_MESSAGE, "type": ""}]}, "messages[0].type"),
        ({"statuses": [{"id": "o", "status": "seen"}]}, "statuses[0].status: must be one of"),
        ({"statuses": [{"status": "read"}]}, "statuses[0].id: missing"),
    ],
)
async def test_a_bad_body_is_400_and_writes_nothing(rig: Rig, body: object, named: str) -> None:
    status, answer = await rig.post(body)
    assert status == 400
    assert named in answer["error"]
    assert rig.fakes.messages == rig.fakes.statuses == []


@pytest.mark.parametrize("state", [IngestState.STARTING, IngestState.DRAINING])
async def test_not_running_is_503_and_writes_nothing(rig: Rig, state: IngestState) -> None:
    rig.ingest.state = state
    status, answer = await rig.post({"messages": [WA_MESSAGE]})
    assert (status, answer["error"]) == (503, f"tenant t1 is {state.value}")
    assert rig.fakes.messages == []


async def test_a_failing_store_is_503(rig: Rig) -> None:
    rig.fakes.error = StoreError("disk full")
    status, answer = await rig.post({"messages": [WA_MESSAGE]})
    assert (status, answer["error"]) == (503, "store unavailable: disk full")


async def test_the_plain_message_route_keeps_its_own_limit(rig: Rig) -> None:
    async with rig.client.post("/messages", data=io.BytesIO(b"x" * ((1 << 20) + 1))) as response:
        assert response.status == 413
