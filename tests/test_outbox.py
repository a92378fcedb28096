"""Outbox: per-chat order, rate limits on fake time, retries, permanent failures, giving up."""

from __future__ import annotations

import asyncio
import itertools
import random
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from chatq.shared.errors import (
    PairRateLimitError,
    PermanentTransportError,
    RetryableTransportError,
    SendingPausedError,
    StoreError,
    TransientTransportError,
)
from chatq.tenant_worker.history import read_history
from chatq.tenant_worker.messages import Message, Reply
from chatq.tenant_worker.outbox import (
    REPLY_BACKOFF_MAX,
    REPLY_MAX_ATTEMPTS,
    Outbox,
    jittered,
    pair_rate_backoff,
    pair_rate_wait,
    reply_backoff,
)
from chatq.tenant_worker.stats import WorkerStats
from chatq.tenant_worker.store import Store
from chatq.tenant_worker.transports import FailWith, MemoryTransport

START = 1_000_000.0


@dataclass
class FakeTime:
    """One fake clock for wall time and monotonic time; `sleep` advances it at once."""

    now: float = START
    slept: list[float] = field(default_factory=list)

    def clock(self) -> float:
        return self.now

    async def sleep(self, delay: float) -> None:
        self.slept.append(delay)
        self.now += max(delay, 0.0)
        await asyncio.sleep(0)


@dataclass
class FakeReplyStore:
    """Records the outbox's writes in order."""

    calls: list[tuple[Any, ...]] = field(default_factory=list)
    broken: bool = False
    provider_ids: dict[int, str] = field(default_factory=dict)

    def mark_sent_soon(self, reply_id: int, provider_id: str) -> asyncio.Future[None]:
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        if self.broken:
            done.set_exception(StoreError("store: disk I/O error"))
        else:
            self.calls.append(("sent", reply_id))
            self.provider_ids[reply_id] = provider_id
            done.set_result(None)
        return done

    async def retry_reply(self, reply_id: int, error: str, next_attempt_at: float) -> None:
        if self.broken:
            raise StoreError("store: disk I/O error")
        self.calls.append(("retry", reply_id, next_attempt_at))

    async def fail_reply(self, reply_id: int, error: str) -> None:
        self.calls.append(("failed", reply_id, error))


class TimedTransport(MemoryTransport):
    """A MemoryTransport that notes the fake time of each successful send."""

    def __init__(
        self, time: FakeTime, fail_with: FailWith | None = None, max_chars: int | None = None
    ) -> None:
        super().__init__(fail_with, max_chars)
        self.time = time
        self.at: list[tuple[str, str, float]] = []
        self.jitter: Callable[[], float] | None = None

    async def send(self, chat_id: str, text: str) -> str:
        if self.jitter is not None:
            await asyncio.sleep(self.jitter())  # real, tiny: lets chats interleave
        provider_id = await super().send(chat_id, text)
        self.at.append((chat_id, text, self.time.now - START))
        return provider_id


@dataclass
class Rig:
    outbox: Outbox
    store: FakeReplyStore
    transport: TimedTransport
    stats: WorkerStats
    time: FakeTime
    fatal: list[BaseException]

    async def done(self) -> None:
        assert await self.outbox.wait_empty(grace=5)


_ids = iter(range(1, 1_000_000))


def reply(chat_id: str, text: str, **fields: Any) -> Reply:
    return Reply(id=next(_ids), message_id=f"m-{text}", chat_id=chat_id, text=text, **fields)


@pytest.fixture
async def make_rig() -> AsyncIterator[Callable[..., Rig]]:
    outboxes: list[Outbox] = []

    def make(fail_with: FailWith | None = None, max_chars: int | None = None, **limits: Any) -> Rig:
        time, store, stats = FakeTime(), FakeReplyStore(), WorkerStats()
        fatal: list[BaseException] = []
        transport = TimedTransport(time, fail_with, max_chars)
        outbox = Outbox(
            store,
            transport,
            stats,
            **{"per_chat_per_minute": 1000, **limits},
            clock=time.clock,
            monotonic=time.clock,
            sleep=time.sleep,
            on_fatal=fatal.append,
            jitter=lambda delay: delay,  # exact retry times
        )
        outboxes.append(outbox)
        return Rig(outbox, store, transport, stats, time, fatal)

    yield make
    for outbox in outboxes:
        await outbox.aclose()


def failing(times: int, error: Callable[[], Exception], text: str | None = None) -> FailWith:
    """Fail the first `times` sends (of `text`, if given) with `error()`, then succeed."""
    left = [times]

    def fail_with(chat_id: str, sent: str) -> Exception | None:
        if left[0] > 0 and text in (None, sent):
            left[0] -= 1
            return error()
        return None

    return fail_with


async def test_replies_go_out_in_order_per_chat_while_chats_interleave(
    make_rig: Callable[..., Rig],
) -> None:
    rig = make_rig()
    rng = random.Random(3)
    rig.transport.jitter = lambda: rng.uniform(0, 0.002)
    chats = ["a", "b", "c", "d"]

    for n in range(10):
        rig.outbox.submit([reply(chat, f"{chat}{n}") for chat in chats])
    assert rig.outbox.pending() == rig.outbox.unsent() == 40
    await rig.done()

    for chat in chats:
        assert [t for c, t in rig.transport.sent if c == chat] == [f"{chat}{n}" for n in range(10)]
    assert [c for c, _t in rig.transport.sent[:8]] != ["a"] * 8  # not one chat after another
    assert rig.stats.sent == 40
    assert rig.outbox.pending() == rig.outbox.unsent() == 0


async def test_per_chat_rate_limit_makes_the_third_reply_wait_a_minute(
    make_rig: Callable[..., Rig],
) -> None:
    rig = make_rig(per_chat_per_minute=2)

    # b first: a's wait moves the shared fake clock at once, so b must go before it.
    rig.outbox.submit([reply("b", "b1"), reply("a", "a1"), reply("a", "a2"), reply("a", "a3")])
    rig.outbox.submit([reply("b", "b2")])
    await rig.done()

    at = {text: when for _chat, text, when in rig.transport.at}
    assert at["b1"] == at["b2"] == at["a1"] == at["a2"] == 0.0
    assert at["a3"] == pytest.approx(60.0)
    assert rig.time.slept == [pytest.approx(60.0)]
    assert rig.stats.rate_limited == 1  # only a3 waited
    assert [t for c, t, _ in rig.transport.at if c == "a"] == ["a1", "a2", "a3"]


async def test_tenant_rate_limit_caps_all_chats_together(make_rig: Callable[..., Rig]) -> None:
    rig = make_rig(per_chat_per_minute=100, tenant_per_minute=2)

    rig.outbox.submit([reply("a", "a1"), reply("b", "b1"), reply("c", "c1")])
    await rig.done()

    times = sorted(when for _chat, _text, when in rig.transport.at)
    assert times == [0.0, 0.0, pytest.approx(60.0)]
    assert rig.stats.rate_limited == 1


async def test_retryable_error_is_retried_with_backoff_then_sent(
    make_rig: Callable[..., Rig],
) -> None:
    rig = make_rig(
        failing(2, lambda: RetryableTransportError("503 from provider")), retry_backoff=1.0
    )
    first, second = reply("a", "first"), reply("a", "second")

    rig.outbox.submit([first, second])
    await rig.done()

    assert rig.store.calls == [
        ("retry", first.id, START + 1.0),
        ("retry", first.id, START + 1.0 + 2.0),
        ("sent", first.id),
        ("sent", second.id),  # held back until the first one is out: order is kept
    ]
    assert rig.transport.attempts == 4
    assert rig.transport.sent == [("a", "first"), ("a", "second")]
    assert rig.time.now - START == pytest.approx(3.0)


async def test_permanent_error_fails_the_reply_and_the_chat_goes_on(
    make_rig: Callable[..., Rig],
) -> None:
    rig = make_rig(failing(1, lambda: PermanentTransportError("400 unknown recipient")))
    bad, good = reply("a", "bad"), reply("a", "good")

    rig.outbox.submit([bad, good])
    await rig.done()

    assert rig.store.calls == [("failed", bad.id, "400 unknown recipient"), ("sent", good.id)]
    assert rig.transport.attempts == 2
    assert (rig.stats.send_failed, rig.stats.sent) == (1, 1)


async def test_gives_up_after_reply_max_attempts_counting_each_attempt_once(
    make_rig: Callable[..., Rig],
) -> None:
    rig = make_rig(lambda chat, text: RetryableTransportError("timeout"), retry_backoff=1.0)
    doomed = reply("a", "doomed")

    rig.outbox.submit([doomed])
    await rig.done()

    assert rig.transport.attempts == REPLY_MAX_ATTEMPTS
    kinds = [call[0] for call in rig.store.calls]
    assert kinds == ["retry"] * (REPLY_MAX_ATTEMPTS - 1) + ["failed"]
    assert f"after {REPLY_MAX_ATTEMPTS} attempts" in rig.store.calls[-1][2]
    due = [call[2] for call in rig.store.calls[:-1]]  # each retry's next_attempt_at
    waits = [later - earlier for earlier, later in itertools.pairwise(due)]
    assert waits == [reply_backoff(n, 1.0) for n in range(2, REPLY_MAX_ATTEMPTS)]
    assert rig.stats.send_failed == 1


async def test_a_failure_known_to_pass_is_retried_past_the_attempt_limit(
    make_rig: Callable[..., Rig],
) -> None:
    """Meta overloaded for an hour (130429, 5xx, timeouts): the reply stays pending, then goes."""
    times = REPLY_MAX_ATTEMPTS * 3
    rig = make_rig(failing(times, lambda: TransientTransportError("130429: throughput")))
    rig.outbox.submit([reply("a", "patient")])
    await rig.done()

    assert rig.transport.sent == [("a", "patient")]
    kinds = [call[0] for call in rig.store.calls]
    assert kinds == ["retry"] * times + ["sent"]
    waits = [call[2] for call in rig.store.calls[:-1]]
    assert max(b - a for a, b in itertools.pairwise(waits)) <= REPLY_BACKOFF_MAX + 1e-9
    assert rig.stats.send_failed == 0


async def test_a_replayed_reply_keeps_its_attempts_and_due_time(
    make_rig: Callable[..., Rig],
) -> None:
    rig = make_rig(lambda chat, text: RetryableTransportError("timeout"))
    late = reply("a", "late", attempts=REPLY_MAX_ATTEMPTS - 1, next_attempt_at=START + 30.0)

    rig.outbox.submit([late])
    await rig.done()

    assert rig.time.slept[0] == pytest.approx(30.0)  # waits until it is due
    assert rig.transport.attempts == 1  # its last attempt
    assert [call[0] for call in rig.store.calls] == ["failed"]


async def test_store_failure_is_reported_as_fatal_and_nothing_is_confirmed(
    make_rig: Callable[..., Rig],
) -> None:
    rig = make_rig()
    rig.store.broken = True

    rig.outbox.submit([reply("a", "one"), reply("a", "two")])
    await rig.done()

    # The worker stops on the first fatal error; both replies stay pending in
    # the store and go out again, in order, on the next start.
    assert rig.fatal and all(isinstance(error, StoreError) for error in rig.fatal)
    assert rig.store.calls == []


async def test_an_unrecorded_retry_stops_the_outbox_so_the_chat_keeps_its_order(
    make_rig: Callable[..., Rig],
) -> None:
    rig = make_rig(fail_with=failing(1, lambda: RetryableTransportError("503")))
    rig.store.broken = True  # so the retry of "one" cannot be recorded

    rig.outbox.submit([reply("a", "one"), reply("a", "two"), reply("b", "other")])
    await rig.done()

    # Sending "two" (or anything) now would put it ahead of "one" after the
    # restart: everything stays pending and goes out, in order, from the store.
    assert rig.transport.sent == []
    assert rig.fatal and all(isinstance(error, StoreError) for error in rig.fatal)


async def test_wait_empty_times_out_and_aclose_leaves_replies_pending(
    make_rig: Callable[..., Rig],
) -> None:
    rig = make_rig()
    release = asyncio.Event()

    async def stuck_send(chat_id: str, text: str) -> str:
        await release.wait()
        return "never"

    rig.transport.send = stuck_send  # type: ignore[method-assign]
    rig.outbox.submit([reply("a", "one"), reply("b", "two")])

    assert await rig.outbox.wait_empty(grace=0.01) is False
    assert rig.outbox.pending() == 2
    await rig.outbox.aclose()
    assert rig.outbox.pending() == 0
    assert rig.store.calls == []


async def test_with_a_real_store_replies_end_sent_with_their_attempts(tmp_path: Path) -> None:
    store = await Store.open(tmp_path / "t1.sqlite3", "t1")
    try:
        await store.add_messages([Message("m1", "c", "hi", "t1")])
        stored = await store.complete("m1", ["one", "two"])
        fake = FakeTime(now=max(r.next_attempt_at for r in stored))  # the store's wall clock
        transport = MemoryTransport(failing(1, lambda: RetryableTransportError("busy")))
        outbox = Outbox(
            store,
            transport,
            WorkerStats(),
            per_chat_per_minute=10,
            clock=fake.clock,
            monotonic=fake.clock,
            sleep=fake.sleep,
        )
        outbox.submit(stored)
        assert await outbox.wait_empty(grace=5)
        await outbox.aclose()
    finally:
        await store.close()  # commits the mark-sent writes the outbox did not wait for

    (entry,) = read_history(store.path)
    assert [(r["text"], r["status"], r["attempts"]) for r in entry["replies"]] == [
        ("one", "sent", 2),
        ("two", "sent", 1),
    ]


# --- long replies, pause, pair rate, the number's throughput (the whatsapp transport) --------


async def test_a_long_reply_goes_out_in_parts_each_rate_limited(
    make_rig: Callable[..., Rig],
) -> None:
    rig = make_rig(max_chars=9, per_chat_per_minute=2)
    long_one = reply("a", "aaaa bbbb cccc dddd eeee")
    rig.outbox.submit([long_one])
    await rig.done()

    assert rig.transport.at == [
        ("a", "aaaa bbbb", 0.0),
        ("a", "cccc dddd", 0.0),
        ("a", "eeee", pytest.approx(60.0)),  # the third message waits for the chat's limit
    ]
    assert rig.store.calls == [("sent", long_one.id)]
    assert rig.store.provider_ids[long_one.id] == "mem-3"  # the last part's id
    assert rig.stats.sent == 1


async def test_a_retry_resumes_at_the_part_that_failed(make_rig: Callable[..., Rig]) -> None:
    rig = make_rig(failing(1, lambda: RetryableTransportError("130429: slow down"), "bbbb"), 4)
    first = reply("a", "aaaa bbbb cccc")
    rig.outbox.submit([first])
    await rig.done()

    assert [text for _chat, text in rig.transport.sent] == ["aaaa", "bbbb", "cccc"]
    assert rig.store.calls == [("retry", first.id, START + 1.0), ("sent", first.id)]
    assert rig.stats.retried == 1


async def test_a_later_part_failing_for_good_names_the_part(make_rig: Callable[..., Rig]) -> None:
    failure = failing(1, lambda: PermanentTransportError("131047: Re-engagement message"), "bbbb")
    rig = make_rig(failure, 4)
    doomed = reply("a", "aaaa bbbb cccc")
    rig.outbox.submit([doomed, reply("a", "next")])
    await rig.done()

    assert rig.store.calls[0] == ("failed", doomed.id, "part 2 of 3: 131047: Re-engagement message")
    assert [text for _chat, text in rig.transport.sent] == ["aaaa", "next"]


@dataclass
class ScaledTime:
    """Real time, sped up: concurrent chats really wait side by side (1 s = 10 ms)."""

    speed: float = 100.0
    origin: float = field(default_factory=lambda: asyncio.get_running_loop().time())

    def clock(self) -> float:
        return START + (asyncio.get_running_loop().time() - self.origin) * self.speed

    async def sleep(self, delay: float) -> None:
        await asyncio.sleep(max(delay, 0.0) / self.speed)


async def test_pair_rate_backs_off_that_chat_4_to_the_n_while_others_send() -> None:
    time, store, stats = ScaledTime(), FakeReplyStore(), WorkerStats()
    sent_at: list[tuple[str, float]] = []
    refusals = [2]

    def pair_rate(chat_id: str, text: str) -> Exception | None:
        if chat_id == "busy" and refusals[0] > 0:
            refusals[0] -= 1
            return PairRateLimitError("131056: pair rate limit hit")
        sent_at.append((text, time.clock() - START))
        return None

    outbox = Outbox(
        store,
        MemoryTransport(pair_rate),
        stats,
        per_chat_per_minute=1000,
        clock=time.clock,
        monotonic=time.clock,
        sleep=time.sleep,
        jitter=lambda delay: delay,
    )
    busy = [reply("busy", "busy1"), reply("busy", "busy2")]
    outbox.submit(busy)
    outbox.submit([reply(f"calm{n}", f"calm{n}") for n in range(5)])
    assert await outbox.wait_empty(grace=5)
    await outbox.aclose()

    times = dict(sent_at)
    assert all(times[f"calm{n}"] < 4.0 for n in range(5))  # not held up by "busy"
    assert 19.9 <= times["busy1"] < 30.0  # after 4^1, then 4^2 seconds
    assert times["busy2"] >= times["busy1"]  # the strikes end with a success
    retries = [call for call in store.calls if call[0] == "retry"]
    first, second = (call[2] - START for call in retries)
    assert (first, second - first) == (pytest.approx(4.0, abs=2), pytest.approx(16.0, abs=2))


async def test_a_pause_sends_nothing_more_and_keeps_replies_pending() -> None:
    time, store, stats = ScaledTime(), FakeReplyStore(), WorkerStats()
    failed_once: set[str] = set()

    def refuse(chat_id: str, text: str) -> Exception | None:
        if text == "token":
            return SendingPausedError("190: Error validating access token")
        if text == "slow" and text not in failed_once:
            failed_once.add(text)
            return RetryableTransportError("131000: something went wrong")
        return None

    transport = MemoryTransport(refuse)
    outbox = Outbox(
        store,
        transport,
        stats,
        per_chat_per_minute=1000,
        retry_backoff=20.0,
        clock=time.clock,
        monotonic=time.clock,
        sleep=time.sleep,
        jitter=lambda delay: delay,
    )
    slow, token = reply("a", "slow"), reply("b", "token")
    outbox.submit([slow])  # fails first: waits 20 s (0.2 s) for its retry
    outbox.submit([token, reply("b", "after")])
    assert await outbox.wait_empty(grace=5)
    outbox.submit([reply("c", "new")])
    assert await outbox.wait_empty(grace=5)
    await outbox.aclose()

    assert outbox.paused is not None
    assert outbox.paused.reason == "190: Error validating access token"
    assert outbox.paused.since == pytest.approx(START, abs=20)
    assert transport.sent == []  # "slow" woke up paused; "after" and "new" never went
    assert [call[0] for call in store.calls] == ["retry"]  # nothing failed, nothing sent
    assert (stats.sent, stats.send_failed, outbox.pending()) == (0, 0, 0)
    assert outbox.unsent() == 4  # held by the pause: the backlog `chatq list` shows


async def test_a_server_asked_wait_and_an_own_attempt_limit(
    make_rig: Callable[..., Rig],
) -> None:
    """Retry-After (carried by the error) sets the wait; max_attempts (the webhook's) the end."""

    def busy(chat: str, text: str) -> Exception:
        error = RetryableTransportError("webhook_url answered 429")
        error.retry_after = 42.0
        return error

    rig = make_rig(busy, retry_backoff=1.0, max_attempts=3)
    doomed = reply("a", "doomed")
    rig.outbox.submit([doomed])
    await rig.done()
    assert rig.store.calls[:2] == [
        ("retry", doomed.id, START + 42.0),
        ("retry", doomed.id, START + 84.0),
    ]
    assert rig.store.calls[2][0] == "failed" and "after 3 attempts" in rig.store.calls[2][2]


async def test_replies_keep_their_order_through_retries_and_pair_rate(
    make_rig: Callable[..., Rig],
) -> None:
    rig = make_rig(failing(2, lambda: PairRateLimitError("131056"), "a1"))
    rig.outbox.submit([reply("a", f"a{n}") for n in range(1, 5)])
    await rig.done()
    assert [text for _chat, text in rig.transport.sent] == ["a1", "a2", "a3", "a4"]


async def test_the_number_limiter_spreads_sends_and_holds_the_tier(
    make_rig: Callable[..., Rig],
) -> None:
    rig = make_rig(number_per_second=20)
    rig.outbox.submit([reply(f"u{n}", f"m{n}") for n in range(60)])
    await rig.done()

    times = sorted(when for _chat, _text, when in rig.transport.at)
    busiest = max(sum(1 for t in times if start <= t < start + 1.0) for start in times)
    assert busiest == 20  # never more than the tier in any 1 s window
    assert times[-1] == pytest.approx(59 * 0.0515)  # one per 0.0515 s: 3 % under the tier


def test_jitter_spreads_a_delay_within_a_fifth() -> None:
    assert all(0.8 <= jittered(10.0) / 10.0 <= 1.2 for _ in range(100))
    assert pair_rate_backoff(1) == 4.0 and pair_rate_backoff(3) == 64.0
    assert pair_rate_backoff(20) == 4.0**6


def test_a_pair_rate_wait_is_never_shorter_than_4_to_the_n() -> None:
    waits = [pair_rate_wait(1, jittered) for _ in range(1_000)]
    assert min(waits) >= 4.0 and max(waits) <= 4.0 * 1.2
    assert max(waits) - min(waits) > 0.4  # still spread, so chats do not retry in step
    assert pair_rate_wait(2, lambda delay: delay) == 16.0
