"""Pipeline on a real Store: order, one in flight per chat, overload, retries, replay, drain.

Retry backoff goes through an injected sleep that records the delays and
returns at once; the only real waits are a few milliseconds of handler
latency and one tiny handler_timeout.
"""

from __future__ import annotations

import asyncio
import random
import sqlite3
from collections import defaultdict
from collections.abc import AsyncIterator, Awaitable, Callable, Collection, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import pytest
from conftest import wait_until

from chatq.config.settings import TenantConfig
from chatq.shared.errors import HandlerError, PermanentHandlerError, StoreError
from chatq.tenant_worker.handlers import HandlerContext
from chatq.tenant_worker.history import read_history
from chatq.tenant_worker.messages import Message, Reply
from chatq.tenant_worker.outbox import Outbox
from chatq.tenant_worker.pipeline import Accepted, Pipeline, handler_backoff
from chatq.tenant_worker.stats import WorkerStats
from chatq.tenant_worker.store import Progress, Store
from chatq.tenant_worker.transports import MemoryTransport

Behaviour = Callable[[Message, HandlerContext], Awaitable[list[str]]]


def msg(mid: str, chat_id: str = "c", text: str = "hi") -> Message:
    return Message(id=mid, chat_id=chat_id, text=text, tenant_id="t1")


async def echo(message: Message, ctx: HandlerContext) -> list[str]:
    return [f"re:{message.text}"]


class FakeHandler:
    """Runs `behaviour`; records every call and how many run at once, per chat and overall."""

    def __init__(self, behaviour: Behaviour = echo) -> None:
        self.behaviour = behaviour
        self.calls: list[tuple[str, int]] = []  # (message id, attempt)
        self.events: list[tuple[str, str]] = []  # ("start" | "end", message id)
        self.running: dict[str, int] = defaultdict(int)
        self.max_per_chat = 0
        self.max_total = 0

    async def handle(self, message: Message, ctx: HandlerContext) -> list[str]:
        self.calls.append((message.id, ctx.attempt))
        self.events.append(("start", message.id))
        self.running[message.chat_id] += 1
        self.max_per_chat = max(self.max_per_chat, self.running[message.chat_id])
        self.max_total = max(self.max_total, sum(self.running.values()))
        try:
            return await self.behaviour(message, ctx)
        finally:
            self.running[message.chat_id] -= 1
            self.events.append(("end", message.id))

    async def aclose(self) -> None:
        pass

    def ids(self) -> list[str]:
        return [mid for mid, _attempt in self.calls]


@dataclass
class RecordingSleep:
    """Stands in for asyncio.sleep in the retry path: records, then yields once."""

    delays: list[float] = field(default_factory=list)

    async def __call__(self, delay: float) -> None:
        self.delays.append(delay)
        await asyncio.sleep(0)


@dataclass
class Rig:
    store: Store
    pipeline: Pipeline
    outbox: Outbox
    handler: FakeHandler
    transport: MemoryTransport
    stats: WorkerStats
    sleep: RecordingSleep
    fatal: list[BaseException]

    async def settle(self) -> None:
        """Wait until every queued message is handled and every reply delivered."""
        async with asyncio.timeout(10):
            await self.pipeline.queue.wait_idle()
            assert await self.outbox.wait_empty(grace=10)

    def history(self, chat_id: str | None = None) -> list[dict[str, Any]]:
        return read_history(self.store.path, chat_id=chat_id, limit=10_000)

    def status(self) -> dict[str, str]:
        return {entry["id"]: entry["status"] for entry in self.history()}

    def sent(self, chat_id: str) -> list[str]:
        return [text for chat, text in self.transport.sent if chat == chat_id]

    async def replay(self) -> None:
        """What the worker does at start: requeue unfinished rows and pending replies."""
        rows = await self.store.unfinished_messages()
        await self.pipeline.replay(
            [row.message for row in rows],
            await self.store.pending_replies(),
            suspects=[row.message.id for row in rows if row.status == "processing"],
        )

    async def crash(self) -> None:
        """The process dies: nothing more is written, in-flight rows stay `processing`."""
        await self.store.close()
        await self.close()

    async def close(self) -> None:
        self.pipeline.queue.clear_all()
        self.pipeline.queue.cancel_all()
        await self.pipeline.queue.wait_idle()
        await self.outbox.aclose()
        await self.store.close()


RigFactory = Callable[..., Awaitable[Rig]]


async def wait_for(check: Callable[[], object]) -> None:
    await wait_until(check, within=5, interval=0.002)


@pytest.fixture
async def make_rig(tmp_path: Path) -> AsyncIterator[RigFactory]:
    """Build a pipeline on `tmp_path/t1.sqlite3`; calling it again is a restart on the same file."""
    rigs: list[Rig] = []

    async def make(
        handler: FakeHandler | None = None, store: Any = None, **tenant_keys: Any
    ) -> Rig:
        real = await Store.open(tmp_path / "t1.sqlite3", "t1")
        keys = {"rate_limit_per_minute": 10_000, "retry_backoff": 0.5, **tenant_keys}
        tenant = TenantConfig(id="t1", **keys)
        stats, transport, sleep = WorkerStats(), MemoryTransport(), RecordingSleep()
        handler = handler or FakeHandler()
        fatal: list[BaseException] = []
        outbox = Outbox(real, transport, stats, per_chat_per_minute=tenant.rate_limit_per_minute)
        pipeline = Pipeline(
            tenant,
            store(real) if store is not None else real,
            handler,
            outbox,
            stats,
            sleep=sleep,
            on_fatal=fatal.append,
        )
        rig = Rig(real, pipeline, outbox, handler, transport, stats, sleep, fatal)
        rigs.append(rig)
        return rig

    yield make
    for rig in reversed(rigs):
        await rig.close()


class Gate:
    """A handler behaviour that holds each message until the test opens the gate."""

    def __init__(self) -> None:
        self.open = asyncio.Event()
        self.waiting: list[str] = []

    async def __call__(self, message: Message, ctx: HandlerContext) -> list[str]:
        self.waiting.append(message.id)
        await self.open.wait()
        return [f"re:{message.text}"]


# -- order and concurrency ----------------------------------------------------


async def test_per_chat_order_under_random_latency_with_one_in_flight_per_chat(
    make_rig: RigFactory,
) -> None:
    rng = random.Random(7)

    async def jittery(message: Message, ctx: HandlerContext) -> list[str]:
        await asyncio.sleep(rng.uniform(0, 0.003))
        return [f"re:{message.id}"]

    rig = await make_rig(FakeHandler(jittery))
    chats = [f"c{n}" for n in range(8)]
    expected = {chat: [f"{chat}-{i}" for i in range(12)] for chat in chats}
    for i in range(12):  # twelve requests, each with one message for every chat
        batch = [msg(f"{chat}-{i}", chat) for chat in chats]
        assert await rig.pipeline.accept(batch) == Accepted(8, 0, 0)
        await asyncio.sleep(rng.uniform(0, 0.002))

    await rig.settle()

    for chat in chats:
        assert [mid for mid in rig.handler.ids() if mid.startswith(f"{chat}-")] == expected[chat]
        assert rig.sent(chat) == [f"re:{mid}" for mid in expected[chat]]
    assert rig.handler.max_per_chat == 1
    assert rig.handler.max_total > 1  # chats did run side by side
    assert set(rig.status().values()) == {"processed"}
    assert rig.stats.processed == 96


# -- overload -------------------------------------------------------------------


async def test_queue_full_rejects_and_sends_one_wait_reply_per_overload_episode(
    make_rig: RigFactory,
) -> None:
    gate = Gate()
    rig = await make_rig(FakeHandler(gate), max_queue_size=2, wait_text="wait!")

    first = await rig.pipeline.accept([msg(f"a{n}") for n in range(6)])
    second = await rig.pipeline.accept([msg("a6"), msg("d1", chat_id="d")])

    # One in flight plus max_queue_size pending; the rest are stored as rejected.
    assert first == Accepted(accepted=6, duplicates=0, rejected=3)
    assert second == Accepted(accepted=2, duplicates=0, rejected=1)  # other chats unaffected
    await wait_for(lambda: len(gate.waiting) == 2)
    status = rig.status()
    assert [status[f"a{n}"] for n in range(7)] == ["processing"] + ["queued"] * 2 + ["rejected"] * 4
    assert status["d1"] == "processing"
    gate.open.set()
    await rig.settle()
    assert rig.sent("c") == ["wait!", "re:hi", "re:hi", "re:hi"]
    (wait_owner,) = [e for e in rig.history("c") if e["replies"] and e["status"] == "rejected"]
    assert wait_owner["id"] == "a3"

    # The chat caught up: a new overload is a new episode with its own wait reply.
    gate.open.clear()
    third = await rig.pipeline.accept([msg(f"b{n}") for n in range(5)])
    assert third == Accepted(accepted=5, duplicates=0, rejected=2)
    gate.open.set()
    await rig.settle()
    assert rig.sent("c").count("wait!") == 2
    assert rig.stats.rejected == 6
    handled_in_c = [mid for mid in rig.handler.ids() if mid != "d1"]
    assert handled_in_c == ["a0", "a1", "a2", "b0", "b1", "b2"]
    assert [e["id"] for e in rig.history("c") if e["replies"] and e["status"] == "rejected"] == [
        "a3",
        "b3",
    ]


async def test_burst_of_max_queue_size_plus_one_on_an_idle_chat_is_accepted_in_full(
    make_rig: RigFactory,
) -> None:
    rig = await make_rig(max_queue_size=3)

    assert await rig.pipeline.accept([msg(f"m{n}") for n in range(4)]) == Accepted(4, 0, 0)
    await rig.settle()
    assert rig.transport.sent == [("c", "re:hi")] * 4


# -- retries, timeouts, dead letters --------------------------------------------


async def test_retries_with_backoff_then_failed_and_the_chat_moves_on(
    make_rig: RigFactory,
) -> None:
    async def fails_on_fail(message: Message, ctx: HandlerContext) -> list[str]:
        if message.text == "fail":
            raise HandlerError("backend down")
        return [f"re:{message.text}"]

    rig = await make_rig(FakeHandler(fails_on_fail), max_attempts=3, retry_backoff=0.5)

    await rig.pipeline.accept([msg("m1", text="fail"), msg("m2", text="ok")])
    await rig.settle()

    assert rig.handler.calls == [("m1", 1), ("m1", 2), ("m1", 3), ("m2", 1)]
    assert rig.sleep.delays == [0.5, 1.0]
    dead, ok = rig.history()
    assert dead["status"] == "failed"
    assert dead["attempts"] == 3
    assert "backend down" in dead["last_error"]
    assert "after 3 attempts" in dead["last_error"]
    assert dead["replies"] == []
    assert ok["status"] == "processed"
    assert [r["text"] for r in ok["replies"]] == ["re:ok"]
    assert (rig.stats.failed, rig.stats.processed) == (1, 1)


async def test_retry_that_succeeds_is_processed_once_with_its_replies(
    make_rig: RigFactory,
) -> None:
    async def second_time_lucky(message: Message, ctx: HandlerContext) -> list[str]:
        if ctx.attempt < 2:
            raise HandlerError("flaky")
        return ["one", "two"]

    rig = await make_rig(FakeHandler(second_time_lucky), retry_backoff=2.0)

    await rig.pipeline.accept([msg("m1")])
    await rig.settle()

    (entry,) = rig.history()
    assert (entry["status"], entry["attempts"], entry["last_error"]) == ("processed", 2, None)
    assert [r["text"] for r in entry["replies"]] == ["one", "two"]
    assert rig.sleep.delays == [2.0]
    assert rig.sent("c") == ["one", "two"]


@pytest.mark.parametrize("suspends", [False, True])
async def test_handler_raising_cancelled_error_is_a_failed_attempt(
    make_rig: RigFactory, suspends: bool
) -> None:
    async def cancelled_inside(message: Message, ctx: HandlerContext) -> list[str]:
        if suspends:
            await asyncio.sleep(0)
        if message.text == "bad":
            raise asyncio.CancelledError  # e.g. a cancelled call inside the handler
        return [f"re:{message.text}"]

    rig = await make_rig(FakeHandler(cancelled_inside), max_attempts=2)

    await rig.pipeline.accept([msg("m1", text="bad"), msg("m2", text="ok")])
    await rig.settle()

    bad, ok = rig.history()
    assert (bad["status"], bad["attempts"]) == ("failed", 2)
    assert "CancelledError" in bad["last_error"]
    assert ok["status"] == "processed"
    assert rig.sent("c") == ["re:ok"]


async def test_permanent_handler_error_fails_without_retry(make_rig: RigFactory) -> None:
    async def refuses(message: Message, ctx: HandlerContext) -> list[str]:
        raise PermanentHandlerError("bad request")

    rig = await make_rig(FakeHandler(refuses))

    await rig.pipeline.accept([msg("m1")])
    await rig.settle()

    assert rig.handler.calls == [("m1", 1)]
    assert rig.sleep.delays == []
    assert rig.history()[0]["status"] == "failed"


async def test_a_reply_sqlite_cannot_store_fails_its_message_only(make_rig: RigFactory) -> None:
    async def cuts_emoji(message: Message, ctx: HandlerContext) -> list[str]:
        return ["fine", "half \ud83d"] if message.id == "m1" else ["ok"]

    rig = await make_rig(FakeHandler(cuts_emoji))
    await rig.pipeline.accept([msg("m1"), msg("m2")])
    await rig.settle()

    first, second = rig.history()
    assert (first["status"], first["attempts"], first["replies"]) == ("failed", 1, [])
    assert "reply 1 is not valid Unicode" in first["last_error"]
    assert (second["status"], [r["text"] for r in second["replies"]]) == ("processed", ["ok"])
    assert rig.fatal == []


async def test_handler_timeout_fails_the_message_and_the_chat_moves_on(
    make_rig: RigFactory,
) -> None:
    async def stuck_on_slow(message: Message, ctx: HandlerContext) -> list[str]:
        if message.text == "slow":
            await asyncio.sleep(3600)
        return [f"re:{message.text}"]

    rig = await make_rig(FakeHandler(stuck_on_slow), handler_timeout=0.02)

    await rig.pipeline.accept([msg("m1", text="slow"), msg("m2", text="next")])
    await rig.settle()

    slow, following = rig.history()
    assert slow["status"] == "failed"
    assert "handler_timeout" in slow["last_error"]
    assert following["status"] == "processed"
    assert rig.handler.calls == [("m1", 1), ("m2", 1)]  # a timeout is not retried
    assert rig.sent("c") == ["re:next"]


def test_handler_backoff_doubles_up_to_a_cap() -> None:
    assert [handler_backoff(n, 1.0) for n in (1, 2, 3, 4)] == [1.0, 2.0, 4.0, 8.0]
    assert handler_backoff(30, 1.0) == 60.0


# -- durability: attempts, duplicates, replay -----------------------------------


async def test_message_whose_attempts_are_used_up_is_quarantined_at_replay(
    make_rig: RigFactory, tmp_path: Path
) -> None:
    before = await Store.open(tmp_path / "t1.sqlite3", "t1")
    await before.add_messages([msg("m1", text="poison"), msg("m2")])
    for _ in range(3):  # three runs died while handling m1
        await before.begin_attempt("m1")
    await before.close()

    rig = await make_rig(max_attempts=3)
    await rig.replay()
    await rig.settle()

    assert rig.handler.ids() == ["m2"]  # m1's handler is never called again
    poison, ok = rig.history()
    assert (poison["status"], poison["attempts"]) == ("failed", 3)
    assert "quarantined" in poison["last_error"]
    assert ok["status"] == "processed"
    assert rig.stats.failed == 1


async def test_attempts_survive_a_restart(make_rig: RigFactory, tmp_path: Path) -> None:
    before = await Store.open(tmp_path / "t1.sqlite3", "t1")
    await before.add_messages([msg("m1")])
    await before.begin_attempt("m1")  # the run died during attempt 1
    await before.close()

    rig = await make_rig(max_attempts=3)
    await rig.replay()
    await rig.settle()

    assert rig.handler.calls == [("m1", 2)]
    assert rig.history()[0]["attempts"] == 2


async def test_suspects_from_a_crash_run_one_at_a_time_and_others_go_on(
    make_rig: RigFactory, tmp_path: Path
) -> None:
    before = await Store.open(tmp_path / "t1.sqlite3", "t1")
    await before.add_messages([msg("a1", "a"), msg("b1", "b"), msg("c1", "c"), msg("a2", "a")])
    for mid in ("a1", "b1"):  # in flight when the previous run died
        await before.begin_attempt(mid)
    await before.close()

    async def slow(message: Message, ctx: HandlerContext) -> list[str]:
        await asyncio.sleep(0.005)
        return []

    rig = await make_rig(FakeHandler(slow))
    await rig.replay()
    await rig.settle()

    events = rig.handler.events
    # The two suspects never overlap: one ends before the other starts.
    assert events.index(("end", "a1")) < events.index(("start", "b1"))
    assert events.index(("start", "c1")) < events.index(("end", "a1"))  # c1 did not wait
    assert events.index(("end", "a1")) < events.index(("start", "a2"))
    assert set(rig.status().values()) == {"processed"}


async def test_poison_message_does_not_use_up_other_chats_attempts(
    make_rig: RigFactory, tmp_path: Path
) -> None:
    """A crash during replay is charged to the one suspect running, not to its neighbours."""
    before = await Store.open(tmp_path / "t1.sqlite3", "t1")
    await before.add_messages([msg("bad", "x"), msg("ok1", "y"), msg("ok2", "z")])
    for mid in ("bad", "ok1", "ok2"):  # all three were in flight at the first crash
        await before.begin_attempt(mid)
    await before.close()

    crashing = asyncio.Event()

    async def dies_midway(message: Message, ctx: HandlerContext) -> list[str]:
        if message.id == "bad":
            crashing.set()
        await asyncio.Event().wait()  # nothing in flight finishes: the process is dying
        return []

    rig = await make_rig(FakeHandler(dies_midway), max_attempts=2)
    await rig.replay()
    async with asyncio.timeout(5):
        await crashing.wait()
    await asyncio.sleep(0.01)  # give any neighbour the chance to start (and be charged)
    await rig.crash()  # what was in flight stays "processing"
    assert rig.handler.ids() == ["bad"]

    final = await make_rig(max_attempts=2)
    await final.replay()
    await final.settle()

    assert final.status() == {"bad": "failed", "ok1": "processed", "ok2": "processed"}
    assert final.handler.ids() == ["ok1", "ok2"]


async def test_a_drain_during_probation_keeps_the_suspects_suspects(
    make_rig: RigFactory, tmp_path: Path
) -> None:
    before = await Store.open(tmp_path / "t1.sqlite3", "t1")
    await before.add_messages([msg("bad", "x"), msg("ok1", "y")])
    for mid in ("bad", "ok1"):  # both in flight at the last crash
        await before.begin_attempt(mid)
    await before.close()

    rig = await make_rig(FakeHandler(Gate()))  # never finishes: the drain times out
    await rig.replay()
    await wait_for(lambda: rig.handler.ids() == ["bad"])  # ok1 waits for its turn
    assert await rig.pipeline.drain(grace=0.02) is False

    # Only this run's attempt (bad's second) is given back; both stay suspects.
    assert [(e["id"], e["status"], e["attempts"]) for e in rig.history()] == [
        ("bad", "processing", 1),
        ("ok1", "processing", 1),
    ]


async def test_duplicates_in_memory_are_counted_and_handled_once(make_rig: RigFactory) -> None:
    rig = await make_rig()

    assert await rig.pipeline.accept([msg("m1")]) == Accepted(1, 0, 0)
    assert await rig.pipeline.accept([msg("m1"), msg("m2"), msg("m2")]) == Accepted(1, 2, 0)
    await rig.settle()

    assert rig.handler.ids() == ["m1", "m2"]
    assert rig.stats.duplicates == 2
    assert len(rig.history()) == 2


async def test_duplicates_are_caught_by_the_store_after_a_restart(make_rig: RigFactory) -> None:
    first = await make_rig()
    await first.pipeline.accept([msg("m1")])
    await first.settle()
    await first.close()

    second = await make_rig()  # a new pipeline (empty memory) on the same file
    assert await second.pipeline.accept([msg("m1"), msg("m2")]) == Accepted(1, 1, 0)
    await second.settle()

    assert second.handler.ids() == ["m2"]
    assert second.stats.duplicates == 1
    assert [e["id"] for e in second.history()] == ["m1", "m2"]
    assert len(second.history()[0]["replies"]) == 1


async def test_replay_requeues_in_arrival_order_and_resends_pending_replies_first(
    make_rig: RigFactory, tmp_path: Path
) -> None:
    before = await Store.open(tmp_path / "t1.sqlite3", "t1")
    order = [("a0", "a"), ("a1", "a"), ("b1", "b"), ("a2", "a"), ("b2", "b"), ("a3", "a")]
    await before.add_messages([msg(mid, chat, text=mid) for mid, chat in order])
    await before.complete("a0", ["old reply"])  # done, but its reply was never sent
    await before.begin_attempt("a1")  # in flight when the run died
    await before.close()

    rig = await make_rig()
    await rig.replay()
    await rig.settle()

    handled = rig.handler.ids()
    assert [m for m in handled if m.startswith("a")] == ["a1", "a2", "a3"]
    assert [m for m in handled if m.startswith("b")] == ["b1", "b2"]
    assert rig.sent("a") == ["old reply", "re:a1", "re:a2", "re:a3"]
    assert set(rig.status().values()) == {"processed"}
    assert rig.handler.calls[handled.index("a1")] == ("a1", 2)


# -- drain ----------------------------------------------------------------------


async def test_drain_finishes_in_flight_and_leaves_pending_rows_queued(
    make_rig: RigFactory,
) -> None:
    gate = Gate()
    rig = await make_rig(FakeHandler(gate))
    await rig.pipeline.accept([msg("m1"), msg("m2"), msg("m3"), msg("d1", "d")])
    await asyncio.sleep(0.01)
    assert sorted(gate.waiting) == ["d1", "m1"]

    drain = asyncio.create_task(rig.pipeline.drain(grace=10))
    await asyncio.sleep(0.01)
    assert not drain.done()  # waits for the in-flight ones
    gate.open.set()
    assert await drain is True

    assert rig.status() == {"m1": "processed", "m2": "queued", "m3": "queued", "d1": "processed"}
    assert [e["attempts"] for e in rig.history("c")] == [1, 0, 0]
    await rig.close()

    restarted = await make_rig()  # the next start processes what was left
    await restarted.replay()
    await restarted.settle()
    assert restarted.handler.ids() == ["m2", "m3"]
    assert set(restarted.status().values()) == {"processed"}


async def test_drain_timeout_cancels_in_flight_handlers(make_rig: RigFactory) -> None:
    rig = await make_rig(FakeHandler(Gate()))  # never opened
    await rig.pipeline.accept([msg("m1"), msg("m2")])
    await asyncio.sleep(0.01)

    assert await rig.pipeline.drain(grace=0.02) is False

    # Both replayed at the next start; being stopped did not use up m1's attempt.
    assert [(e["id"], e["status"], e["attempts"]) for e in rig.history()] == [
        ("m1", "queued", 0),
        ("m2", "queued", 0),
    ]
    assert rig.pipeline.queue.in_flight() == 0


async def test_restarts_that_cut_a_slow_handler_short_never_quarantine_it(
    make_rig: RigFactory,
) -> None:
    for _ in range(5):  # more drains than max_attempts (3)
        rig = await make_rig(FakeHandler(Gate()))  # never finishes
        await rig.replay()
        await rig.pipeline.accept([msg("m1")])
        handler = rig.handler
        await wait_for(lambda: handler.ids() == ["m1"])  # noqa: B023 (called before the loop moves on)
        assert await rig.pipeline.drain(grace=0.01) is False
        await rig.close()

    rig = await make_rig()
    await rig.replay()
    await rig.settle()
    (entry,) = rig.history()
    assert (entry["status"], entry["attempts"]) == ("processed", 1)
    assert [r["text"] for r in entry["replies"]] == ["re:hi"]


# -- store failures -------------------------------------------------------------


class FlakyStore:
    """Delegates to the real store; fails the next `add_messages` or every `complete`."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self.fail_next_add = False
        self.fail_complete = False

    async def add_messages(
        self, messages: Sequence[Message], status: str = "queued", *, begun: Collection[str] = ()
    ) -> list[bool]:
        if self.fail_next_add:
            self.fail_next_add = False
            raise StoreError("store: disk I/O error")
        return await self.store.add_messages(messages, status, begun=begun)

    async def begin_attempt(self, message_id: str) -> int:
        return await self.store.begin_attempt(message_id)

    def complete_soon(
        self, message_id: str, replies: Sequence[str], *, begin_next: str | None = None
    ) -> asyncio.Future[Progress]:
        if self.fail_complete:
            failed: asyncio.Future[Progress] = asyncio.get_running_loop().create_future()
            failed.set_exception(StoreError("store: database is locked"))
            return failed
        return self.store.complete_soon(message_id, replies, begin_next=begin_next)

    async def fail(self, message_id: str, error: str, *, final: bool) -> None:
        await self.store.fail(message_id, error, final=final)

    async def release(self, message_id: str, status: str = "queued") -> None:
        await self.store.release(message_id, status)

    async def add_reply(self, message_id: str, chat_id: str, text: str) -> Reply:
        return await self.store.add_reply(message_id, chat_id, text)


W = TypeVar("W", bound="FlakyStore")


def wrapped(kind: Callable[[Store], W]) -> tuple[list[W], Callable[[Store], W]]:
    """A `store=` wrapper for make_rig, and the list that will hold the wrapped store."""
    holder: list[W] = []

    def wrap(real: Store) -> W:
        holder.append(kind(real))
        return holder[0]

    return holder, wrap


async def test_failed_store_write_accepts_nothing_and_a_retry_is_not_a_duplicate(
    make_rig: RigFactory,
) -> None:
    flaky: list[FlakyStore] = []

    def wrap(store: Store) -> FlakyStore:
        flaky.append(FlakyStore(store))
        return flaky[-1]

    gate = Gate()
    rig = await make_rig(FakeHandler(gate), store=wrap, max_queue_size=1)
    await rig.pipeline.accept([msg("m0")])  # in flight: the chat has room for one more
    batch = [msg("m1"), msg("m2")]  # m1 fits, m2 would be rejected

    flaky[0].fail_next_add = True
    with pytest.raises(StoreError):
        await rig.pipeline.accept(batch)
    assert [e["id"] for e in rig.history()] == ["m0"]

    assert await rig.pipeline.accept(batch) == Accepted(accepted=2, duplicates=0, rejected=1)
    gate.open.set()
    await rig.settle()
    assert rig.status() == {"m0": "processed", "m1": "processed", "m2": "rejected"}


async def test_store_failure_while_processing_is_reported_as_fatal(
    make_rig: RigFactory,
) -> None:
    flaky: list[FlakyStore] = []

    def wrap(store: Store) -> FlakyStore:
        flaky.append(FlakyStore(store))
        flaky[-1].fail_complete = True
        return flaky[-1]

    rig = await make_rig(store=wrap)
    await rig.pipeline.accept([msg("m1")])
    await rig.settle()

    (error,) = rig.fatal
    assert isinstance(error, StoreError)
    assert rig.status() == {"m1": "processing"}  # replayed by the next start


async def test_a_store_failure_stops_processing_so_the_chat_keeps_its_order(
    make_rig: RigFactory,
) -> None:
    def wrap(store: Store) -> FlakyStore:
        flaky = FlakyStore(store)
        flaky.fail_complete = True
        return flaky

    rig = await make_rig(store=wrap)
    await rig.pipeline.accept([msg("m1"), msg("m2")])
    await rig.settle()

    assert rig.handler.ids() == ["m1"]  # m2 must not be answered before m1
    assert rig.status() == {"m1": "processing", "m2": "queued"}
    assert len(rig.fatal) == 1
    await rig.close()

    restarted = await make_rig()
    await restarted.replay()
    await restarted.settle()
    assert restarted.handler.ids() == ["m1", "m2"]
    assert set(restarted.status().values()) == {"processed"}


class GatedAdd(FlakyStore):
    """add_messages waits for `release` before it writes."""

    def __init__(self, store: Store) -> None:
        super().__init__(store)
        self.release_add = asyncio.Event()
        self.release_add.set()

    async def add_messages(
        self, messages: Sequence[Message], status: str = "queued", *, begun: Collection[str] = ()
    ) -> list[bool]:
        await self.release_add.wait()
        return await self.store.add_messages(messages, status, begun=begun)


async def test_a_message_stored_during_a_drain_waits_behind_the_cleared_backlog(
    make_rig: RigFactory,
) -> None:
    holder, wrap = wrapped(GatedAdd)

    gate = Gate()
    rig = await make_rig(FakeHandler(gate), store=wrap)
    await rig.pipeline.accept([msg("m1"), msg("m2")])  # m1 in flight, m2 pending
    await wait_for(lambda: gate.waiting == ["m1"])
    holder[0].release_add.clear()
    late = asyncio.create_task(rig.pipeline.accept([msg("m3")]))  # arrived before the drain
    await asyncio.sleep(0.01)
    drain = asyncio.create_task(rig.pipeline.drain(grace=10))
    await asyncio.sleep(0.01)
    holder[0].release_add.set()
    assert await late == Accepted(1, 0, 0)  # acknowledged: it is stored
    gate.open.set()
    assert await drain is True

    assert rig.handler.ids() == ["m1"]
    assert rig.status() == {"m1": "processed", "m2": "queued", "m3": "queued"}
    await rig.close()
    restarted = await make_rig()
    await restarted.replay()
    await restarted.settle()
    assert restarted.handler.ids() == ["m2", "m3"]


class SlowFailingAdd(FlakyStore):
    """The first add_messages waits for `let_go`, then fails."""

    def __init__(self, store: Store) -> None:
        super().__init__(store)
        self.let_go = asyncio.Event()

    async def add_messages(
        self, messages: Sequence[Message], status: str = "queued", *, begun: Collection[str] = ()
    ) -> list[bool]:
        if not self.let_go.is_set():
            await self.let_go.wait()
            raise StoreError("store: disk I/O error")
        return await self.store.add_messages(messages, status, begun=begun)


async def test_a_resend_during_a_failing_first_write_is_not_acknowledged(
    make_rig: RigFactory,
) -> None:
    holder, wrap = wrapped(SlowFailingAdd)

    rig = await make_rig(store=wrap)
    first = asyncio.create_task(rig.pipeline.accept([msg("m1")]))
    await asyncio.sleep(0)
    resend = asyncio.create_task(rig.pipeline.accept([msg("m1")]))
    await asyncio.sleep(0.01)
    assert not resend.done()  # no 202 for an id whose write is not committed
    holder[0].let_go.set()
    for task in (first, resend):
        with pytest.raises(StoreError):
            await task
    assert await rig.pipeline.accept([msg("m1")]) == Accepted(1, 0, 0)


# -- attempts counted without writes of their own --------------------------------


def committed_row(store: Store, message_id: str) -> tuple[str, int]:
    """The message's status and attempts as committed (another connection's view)."""
    with sqlite3.connect(f"{store.path.resolve().as_uri()}?mode=ro", uri=True) as db:
        row = db.execute(
            "SELECT status, attempts FROM messages WHERE id = ?", (message_id,)
        ).fetchone()
    return str(row[0]), int(row[1])


async def test_each_attempt_is_committed_before_its_handler_runs_in_fewer_writes(
    make_rig: RigFactory,
) -> None:
    """The first of a chat is stored begun; each next one is begun by its predecessor's commit."""
    holder: list[Rig] = []
    seen: dict[str, tuple[str, int]] = {}

    async def check(message: Message, ctx: HandlerContext) -> list[str]:
        seen[message.id] = committed_row(holder[0].store, message.id)
        assert ctx.attempt == 1
        return [f"re:{message.text}"]

    rig = await make_rig(FakeHandler(check))
    holder.append(rig)
    await rig.pipeline.accept([msg("m1"), msg("m2"), msg("m3")])  # one chat: a backlog
    await rig.settle()

    assert seen == dict.fromkeys(["m1", "m2", "m3"], ("processing", 1))
    assert [committed_row(rig.store, m) for m in ("m1", "m2", "m3")] == [("processed", 1)] * 3
    # The add, one per completion (beginning the next), the last mark-sent: no
    # write of their own for the attempts (one each before).
    assert rig.store.commits <= 5


class DrainOnFirstCompletion(FlakyStore):
    """Starts a drain right after the first completion is queued (its commit still due)."""

    def __init__(self, store: Store) -> None:
        super().__init__(store)
        self.pipeline: Pipeline | None = None
        self.drain: asyncio.Task[bool] | None = None

    def complete_soon(
        self, message_id: str, replies: Sequence[str], *, begin_next: str | None = None
    ) -> asyncio.Future[Progress]:
        done = super().complete_soon(message_id, replies, begin_next=begin_next)
        if self.drain is None and self.pipeline is not None:
            self.drain = asyncio.ensure_future(self.pipeline.drain(grace=10))
        return done


async def test_a_drain_gives_back_an_attempt_begun_for_a_message_it_cleared(
    make_rig: RigFactory,
) -> None:
    holder, wrap = wrapped(DrainOnFirstCompletion)

    rig = await make_rig(store=wrap)
    holder[0].pipeline = rig.pipeline
    await rig.pipeline.accept([msg("m1"), msg("m2")])  # m1's completion begins m2
    await wait_for(lambda: holder[0].drain is not None and holder[0].drain.done())

    assert rig.handler.ids() == ["m1"]
    assert committed_row(rig.store, "m1") == ("processed", 1)
    assert committed_row(rig.store, "m2") == ("queued", 0)  # not a suspect: it never ran


async def test_a_message_stored_begun_during_a_drain_gets_its_attempt_back(
    make_rig: RigFactory,
) -> None:
    holder, wrap = wrapped(GatedAdd)

    rig = await make_rig(store=wrap)
    holder[0].release_add.clear()
    late = asyncio.create_task(rig.pipeline.accept([msg("m1", chat_id="c2")]))  # an idle chat
    await asyncio.sleep(0.01)
    drain = asyncio.create_task(rig.pipeline.drain(grace=10))
    await asyncio.sleep(0.01)
    holder[0].release_add.set()
    assert await late == Accepted(1, 0, 0)
    assert await drain is True
    assert rig.handler.ids() == []
    assert committed_row(rig.store, "m1") == ("queued", 0)
