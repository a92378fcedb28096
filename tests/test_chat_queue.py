"""ChatQueueManager: the DESIGN.md contract, interleavings, memory."""

from __future__ import annotations

import asyncio
import gc
import logging
import random
import sys
import tracemalloc
from collections import defaultdict
from collections.abc import Awaitable, Callable, Iterator

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from loguru import logger

from chatq.shared.errors import ChatqError, QueueClearedError, QueueFullError
from chatq.shared.log import setup_logging
from chatq.tenant_worker.chat_queue import ChatQueueManager


class Recorder:
    """Handlers that record start/end per chat and check one-in-flight."""

    def __init__(self) -> None:
        self.started: dict[str, list[int]] = defaultdict(list)
        self.active: dict[str, int] = defaultdict(int)
        self.overlaps = 0

    def handler(
        self, chat: str, n: int, *, yields: int = 0, fail: bool = False
    ) -> Callable[[], Awaitable[int]]:
        async def run() -> int:
            self.started[chat].append(n)
            self.active[chat] += 1
            if self.active[chat] > 1:
                self.overlaps += 1
            try:
                for _ in range(yields):
                    await asyncio.sleep(0)
                if fail:
                    raise ValueError(f"{chat}:{n} failed")
                return n
            finally:
                self.active[chat] -= 1

        return run


def gate() -> tuple[asyncio.Event, Callable[[], Awaitable[str]]]:
    """A handler that runs until the returned event is set."""
    event = asyncio.Event()

    async def run() -> str:
        await event.wait()
        return "released"

    return event, run


async def test_returns_result_and_raises_exception() -> None:
    manager = ChatQueueManager("t")

    async def ok() -> int:
        return 42

    async def bad() -> None:
        raise KeyError("nope")

    assert await manager.enqueue("c", ok) == 42
    with pytest.raises(KeyError):
        await manager.enqueue("c", bad)


async def test_fifo_per_chat_under_random_latency() -> None:
    manager = ChatQueueManager("t", max_queue_size=100)
    rec = Recorder()
    rng = random.Random(7)
    futures = [
        manager.enqueue(chat, rec.handler(chat, n, yields=rng.randrange(4)))
        for n in range(60)
        for chat in ("a", "b", "c")
    ]
    results = await asyncio.gather(*futures)
    assert results == [n for n in range(60) for _ in range(3)]
    for chat in ("a", "b", "c"):
        assert rec.started[chat] == list(range(60))
    assert rec.overlaps == 0


async def test_chats_run_concurrently() -> None:
    manager = ChatQueueManager("t")
    release, blocked = gate()
    slow = manager.enqueue("a", blocked)

    async def quick() -> str:
        return "b done"

    assert await asyncio.wait_for(manager.enqueue("b", quick), 1) == "b done"
    assert not slow.done()
    release.set()
    assert await slow == "released"


async def test_queue_sizes_do_not_count_the_message_in_flight() -> None:
    manager = ChatQueueManager("t")
    release, blocked = gate()
    futures = [manager.enqueue("a", blocked) for _ in range(4)]
    futures.append(manager.enqueue("b", blocked))
    assert manager.get_queue_size("a") == 3
    assert manager.get_queue_size("b") == 0
    assert manager.get_queue_size("unknown") == 0
    assert manager.get_total_queued() == 3
    release.set()
    await asyncio.gather(*futures)
    assert manager.get_total_queued() == 0


async def test_burst_of_max_plus_one_is_accepted_then_queue_full() -> None:
    manager = ChatQueueManager("acme", max_queue_size=3)
    release, blocked = gate()
    futures = [manager.enqueue("c", blocked) for _ in range(4)]  # 1 in flight + 3 pending
    with pytest.raises(QueueFullError, match="QUEUE_FULL") as info:
        manager.enqueue("c", blocked)
    assert isinstance(info.value, ChatqError)
    assert info.value.chat_id == "c"
    assert manager.get_queue_size("c") == 3
    release.set()
    assert await asyncio.gather(*futures) == ["released"] * 4


async def test_a_failure_affects_only_its_caller() -> None:
    manager = ChatQueueManager("t")
    rec = Recorder()
    first = manager.enqueue("c", rec.handler("c", 0, yields=1))
    failing = manager.enqueue("c", rec.handler("c", 1, yields=1, fail=True))
    last = manager.enqueue("c", rec.handler("c", 2))
    assert await first == 0
    with pytest.raises(ValueError, match="c:1 failed"):
        await failing
    assert await last == 2


async def test_execute_that_raises_before_returning_an_awaitable() -> None:
    manager = ChatQueueManager("t")

    def broken() -> Awaitable[None]:
        raise RuntimeError("no coroutine")

    async def fine() -> str:
        return "fine"

    bad = manager.enqueue("c", broken)
    good = manager.enqueue("c", fine)
    with pytest.raises(RuntimeError):
        await bad
    assert await good == "fine"


async def test_execute_may_return_any_awaitable() -> None:
    manager = ChatQueueManager("t")
    loop = asyncio.get_running_loop()
    fut: asyncio.Future[str] = loop.create_future()
    result = manager.enqueue("c", lambda: fut)
    loop.call_soon(fut.set_result, "from a future")
    assert await result == "from a future"


async def test_clear_all_fails_pending_and_lets_in_flight_finish() -> None:
    manager = ChatQueueManager("t")
    release, blocked = gate()
    in_flight = manager.enqueue("c", blocked)
    pending = [manager.enqueue("c", blocked) for _ in range(3)]
    manager.clear_all()
    assert manager.get_total_queued() == 0
    for fut in pending:
        with pytest.raises(QueueClearedError):
            await fut
    assert not in_flight.done()
    release.set()
    assert await in_flight == "released"


async def test_enqueue_after_clear_all_never_overlaps_the_in_flight_one() -> None:
    manager = ChatQueueManager("t")
    rec = Recorder()
    first = manager.enqueue("c", rec.handler("c", 0, yields=5))
    cleared = manager.enqueue("c", rec.handler("c", 1))
    await asyncio.sleep(0)
    manager.clear_all()
    after = manager.enqueue("c", rec.handler("c", 2, yields=1))
    assert manager.get_queue_size("c") == 1  # waits behind the in-flight one
    assert await after == 2
    assert await first == 0
    with pytest.raises(QueueClearedError):
        await cleared
    assert rec.started["c"] == [0, 2]
    assert rec.overlaps == 0


async def test_chat_state_is_freed_when_its_last_message_completes() -> None:
    manager = ChatQueueManager("t")
    rec = Recorder()
    futures = [manager.enqueue(f"c{n}", rec.handler(f"c{n}", n, yields=n % 2)) for n in range(50)]
    assert manager.in_flight() == 50
    await asyncio.gather(*futures)
    assert manager.in_flight() == 0
    assert manager.busiest() == []
    assert not manager._chats


async def test_memory_returns_to_baseline_after_100k_distinct_chats() -> None:
    manager = ChatQueueManager("t")

    async def noop() -> None:
        return None

    async def one_round(offset: int) -> None:
        futures = [manager.enqueue(f"chat-{offset + n}", noop) for n in range(100_000)]
        for fut in futures:
            await fut

    await one_round(0)  # warm up the dict and deque allocations
    await asyncio.sleep(0)
    gc.collect()
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        await one_round(100_000)
        del one_round
        await asyncio.sleep(0)
        gc.collect()
        after = tracemalloc.get_traced_memory()[0]
    finally:
        tracemalloc.stop()
    assert manager.in_flight() == 0 and manager.get_total_queued() == 0
    assert after - before < 64 * 1024, f"{after - before} bytes still held"


async def test_create_task_and_gather_accept_what_enqueue_returns() -> None:
    manager = ChatQueueManager("t")
    rec = Recorder()
    task = asyncio.create_task(manager.enqueue("c", rec.handler("c", 1, yields=2)))
    assert await task == 1
    assert await asyncio.gather(manager.enqueue("c", rec.handler("c", 2))) == [2]


async def test_a_pending_caller_that_gives_up_is_skipped() -> None:
    manager = ChatQueueManager("t")
    rec = Recorder()
    release, blocked = gate()
    first = manager.enqueue("c", blocked)
    waiter = asyncio.create_task(manager.enqueue("c", rec.handler("c", 1)))
    last = manager.enqueue("c", rec.handler("c", 2))
    await asyncio.sleep(0)
    waiter.cancel()
    release.set()
    assert await first == "released"
    assert await last == 2
    assert rec.started["c"] == [2]
    assert waiter.cancelled()


async def test_an_in_flight_caller_that_gives_up_does_not_unblock_the_chat() -> None:
    manager = ChatQueueManager("t")
    rec = Recorder()
    slow = asyncio.create_task(manager.enqueue("c", rec.handler("c", 0, yields=10)))
    await asyncio.sleep(0)
    slow.cancel()
    assert await manager.enqueue("c", rec.handler("c", 1)) == 1
    assert rec.started["c"] == [0, 1]
    assert rec.overlaps == 0


async def test_handler_raising_cancelled_error_cancels_only_its_caller() -> None:
    manager = ChatQueueManager("t")

    async def gives_up() -> None:
        await asyncio.sleep(0)
        raise asyncio.CancelledError

    async def fine() -> str:
        return "fine"

    cancelled = manager.enqueue("c", gives_up)
    after = manager.enqueue("c", fine)
    assert await after == "fine"
    assert cancelled.cancelled()


async def test_timeouts_inside_handlers_work_before_and_after_suspending() -> None:
    manager = ChatQueueManager("t")
    seen: list[asyncio.Task[object] | None] = []

    async def times_out() -> None:
        seen.append(asyncio.current_task())
        async with asyncio.timeout(0.01):
            await asyncio.sleep(5)

    async def after() -> str:
        await asyncio.sleep(0)
        return "after"

    first = manager.enqueue("c", times_out)
    second = manager.enqueue("c", after)
    with pytest.raises(TimeoutError):
        await first
    assert await second == "after"
    assert seen[0] is not None


async def test_a_handler_keeps_its_task_across_suspension() -> None:
    manager = ChatQueueManager("t")

    async def which_tasks() -> bool:
        before = asyncio.current_task()
        await asyncio.sleep(0)
        return asyncio.current_task() is before

    assert await manager.enqueue("c", which_tasks)


async def test_wait_idle_returns_when_everything_is_done() -> None:
    manager = ChatQueueManager("t")
    release, blocked = gate()
    futures = [manager.enqueue("c", blocked) for _ in range(3)]
    idle = asyncio.create_task(manager.wait_idle())
    await asyncio.sleep(0)
    assert not idle.done()
    release.set()
    await asyncio.wait_for(idle, 1)
    await asyncio.gather(*futures)
    await manager.wait_idle()  # already idle: returns at once


async def test_cancelling_the_loop_tasks_cancels_callers_instead_of_hanging() -> None:
    manager = ChatQueueManager("t")
    _release, blocked = gate()
    futures = [manager.enqueue("c", blocked) for _ in range(3)]
    await asyncio.sleep(0)
    manager.cancel_all()
    results = await asyncio.gather(*futures, return_exceptions=True)
    assert all(isinstance(r, asyncio.CancelledError) for r in results)
    assert manager.in_flight() == 0 and manager.get_total_queued() == 0


@pytest.fixture
def debug_lines() -> Iterator[list[str]]:
    lines: list[str] = []
    root = logging.getLogger()
    saved = root.level, root.handlers[:]
    setup_logging("DEBUG", tenant_id="t", sink=lines.append)
    yield lines
    setup_logging("INFO", sink=lambda _line: None)
    logger.remove()
    logger.configure(extra={})
    logger.add(sys.stderr)
    root.setLevel(saved[0])
    root.handlers[:] = saved[1]


async def test_debug_logging_reports_enqueue_processing_errors_and_cleanup(
    debug_lines: list[str],
) -> None:
    manager = ChatQueueManager("t")

    async def bad() -> None:
        raise ValueError("boom")

    first = manager.enqueue("c", bad)
    second = manager.enqueue("c", bad)
    for fut in (first, second):
        with pytest.raises(ValueError):
            await fut
    text = "\n".join(debug_lines)
    assert "enqueue chat=c queue_size=1" in text
    assert "processing chat=c" in text
    assert "message failed" in text and "boom" in text
    assert "chat=c drained" in text


# -- random interleavings ----------------------------------------------------

ENQUEUE = st.tuples(
    st.just("enqueue"),
    st.sampled_from(["a", "b", "c"]),
    st.integers(min_value=0, max_value=3),  # yields before finishing
    st.booleans(),  # fails
)
OPS = st.lists(
    st.one_of(
        ENQUEUE,
        st.tuples(st.just("clear")),
        st.tuples(st.just("run"), st.integers(min_value=1, max_value=4)),
    ),
    max_size=40,
)


async def play(ops: list[tuple[object, ...]]) -> None:
    manager = ChatQueueManager("t", max_queue_size=3)
    rec = Recorder()
    accepted: dict[str, list[tuple[int, asyncio.Future[int], bool]]] = defaultdict(list)
    n = 0
    for op in ops:
        if op[0] == "enqueue":
            _, chat, yields, fail = op
            assert isinstance(chat, str) and isinstance(yields, int) and isinstance(fail, bool)
            n += 1
            try:
                fut = manager.enqueue(chat, rec.handler(chat, n, yields=yields, fail=fail))
            except QueueFullError:
                assert manager.get_queue_size(chat) == 3
                continue
            accepted[chat].append((n, fut, fail))
        elif op[0] == "clear":
            manager.clear_all()
            assert manager.get_total_queued() == 0
        else:
            for _ in range(int(op[1])):  # type: ignore[call-overload]
                await asyncio.sleep(0)
    await manager.wait_idle()
    assert rec.overlaps == 0
    for chat, items in accepted.items():
        ran = [num for num, fut, _ in items if not isinstance(fut.exception(), QueueClearedError)]
        assert rec.started[chat] == ran  # FIFO, and cleared ones never ran
        for num, fut, fail in items:
            exc = fut.exception()
            if isinstance(exc, QueueClearedError):
                continue
            assert (exc is not None) == fail
            if not fail:
                assert fut.result() == num
    assert manager.in_flight() == 0 and manager.get_total_queued() == 0
    assert not manager._chats


@settings(max_examples=300, deadline=None)
@given(OPS)
def test_random_interleavings_keep_fifo_and_one_in_flight(ops: list[tuple[object, ...]]) -> None:
    asyncio.run(play(ops))


async def test_force_bypasses_the_limit_for_replay() -> None:
    manager = ChatQueueManager("t", max_queue_size=1)
    rec = Recorder()
    futures = [manager.enqueue("c", rec.handler("c", n), force=True) for n in range(5)]
    assert manager.get_queue_size("c") == 4
    assert manager.is_busy("c")
    with pytest.raises(QueueFullError):
        manager.enqueue("c", rec.handler("c", 9))
    assert await asyncio.gather(*futures) == [0, 1, 2, 3, 4]
    assert not manager.is_busy("c")


async def test_cancel_all_right_after_enqueue_leaves_nothing_hanging() -> None:
    manager = ChatQueueManager("t")
    rec = Recorder()
    first = manager.enqueue("a", rec.handler("a", 1))
    manager.cancel_all()  # its pump task has not run yet
    await asyncio.wait_for(manager.wait_idle(), 1)
    assert first.cancelled()
    assert await asyncio.wait_for(manager.enqueue("b", rec.handler("b", 2)), 1) == 2


async def test_a_chat_parked_on_a_future_waits_for_it_without_a_task() -> None:
    manager = ChatQueueManager("t", max_queue_size=10)
    loop = asyncio.get_running_loop()
    commit: asyncio.Future[str] = loop.create_future()  # one future, many chats (a commit)
    ran: list[str] = []

    def parked(name: str) -> Callable[[], asyncio.Future[str]]:
        def execute() -> asyncio.Future[str]:
            ran.append(name)
            return commit

        return execute

    async def after() -> str:
        ran.append("a2")
        return "a2 done"

    first = manager.enqueue("a", parked("a1"))
    other = manager.enqueue("b", parked("b1"))
    second = manager.enqueue("a", after)
    await asyncio.sleep(0.01)
    assert ran == ["a1", "b1"]  # a2 waits behind a1 until its future is done
    assert manager.is_busy("a") and manager.is_busy("b")
    assert len(manager._tasks) == 0  # parked, not driven
    commit.set_result("committed")
    assert await first == "committed" and await other == "committed"
    assert await second == "a2 done"
    await manager.wait_idle()
    assert manager.in_flight() == 0


async def test_a_parked_chat_fails_with_its_future_and_cancel_all_gives_it_up() -> None:
    manager = ChatQueueManager("t", max_queue_size=10)
    loop = asyncio.get_running_loop()
    failing: asyncio.Future[None] = loop.create_future()
    never: asyncio.Future[None] = loop.create_future()
    failed = manager.enqueue("a", lambda: failing)
    stuck = manager.enqueue("b", lambda: never)
    behind = manager.enqueue("b", lambda: never)
    await asyncio.sleep(0)
    failing.set_exception(ChatqError("write failed"))
    with pytest.raises(ChatqError, match="write failed"):
        await failed
    manager.cancel_all()
    await manager.wait_idle()
    assert stuck.cancelled() and behind.cancelled()
    never.set_result(None)  # a late outcome of a chat given up changes nothing
    await asyncio.sleep(0)
    assert manager.in_flight() == 0
