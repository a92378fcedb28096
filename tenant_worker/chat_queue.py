"""Per-chat FIFO queues: one message of a chat in flight at a time, chats in parallel.

``ChatQueueManager.enqueue(chat_id, execute)`` returns a future for
``execute()``'s result. Messages of one chat run strictly in order, never two
at once; different chats run concurrently. Each chat holds at most
``max_queue_size`` pending messages besides the one in flight.

How it stays cheap (bench/queue_bench.py, BENCHMARKS.md):

* ``enqueue`` is a plain method returning a ``ChatFuture``: a caller pays one
  future per message, not a coroutine plus a Task.
* A message to an idle chat is started by a *pump* task that steps the
  handler's coroutine itself. A handler that finishes without suspending costs
  no Task at all (the idea of Python 3.12's eager tasks, on 3.11). When a
  handler suspends, the pump becomes that chat's *driver* -- the coroutine goes
  on in the same Task, so ``current_task()`` and ``asyncio.timeout`` stay
  consistent -- and a fresh pump takes the chats still waiting to start.
* ``execute`` may return a plain ``asyncio.Future`` instead of a coroutine:
  the chat is *parked* on it, with no Task, until it is done (its outcome is
  the message's). Many chats can wait so on one shared future (a group
  commit) for the price of a callback each.
* A chat's state is a deque only while messages wait behind the one in
  flight; an in-flight chat with nothing waiting holds the shared ``()``. A
  chat whose last message completes is deleted: an idle manager holds nothing.

Handlers run in the context (``contextvars``) of the pump or driver task, not
of the ``enqueue`` caller: pass what a handler needs in its closure.
"""

from __future__ import annotations

import asyncio
import heapq
import types
from collections import deque
from collections.abc import Awaitable, Callable, Coroutine, Generator
from functools import partial
from typing import Any, TypeVar

from loguru import logger

from chatq.shared.errors import QueueClearedError, QueueFullError
from chatq.shared.log import debug_enabled

T = TypeVar("T")

Execute = Callable[[], Awaitable[Any]]
_Item = tuple["ChatFuture[Any]", Execute]
# A chat's pending messages; () when one is in flight and none waits.
_Pending = deque[_Item] | tuple[()]

# Sync completions a pump runs before it lets the rest of the loop run.
_PUMP_SLICE = 256
_PARKED = object()  # `_step`: the chat waits on a future, not in a task


class ChatFuture(asyncio.Future[T]):
    """The result of one enqueued message.

    Awaitable like any future; it also speaks the coroutine protocol so
    ``asyncio.create_task(manager.enqueue(...))`` works as with an
    ``async def enqueue``.
    """

    __slots__ = ("_iter",)
    _iter: Generator[Any, None, T]

    def send(self, value: Any) -> Any:
        """Step the future as if it were a coroutine (for ``create_task``)."""
        try:
            it = self._iter
        except AttributeError:
            it = self._iter = self.__await__()
        return it.send(value)

    def throw(self, exc: BaseException, *args: Any) -> Any:
        """Throw into the awaiting iterator (coroutine protocol)."""
        try:
            it = self._iter
        except AttributeError:
            raise exc from None
        return it.throw(exc)

    def close(self) -> None:
        """Close the awaiting iterator (coroutine protocol)."""
        it = getattr(self, "_iter", None)
        if it is not None:
            it.close()


@types.coroutine
def resume(coro: Coroutine[Any, Any, T], yielded: Any) -> Generator[Any, Any, T]:
    """Go on with a coroutine that was stepped once by hand and suspended.

    Equivalent to ``yield from coro`` after its first ``send(None)``
    returned ``yielded``: what the Task sends or throws is passed through.
    """
    while True:
        try:
            sent = yield yielded
        except GeneratorExit:
            coro.close()
            raise
        except BaseException as exc:
            try:
                yielded = coro.throw(exc)
            except StopIteration as stop:
                return stop.value  # type: ignore[no-any-return]
        else:
            try:
                yielded = coro.send(sent)
            except StopIteration as stop:
                return stop.value  # type: ignore[no-any-return]


async def _await(awaitable: Awaitable[T]) -> T:
    return await awaitable


async def _call(execute: Callable[[], Awaitable[T]]) -> T:
    return await execute()


def _settle(fut: ChatFuture[Any], result: Any) -> None:
    if not fut.done():  # the caller may have given up already
        fut.set_result(result)


def _fail(fut: ChatFuture[Any], exc: BaseException) -> None:
    if isinstance(exc, asyncio.CancelledError):
        fut.cancel()
    elif not fut.done():
        fut.set_exception(exc)


def _is_fatal(exc: BaseException) -> bool:
    # asyncio's own rule: these end the loop, they are not a message's failure.
    return isinstance(exc, KeyboardInterrupt | SystemExit)


class ChatQueueManager:
    """Strict FIFO per chat, bounded pending per chat, chats concurrent."""

    def __init__(self, tenant_id: str, max_queue_size: int = 50) -> None:
        if max_queue_size < 1:
            raise ValueError(f"max_queue_size: must be >= 1, got {max_queue_size}")
        self.tenant_id = tenant_id
        self.max_queue_size = max_queue_size
        self._chats: dict[str, _Pending] = {}
        self._ready: deque[tuple[str, ChatFuture[Any], Execute]] = deque()
        self._pending = 0
        self._pumping = False
        self._tasks: set[asyncio.Task[None]] = set()
        self._idle: asyncio.Event | None = None
        self._debug = debug_enabled()
        self._parked: dict[str, ChatFuture[Any]] = {}  # chat -> its message, waiting on a future
        self._epoch = 0  # bumped by cancel_all: a park from before is void

    # -- the contract -------------------------------------------------------

    def enqueue(
        self, chat_id: str, execute: Callable[[], Awaitable[T]], *, force: bool = False
    ) -> ChatFuture[T]:
        """Queue ``execute`` behind the chat's earlier messages.

        Returns a future for its result (or exception). Raises
        ``QueueFullError`` at once when the chat already has
        ``max_queue_size`` messages pending, unless ``force`` (used to replay
        messages that were acknowledged before a restart). Must be called
        from the running loop.
        """
        pending = self._chats.get(chat_id)
        if pending is None:
            fut: ChatFuture[T] = ChatFuture()
            self._chats[chat_id] = ()
            self._ready.append((chat_id, fut, execute))
            if not self._pumping:
                self._start_pump()
            if self._debug:
                logger.debug("enqueue chat={} queue_size=0 (runs now)", chat_id)
            return fut
        if len(pending) >= self.max_queue_size and not force:
            raise QueueFullError(self.tenant_id, chat_id, self.max_queue_size)
        if not pending:
            pending = self._chats[chat_id] = deque()
        fut = ChatFuture()
        pending.append((fut, execute))
        self._pending += 1
        if self._debug:
            logger.debug("enqueue chat={} queue_size={}", chat_id, len(pending))
        return fut

    def get_queue_size(self, chat_id: str) -> int:
        """Messages of this chat waiting behind the one in flight."""
        pending = self._chats.get(chat_id)
        return len(pending) if pending else 0

    def peek(self, chat_id: str) -> Execute | None:
        """What the chat runs next after the message in flight, if anything waits."""
        pending = self._chats.get(chat_id)
        return pending[0][1] if pending else None

    def get_total_queued(self) -> int:
        """Messages waiting over all chats (in-flight ones not counted)."""
        return self._pending

    def clear_all(self) -> None:
        """Fail every pending message with ``QueueClearedError``.

        In-flight messages finish; their chats stay busy until they do, so a
        message enqueued after ``clear_all`` still waits for them.
        """
        dropped = 0
        for chat_id, pending in self._chats.items():
            if not pending:
                continue
            for fut, _ in pending:
                if not fut.done():
                    fut.set_exception(QueueClearedError(self.tenant_id, chat_id))
                dropped += 1
            self._chats[chat_id] = ()
        self._pending = 0
        if self._debug:
            logger.debug("clear_all dropped {} pending messages", dropped)

    # -- for heartbeats and shutdown ---------------------------------------

    def is_busy(self, chat_id: str) -> bool:
        """Whether the chat has a message in flight."""
        return chat_id in self._chats

    def in_flight(self) -> int:
        """Chats with a message in flight (each has exactly one)."""
        return len(self._chats)

    def busiest(self, n: int = 5) -> list[tuple[str, int]]:
        """The ``n`` chats with the most pending messages, deepest first."""
        if not self._chats:  # idle: every heartbeat asks
            return []
        depths = ((chat_id, len(p)) for chat_id, p in self._chats.items() if p)
        return heapq.nlargest(n, depths, key=lambda item: item[1])

    async def wait_idle(self) -> None:
        """Return once no chat has a message in flight or pending."""
        while self._chats:
            if self._idle is None:
                self._idle = asyncio.Event()
            await self._idle.wait()

    def cancel_all(self) -> None:
        """Cancel in-flight handlers and fail everything pending (shutdown).

        Callers see ``CancelledError``; the manager is idle once the
        cancellations have run (``await wait_idle()``).
        """
        for task in self._tasks:
            task.cancel()
        parked, self._parked = self._parked, {}
        self._epoch += 1
        for chat_id, fut in parked.items():
            fut.cancel()
            self._abandon(chat_id)
        # A pump cancelled before its first step never runs its clean-up, so
        # the chats waiting to start are failed here rather than left hanging.
        ready = self._ready
        while ready:
            chat_id, fut, _ = ready.popleft()
            fut.cancel()
            self._abandon(chat_id)
        self._pumping = False

    # -- running messages ---------------------------------------------------

    def _start_pump(self) -> None:
        self._pumping = True
        self._spawn(self._pump())

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)  # the loop keeps only weak references
        task.add_done_callback(self._tasks.discard)

    def _next(self, chat_id: str) -> _Item | None:
        """The chat's next live message, or None after freeing the chat."""
        pending = self._chats[chat_id]
        while pending:
            item = pending.popleft()
            self._pending -= 1
            if not item[0].done():  # skip messages whose caller gave up
                return item
        del self._chats[chat_id]
        if self._debug:
            logger.debug("chat={} drained, state freed", chat_id)
        if not self._chats:
            self._became_idle()
        return None

    async def _pump(self) -> None:
        """Start ready chats; then drive the first one that suspends, if any."""
        handed = await self._pump_ready()
        if handed is not None:
            await self._drive(*handed)

    async def _pump_ready(self) -> tuple[str, ChatFuture[Any], Awaitable[Any]] | None:
        """Run ready chats' handlers while they finish without suspending.

        Returns the chat whose handler suspended, with the handler to go on
        with, after handing the other ready chats to a new pump.
        """
        ready = self._ready
        done = 0
        chat_id = ""
        try:
            while ready:
                chat_id, fut, execute = ready.popleft()
                item: _Item | None = (fut, execute)
                while item is not None:
                    fut, execute = item
                    suspended = self._step(chat_id, fut, execute)
                    if isinstance(suspended, tuple):
                        self._hand_off()
                        return chat_id, fut, resume(*suspended)
                    done += 1
                    if suspended is _PARKED:
                        chat_id = ""  # it waits on its future now, not on this pump
                    if done % _PUMP_SLICE == 0:
                        await asyncio.sleep(0)
                    item = self._next(chat_id) if chat_id else None
        except BaseException:
            # Cancelled (the loop is closing) or a fatal error: nothing of
            # this pump's will run, so fail its callers rather than hang them.
            self._abandon(chat_id)
            while ready:
                chat_id, fut, _ = ready.popleft()
                fut.cancel()
                self._abandon(chat_id)
            self._pumping = False
            raise
        self._pumping = False
        return None

    def _hand_off(self) -> None:
        """This pump now drives one chat; a new pump takes the ready ones."""
        if self._ready:
            self._start_pump()
        else:
            self._pumping = False

    def _step(
        self, chat_id: str, fut: ChatFuture[Any], execute: Execute
    ) -> tuple[Coroutine[Any, Any, Any], Any] | object | None:
        """Run ``execute`` up to its first suspension.

        Returns None when it finished (the future is settled), `_PARKED` when
        the chat waits on the future it returned, else the coroutine and what
        it yielded, for ``resume``.
        """
        if self._debug:
            logger.debug("processing chat={}", chat_id)
        try:
            aw = execute()
            coro: Coroutine[Any, Any, Any]
            if type(aw) is types.CoroutineType:
                coro = aw
            elif isinstance(aw, asyncio.Future) and not isinstance(aw, ChatFuture):
                self._park(chat_id, fut, aw)
                return _PARKED
            else:
                coro = _await(aw)
            yielded = coro.send(None)
        except StopIteration as stop:
            _settle(fut, stop.value)
            return None
        except BaseException as exc:
            self._failed(chat_id, fut, exc)
            return None
        return coro, yielded

    def _park(self, chat_id: str, fut: ChatFuture[Any], on: asyncio.Future[Any]) -> None:
        self._parked[chat_id] = fut
        on.add_done_callback(partial(self._unpark, chat_id, fut, self._epoch))

    def _unpark(
        self, chat_id: str, fut: ChatFuture[Any], epoch: int, on: asyncio.Future[Any]
    ) -> None:
        """The future a chat was parked on is done: settle its message, start the next."""
        if epoch != self._epoch:
            return  # cancel_all gave this chat up
        del self._parked[chat_id]
        if on.cancelled():
            fut.cancel()
        elif (exc := on.exception()) is not None:
            self._failed(chat_id, fut, exc)
        else:
            _settle(fut, on.result())
        item = self._next(chat_id)
        if item is not None:
            self._ready.append((chat_id, *item))
            if not self._pumping:
                self._start_pump()

    async def _drive(self, chat_id: str, fut: ChatFuture[Any], awaitable: Awaitable[Any]) -> None:
        """Run one chat's messages, in order, until it has none left."""
        while True:
            try:
                result = await awaitable
            except asyncio.CancelledError as exc:
                task = asyncio.current_task()
                if task is not None and task.cancelling():
                    fut.cancel()  # this driver is being cancelled, not the message
                    self._abandon(chat_id)
                    raise
                self._failed(chat_id, fut, exc)
            except BaseException as exc:
                self._failed(chat_id, fut, exc)
            else:
                _settle(fut, result)
            item = self._next(chat_id)
            if item is None:
                return
            fut, execute = item
            if self._debug:
                logger.debug("processing chat={}", chat_id)
            awaitable = _call(execute)

    def _failed(self, chat_id: str, fut: ChatFuture[Any], exc: BaseException) -> None:
        _fail(fut, exc)
        if self._debug:
            logger.debug("chat={} message failed: {!r}", chat_id, exc)
        if _is_fatal(exc):
            self._abandon(chat_id)
            raise exc

    def _abandon(self, chat_id: str) -> None:
        """Cancel a chat's pending messages and free it (its task is ending)."""
        pending = self._chats.pop(chat_id, None)
        if pending:
            for fut, _ in pending:
                fut.cancel()
            self._pending -= len(pending)
        if not self._chats:
            self._became_idle()

    def _became_idle(self) -> None:
        # A dict never shrinks on deletion: after a burst of 100k chats its
        # table would stay megabytes large, so start an empty one.
        self._chats = {}
        if self._idle is not None:
            self._idle.set()
            self._idle = None
