"""RateLimiter: exact sliding window per key, FIFO waiting, idle keys dropped.

All time is fake: `FakeClock` is the limiter's clock, and its sleep either
advances that clock (`advancing_sleep`) or parks until the test releases it
(`GatedSleep`), so nothing sleeps through real seconds.
"""

from __future__ import annotations

import asyncio
import itertools
from collections import defaultdict

import pytest
from fakes import FakeClock
from hypothesis import given, settings
from hypothesis import strategies as st

from chatq.tenant_worker.rate_limiter import RateLimiter, ThroughputLimiter

WINDOW = 60.0


class AdvancingSleep:
    """Sleeps by moving the fake clock forward, then yields to other tasks."""

    def __init__(self, clock: FakeClock) -> None:
        self.clock = clock
        self.calls: list[float] = []

    async def __call__(self, seconds: float) -> None:
        self.calls.append(seconds)
        self.clock.advance(seconds)
        await asyncio.sleep(0)


class GatedSleep:
    """Parks each sleeper until the test calls `release()`; the clock is moved by the test."""

    def __init__(self) -> None:
        self.pending: list[tuple[float, asyncio.Future[None]]] = []

    async def __call__(self, seconds: float) -> None:
        future = asyncio.get_running_loop().create_future()
        self.pending.append((seconds, future))
        await future

    def durations(self) -> list[float]:
        return [seconds for seconds, future in self.pending if not future.done()]

    def release(self) -> None:
        for _, future in self.pending:
            if not future.done():
                future.set_result(None)
        self.pending.clear()


async def settle() -> None:
    """Let every ready task run until it blocks again."""
    for _ in range(10):
        await asyncio.sleep(0)


# --- try_acquire and wait_time -------------------------------------------------


def test_try_acquire_allows_exactly_max_then_refuses(clock: FakeClock) -> None:
    limiter = RateLimiter(3, clock=clock)
    assert [limiter.try_acquire("k") for _ in range(4)] == [True, True, True, False]
    # Other keys have their own budget.
    assert limiter.try_acquire("other") is True


def test_slot_frees_exactly_one_window_after_oldest_grant(clock: FakeClock) -> None:
    limiter = RateLimiter(3, clock=clock)
    for _ in range(3):
        assert limiter.try_acquire("k")
        clock.advance(10)  # grants at 0, 10, 20
    clock.now = 1000.0 + 59.999
    assert limiter.try_acquire("k") is False
    clock.now = 1000.0 + 60.0
    assert limiter.try_acquire("k") is True
    # That slot is taken again; the next frees when the grant at 10 leaves the window.
    assert limiter.try_acquire("k") is False
    clock.now = 1000.0 + 69.999
    assert limiter.try_acquire("k") is False
    clock.now = 1000.0 + 70.0
    assert limiter.try_acquire("k") is True


def test_wait_time_counts_down_to_the_oldest_grant_leaving(clock: FakeClock) -> None:
    limiter = RateLimiter(2, clock=clock)
    assert limiter.wait_time("k") == 0.0
    limiter.try_acquire("k")
    assert limiter.wait_time("k") == 0.0  # one slot still free
    clock.advance(5)
    limiter.try_acquire("k")
    clock.advance(10)
    assert limiter.wait_time("k") == pytest.approx(45.0)
    clock.advance(45)
    assert limiter.wait_time("k") == 0.0


def test_the_limit_is_a_sliding_window_not_a_fixed_one(clock: FakeClock) -> None:
    # A fixed or bucket limiter would allow another burst right after a window edge.
    limiter = RateLimiter(5, clock=clock)
    clock.advance(59)
    assert all(limiter.try_acquire("k") for _ in range(5))
    clock.advance(2)  # a new "minute" for a fixed window
    assert limiter.try_acquire("k") is False
    assert limiter.wait_time("k") == pytest.approx(58.0)


# --- acquire -------------------------------------------------------------------


async def test_acquire_returns_at_once_when_a_slot_is_free(clock: FakeClock) -> None:
    sleep = AdvancingSleep(clock)
    limiter = RateLimiter(2, clock=clock, sleep=sleep)
    await limiter.acquire("k")
    await limiter.acquire("k")
    assert sleep.calls == []
    assert limiter.try_acquire("k") is False


async def test_acquire_waits_until_the_oldest_grant_leaves(clock: FakeClock) -> None:
    sleep = AdvancingSleep(clock)
    limiter = RateLimiter(2, clock=clock, sleep=sleep)
    limiter.try_acquire("k")
    clock.advance(15)
    limiter.try_acquire("k")
    clock.advance(10)
    await limiter.acquire("k")
    assert clock.now == 1000.0 + 60.0
    assert sleep.calls == [35.0]


async def test_waiters_are_served_in_order_with_one_sleeper_at_a_time(clock: FakeClock) -> None:
    sleep = AdvancingSleep(clock)
    limiter = RateLimiter(1, clock=clock, sleep=sleep)
    assert limiter.try_acquire("k")
    served: list[tuple[str, float]] = []

    async def waiter(name: str) -> None:
        await limiter.acquire("k")
        served.append((name, clock.now - 1000.0))

    await asyncio.gather(*(waiter(name) for name in "ABCD"))
    assert served == [("A", 60.0), ("B", 120.0), ("C", 180.0), ("D", 240.0)]
    # Only the head of the line sleeps: a herd would sleep once per waiter per slot.
    assert sleep.calls == [60.0, 60.0, 60.0, 60.0]


async def test_late_callers_do_not_jump_the_line(clock: FakeClock) -> None:
    sleep = GatedSleep()
    limiter = RateLimiter(1, clock=clock, sleep=sleep)
    assert limiter.try_acquire("k")
    served: list[str] = []

    async def waiter(name: str) -> None:
        await limiter.acquire("k")
        served.append(name)

    first = asyncio.create_task(waiter("first"))
    await settle()
    assert sleep.durations() == [60.0]
    second = asyncio.create_task(waiter("second"))
    await settle()
    assert sleep.durations() == [60.0]  # the second waits on the line, not on a timer

    clock.advance(60)  # a slot is free, but "first" has not woken up yet
    assert limiter.try_acquire("k") is False
    late = asyncio.create_task(waiter("late"))
    await settle()
    sleep.release()
    await settle()
    assert served == ["first"]
    assert sleep.durations() == [60.0]

    clock.advance(60)
    sleep.release()
    await settle()
    clock.advance(60)
    sleep.release()
    await asyncio.gather(first, second, late)
    assert served == ["first", "second", "late"]


async def test_a_cancelled_waiter_leaves_the_line_intact(clock: FakeClock) -> None:
    sleep = GatedSleep()
    limiter = RateLimiter(1, clock=clock, sleep=sleep)
    assert limiter.try_acquire("k")
    head = asyncio.create_task(limiter.acquire("k"))
    await settle()
    middle = asyncio.create_task(limiter.acquire("k"))
    tail = asyncio.create_task(limiter.acquire("k"))
    await settle()
    middle.cancel()
    await settle()
    assert middle.cancelled()
    clock.advance(60)
    sleep.release()
    await head
    await settle()
    assert not tail.done()
    assert sleep.durations() == [60.0]  # the tail is now the head of the line
    clock.advance(60)
    sleep.release()
    await tail

    # Nobody is queued any more: once a slot frees, try_acquire gets it.
    clock.advance(60)
    assert limiter.try_acquire("k") is True


async def test_cancelling_the_sleeping_head_passes_the_turn_on(clock: FakeClock) -> None:
    sleep = GatedSleep()
    limiter = RateLimiter(1, clock=clock, sleep=sleep)
    assert limiter.try_acquire("k")
    head = asyncio.create_task(limiter.acquire("k"))
    await settle()
    nxt = asyncio.create_task(limiter.acquire("k"))
    await settle()
    head.cancel()
    await settle()
    assert head.cancelled()
    assert sleep.durations() == [60.0]  # the next one now sleeps for the slot
    clock.advance(60)
    sleep.release()
    await nxt
    assert limiter.try_acquire("k") is False


# --- idle keys -----------------------------------------------------------------


def test_a_long_busy_log_stays_exact(clock: FakeClock) -> None:
    # One grant a second for 5 minutes: the log keeps dropping expired grants
    # (and reclaiming their room); the window must still count exactly.
    limiter = RateLimiter(100, clock=clock)
    for _ in range(300):
        assert limiter.try_acquire("busy")
        clock.advance(1)
    # At t=300 the grants of t=241..299 are in the window: room for 41 more.
    assert sum(limiter.try_acquire("busy") for _ in range(50)) == 41
    assert limiter.wait_time("busy") == pytest.approx(1.0)  # until t=241 leaves


def test_idle_keys_are_dropped(clock: FakeClock) -> None:
    limiter = RateLimiter(2, clock=clock)
    for i in range(10_000):
        assert limiter.try_acquire(f"user-{i}")
    clock.advance(30)
    for i in range(5):
        limiter.try_acquire(f"late-{i}")
    assert len(limiter) == 10_005

    clock.advance(31)  # the first 10,000 are 61 s old, the late ones 31 s
    limiter.try_acquire("one-more")
    assert len(limiter) == 6


def test_a_key_used_again_is_not_dropped(clock: FakeClock) -> None:
    limiter = RateLimiter(2, clock=clock)
    limiter.try_acquire("busy")
    limiter.try_acquire("idle")
    clock.advance(50)
    limiter.try_acquire("busy")
    clock.advance(20)  # "busy" last granted 20 s ago, "idle" 70 s ago
    assert limiter.wait_time("anything") == 0.0
    assert len(limiter) == 1
    # "busy" still holds its recent grant: only one of two slots is free.
    assert limiter.try_acquire("busy") is True
    assert limiter.try_acquire("busy") is False


# --- arguments -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("max_per_minute", "window", "match"),
    [
        (0, 60.0, "max_per_minute"),
        (-1, 60.0, "max_per_minute"),
        (2.5, 60.0, "max_per_minute"),
        (True, 60.0, "max_per_minute"),
        (10, 0.0, "window"),
        (10, -60.0, "window"),
        (10, float("nan"), "window"),
    ],
)
def test_bad_arguments_are_refused(max_per_minute: int, window: float, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        RateLimiter(max_per_minute, window=window)


# --- properties ----------------------------------------------------------------

KEYS = ("a", "b", "c")
ADVANCES = st.one_of(
    st.sampled_from([0.0, 0.001, 1.0, 30.0, 59.999, 60.0, 60.001]),
    st.floats(min_value=0.0, max_value=90.0, allow_nan=False),
)
OPS = st.lists(
    st.tuples(st.sampled_from(["try", "acquire", "spawn"]), st.sampled_from(KEYS), ADVANCES),
    max_size=60,
)


def assert_within_limit(grants: list[float], limit: int) -> None:
    """No half-open window [s, s + WINDOW) holds more than `limit` grants."""
    grants = sorted(grants)
    for i in range(len(grants) - limit):
        # Windows starting at a grant are the fullest; grant i+limit must lie outside.
        assert grants[i] + WINDOW <= grants[i + limit], grants


async def run_scenario(
    limit: int, ops: list[tuple[str, str, float]]
) -> tuple[dict[str, list[float]], int]:
    clock = FakeClock()
    limiter = RateLimiter(limit, clock=clock, sleep=AdvancingSleep(clock))
    grants: dict[str, list[float]] = defaultdict(list)
    served = 0

    async def acquire(key: str) -> None:
        nonlocal served
        await limiter.acquire(key)
        grants[key].append(clock.now)  # no await since the grant: still its time
        served += 1

    spawned = []
    for kind, key, advance in ops:
        clock.advance(advance)
        if kind == "try":
            if limiter.try_acquire(key):
                grants[key].append(clock.now)
        elif kind == "acquire":
            await acquire(key)
        else:
            spawned.append(asyncio.create_task(acquire(key)))
            await asyncio.sleep(0)
    await asyncio.gather(*spawned)
    return grants, served


@settings(max_examples=150, deadline=None)
@given(limit=st.integers(min_value=1, max_value=4), ops=OPS)
def test_no_window_ever_holds_more_than_the_limit(
    limit: int, ops: list[tuple[str, str, float]]
) -> None:
    grants, served = asyncio.run(run_scenario(limit, ops))
    for times in grants.values():
        assert_within_limit(times, limit)
    assert served == sum(1 for kind, _, _ in ops if kind != "try")


@settings(max_examples=150, deadline=None)
@given(
    limit=st.integers(min_value=1, max_value=4),
    ops=st.lists(st.tuples(st.sampled_from(KEYS), ADVANCES), max_size=80),
)
def test_try_acquire_grants_whenever_the_window_has_room(
    limit: int, ops: list[tuple[str, float]]
) -> None:
    clock = FakeClock()
    limiter = RateLimiter(limit, clock=clock)
    model: dict[str, list[float]] = defaultdict(list)
    for key, advance in ops:
        clock.advance(advance)
        in_window = [t for t in model[key] if t + WINDOW > clock.now]
        expected = len(in_window) < limit
        assert limiter.try_acquire(key) is expected
        if expected:
            model[key].append(clock.now)
        live = sum(1 for times in model.values() if times and times[-1] + WINDOW > clock.now)
        assert len(limiter) == live


@pytest.mark.parametrize("rate", [1, 7, 15, 20, 80, 85, 97, 1000])
async def test_throughput_limiter_holds_any_second_to_the_rate_and_spreads_it(
    rate: int, clock: FakeClock
) -> None:
    limiter = ThroughputLimiter(rate, clock, AdvancingSleep(clock))
    start = clock()
    times = []
    for _ in range(3 * rate):
        await limiter.acquire("number")
        times.append(clock() - start)
    busiest = busiest_second(times)
    assert busiest <= rate
    gaps = {round(b - a, 9) for a, b in itertools.pairwise(times[1:])}
    assert gaps == {round(1.03 / rate, 9)}  # evenly spread, 3 % under the tier


def test_throughput_limiter_refuses_a_bad_rate() -> None:
    with pytest.raises(ValueError, match="per_second must be an integer >= 1"):
        ThroughputLimiter(0)


async def test_throughput_limiter_late_grants_keep_the_schedule_under_the_cap(
    clock: FakeClock,
) -> None:
    limiter = ThroughputLimiter(100, clock, AdvancingSleep(clock))
    start = clock()
    times = []
    for n in range(300):
        if n % 10 == 0:
            clock.advance(0.009)  # a busy loop: late, but within the slack of 10 ms
        await limiter.acquire("n")
        times.append(clock() - start)
    assert times[-1] <= 299 * 0.0103 + 0.02  # lateness did not add up
    assert busiest_second(times) <= 100


async def test_throughput_limiter_try_acquire_takes_only_a_due_slot(clock: FakeClock) -> None:
    limiter = ThroughputLimiter(10, clock, AdvancingSleep(clock))
    assert limiter.try_acquire() is True
    assert limiter.try_acquire() is False  # the next slot is 0.103 s away
    clock.advance(0.103)
    assert limiter.try_acquire() is True
    clock.advance(5.0)  # idle: no saved-up slots, one at a time again
    assert limiter.try_acquire() is True
    assert limiter.try_acquire() is False


def busiest_second(times: list[float]) -> int:
    """The most grants in any half-open 1 s window (two pointers)."""
    busiest, first = 0, 0
    for last, at in enumerate(times):
        while times[first] <= at - 1.0:
            first += 1
        busiest = max(busiest, last - first + 1)
    return busiest
