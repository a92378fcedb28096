"""The gateway's forwarder against a fake worker on a unix socket: batching and errors."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from conftest import wait_until
from sandbox import short_run_dir

from chatq.shared.errors import ForwardError
from chatq.shared.whatsapp.webhook import Routed, Status
from chatq.supervisor.gateway.forwarder import TenantLink
from chatq.supervisor.gateway.stats import GatewayStats


@dataclass
class FakeWorker:
    """POST /whatsapp/updates: records bodies; answers by script (default 200)."""

    bodies: list[dict[str, Any]] = field(default_factory=list)
    script: list[int] = field(default_factory=list)
    gate: asyncio.Event = field(default_factory=asyncio.Event)
    refuse_id: str | None = None
    received: int = 0

    async def updates(self, request: web.Request) -> web.Response:
        body = await request.json()
        self.received += 1
        await self.gate.wait()
        if self.refuse_id and any(m["id"] == self.refuse_id for m in body["messages"]):
            return web.json_response({"error": "messages[0].id: bad"}, status=400)
        code = self.script.pop(0) if self.script else 200
        if code != 200:
            return web.json_response({"error": "tenant acme is starting"}, status=code)
        self.bodies.append(body)
        return web.json_response({"accepted": len(body["messages"]), "duplicates": 0})


@pytest.fixture
async def served() -> AsyncIterator[tuple[FakeWorker, Path]]:
    worker = FakeWorker()
    worker.gate.set()
    app = web.Application()
    app.router.add_post("/whatsapp/updates", worker.updates)
    runner = web.AppRunner(app)
    await runner.setup()
    folder = short_run_dir()
    socket = folder / "acme.sock"
    await web.UnixSite(runner, str(socket)).start()
    yield worker, socket
    await runner.cleanup()
    socket.unlink(missing_ok=True)
    folder.rmdir()


def part(*ids: str, statuses: tuple[str, ...] = ()) -> Routed:
    messages = [{"id": i, "chat_id": "c", "text": "t"} for i in ids]
    return Routed(messages, [Status(s, "read", 1) for s in statuses])


async def test_concurrent_parts_wait_for_the_post_in_flight_and_go_together(
    served: tuple[FakeWorker, Path],
) -> None:
    worker, socket = served
    stats = GatewayStats()
    link = TenantLink("acme", socket, 5.0, stats)
    worker.gate.clear()
    first = asyncio.ensure_future(link.forward(part("m1")))
    await asyncio.sleep(0.05)  # m1's post is in flight, held by the gate
    rest = [
        asyncio.ensure_future(link.forward(part(f"m{n}", statuses=(f"o{n}",)))) for n in (2, 3, 4)
    ]
    await asyncio.sleep(0.05)
    worker.gate.set()
    await asyncio.gather(first, *rest)
    await link.aclose()
    assert [[m["id"] for m in body["messages"]] for body in worker.bodies] == [
        ["m1"],
        ["m2", "m3", "m4"],
    ]
    assert worker.bodies[1]["statuses"][0] == {"id": "o2", "status": "read", "ts": 1, "error": None}
    assert stats.forwarded == 4
    assert 'chatq_gateway_posts_total{tenant="acme"} 2.0' in stats.exposition().decode()


async def answer_one_while_two_wait(
    worker: FakeWorker, link: TenantLink, hold: float = 0.0
) -> tuple[asyncio.Future[None], list[asyncio.Future[None]]]:
    """m1's post held by the worker (`hold` s at least) while m2 and m3 queue behind it;
    then m1 is answered."""
    worker.gate.clear()
    first = asyncio.ensure_future(link.forward(part("m1")))
    await wait_until(lambda: worker.received == 1, what="m1's post, held by the gate")
    waiting = [asyncio.ensure_future(link.forward(part(f"m{n}"))) for n in (2, 3)]
    await asyncio.sleep(hold)
    worker.gate.set()
    return first, waiting


async def test_after_an_answer_the_next_post_waits_for_the_senders_just_answered(
    served: tuple[FakeWorker, Path],
) -> None:
    worker, socket = served
    link = TenantLink("acme", socket, 5.0, GatewayStats(), linger=60.0)
    first, waiting = await answer_one_while_two_wait(worker, link, hold=0.3)
    await first  # its sender is answered; the next post waits for 1 + 2 parts
    await asyncio.sleep(0.05)
    assert worker.received == 1
    await asyncio.wait_for(asyncio.gather(link.forward(part("m4")), *waiting), timeout=2)
    await link.aclose()
    assert [[m["id"] for m in body["messages"]] for body in worker.bodies] == [
        ["m1"],
        ["m2", "m3", "m4"],
    ]


async def test_the_wait_for_more_parts_is_bounded(served: tuple[FakeWorker, Path]) -> None:
    worker, socket = served
    link = TenantLink("acme", socket, 5.0, GatewayStats(), linger=0.01)
    first, waiting = await answer_one_while_two_wait(worker, link)
    await asyncio.wait_for(asyncio.gather(first, *waiting), timeout=2)  # no third part came
    await link.aclose()
    assert [[m["id"] for m in body["messages"]] for body in worker.bodies] == [["m1"], ["m2", "m3"]]


async def test_the_wait_is_no_longer_than_the_last_post_took(
    served: tuple[FakeWorker, Path],
) -> None:
    """A quick post: waiting longer for its senders would cost more than the post saves."""
    worker, socket = served
    link = TenantLink("acme", socket, 5.0, GatewayStats(), linger=60.0)
    first, waiting = await answer_one_while_two_wait(worker, link)
    await asyncio.wait_for(asyncio.gather(first, *waiting), timeout=2)  # not 60 s
    await link.aclose()
    assert [[m["id"] for m in body["messages"]] for body in worker.bodies] == [["m1"], ["m2", "m3"]]


async def test_a_lone_part_never_waits(served: tuple[FakeWorker, Path]) -> None:
    worker, socket = served
    link = TenantLink("acme", socket, 5.0, GatewayStats(), linger=60.0)
    await asyncio.wait_for(link.forward(part("m1")), timeout=2)
    await asyncio.wait_for(link.forward(part("m2")), timeout=2)  # as many as the last post
    await link.aclose()
    assert len(worker.bodies) == 2


async def test_a_refusal_fails_every_part_of_that_post(served: tuple[FakeWorker, Path]) -> None:
    worker, socket = served
    worker.script = [503]
    link = TenantLink("acme", socket, 5.0, GatewayStats())
    with pytest.raises(ForwardError, match="tenant acme: 503 tenant acme is starting"):
        await link.forward(part("m1"))
    await link.forward(part("m1"))  # Meta's retry: now committed
    await link.aclose()
    assert worker.bodies == [
        {"messages": [{"id": "m1", "chat_id": "c", "text": "t"}], "statuses": []}
    ]


async def test_one_bad_part_does_not_sink_the_others_in_its_batch(
    served: tuple[FakeWorker, Path],
) -> None:
    worker, socket = served
    worker.refuse_id = "bad"
    link = TenantLink("acme", socket, 5.0, GatewayStats())
    worker.gate.clear()
    first = asyncio.ensure_future(link.forward(part("m0")))
    await wait_until(lambda: worker.received == 1, what="m0's post, held by the gate")
    good = asyncio.ensure_future(link.forward(part("m1")))
    bad = asyncio.ensure_future(link.forward(part("bad")))
    await asyncio.sleep(0)  # they queue behind it, as one batch
    worker.gate.set()
    await asyncio.gather(first, good)
    with pytest.raises(ForwardError, match="400"):
        await bad
    await link.aclose()
    assert ["m1"] in [[m["id"] for m in body["messages"]] for body in worker.bodies]


async def test_no_worker_is_a_forward_error_naming_the_tenant(tmp_path: Path) -> None:
    link = TenantLink("acme", tmp_path / "nobody.sock", 5.0, GatewayStats())
    with pytest.raises(ForwardError, match="tenant acme: not running"):
        await link.forward(part("m1"))
    await link.aclose()


async def test_a_lone_surrogate_in_a_payload_still_travels(
    served: tuple[FakeWorker, Path],
) -> None:
    worker, socket = served
    link = TenantLink("acme", socket, 5.0, GatewayStats())
    odd = Routed([{"id": "m1", "chat_id": "c", "text": "t", "payload": {"x": "\ud800"}}], [])
    await link.forward(odd)
    await link.aclose()
    assert json.dumps(worker.bodies[0]["messages"][0]["payload"]) == '{"x": "\\ud800"}'


async def test_an_integer_past_64_bits_in_a_payload_still_travels(
    served: tuple[FakeWorker, Path],
) -> None:
    worker, socket = served
    link = TenantLink("acme", socket, 5.0, GatewayStats())
    odd = Routed([{"id": "m1", "chat_id": "c", "text": "t", "payload": {"n": 1 << 70}}], [])
    await link.forward(odd)
    await link.aclose()
    assert worker.bodies[0]["messages"][0]["payload"] == {"n": 1 << 70}
