"""One tenant's message pipeline: dedup -> store -> per-chat queue -> handler -> replies.

    accept(messages)          dedup in memory, then by the store's unique id
      -> store (committed)    queued, or rejected when the chat is full
      -> ChatQueueManager     strict FIFO per chat
      -> handler              attempts counted durably before each try
      -> store.complete       processed + replies, one transaction
      -> outbox               rate-limited delivery

Attempts are counted without a write of their own where they can be: a
message that will run as soon as it is stored (its chat is idle) is stored
``processing`` with attempt 1; the next message of a chat with a backlog is
begun in the transaction that completes the one before it. Either way the
count is committed before the handler runs, and at most one message per chat
is ``processing`` at any commit. One begun that does not run after all (a
drain cleared it) is given its attempt back.

A message is acknowledged only once its row is committed. Attempts are
counted in the store before the handler runs, so a message whose handling
kills the worker is given up (``failed``) after ``max_attempts`` restarts
instead of keeping its tenant down; a handler cut short by a drain (a stop,
not the message's fault) gives its attempt back. After a restart, the
messages that were in flight when the worker died (*suspects*) run one at a
time: run side by side, one poison message would use up the attempts of
every message in flight next to it at each crash, and all of them would end
``failed``.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Collection, Coroutine, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any, Protocol

from loguru import logger

from chatq.config.settings import TenantConfig
from chatq.shared.errors import (
    ChatqError,
    HandlerError,
    HandlerTimeoutError,
    PermanentHandlerError,
    QueueClearedError,
    QueueFullError,
    StoreError,
)
from chatq.shared.log import bind_message
from chatq.tenant_worker.chat_queue import ChatQueueManager, resume
from chatq.tenant_worker.dedup import MessageDeduplicator
from chatq.tenant_worker.handlers import Handler, HandlerContext
from chatq.tenant_worker.messages import Message, Reply, storable
from chatq.tenant_worker.outbox import Outbox
from chatq.tenant_worker.stats import WorkerStats
from chatq.tenant_worker.store import Progress

HANDLER_BACKOFF_MAX = 60.0


@dataclass(slots=True)
class _Suspended:
    """A handler that suspended at its first step: go on with `work` from `yielded`."""

    work: Coroutine[Any, Any, list[str]]
    yielded: Any
    started: float  # loop time, for its deadline


# What trying the handler gave: its replies, its failure, or where it suspended.
_Tried = list[str] | BaseException | _Suspended


class MessageStore(Protocol):
    """The part of the store the pipeline uses."""

    async def add_messages(
        self, messages: Sequence[Message], status: str = ..., *, begun: Collection[str] = ...
    ) -> list[bool]: ...
    async def begin_attempt(self, message_id: str) -> int: ...
    def complete_soon(
        self, message_id: str, replies: Sequence[str], *, begin_next: str | None = ...
    ) -> asyncio.Future[Progress]: ...
    async def fail(self, message_id: str, error: str, *, final: bool) -> None: ...
    async def release(self, message_id: str, status: str) -> None: ...
    async def add_reply(self, message_id: str, chat_id: str, text: str) -> Reply: ...


@dataclass(frozen=True, slots=True)
class Accepted:
    """What one ingest call did: stored (incl. rejected), duplicates, rejected."""

    accepted: int
    duplicates: int
    rejected: int


def handler_backoff(attempts: int, base: float) -> float:
    """Seconds to wait before retrying after failed attempt number ``attempts``."""
    return float(min(base * 2 ** (attempts - 1), HANDLER_BACKOFF_MAX))


class Pipeline:
    """Takes accepted messages through the handler to stored replies."""

    def __init__(
        self,
        tenant: TenantConfig,
        store: MessageStore,
        handler: Handler,
        outbox: Outbox,
        stats: WorkerStats,
        *,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
        monotonic: Callable[[], float] = time.monotonic,
        on_fatal: Callable[[BaseException], None] | None = None,
    ) -> None:
        self._tenant = tenant
        self._store = store
        self._handler = handler
        self._outbox = outbox
        self.stats = stats
        self._sleep = sleep
        self._on_fatal = on_fatal
        self.queue = ChatQueueManager(tenant.id, tenant.max_queue_size)
        self._dedup = MessageDeduplicator(
            tenant.dedup_ttl_seconds, tenant.dedup_max_entries, clock=monotonic
        )
        self._reserved: dict[str, int] = {}  # slots taken by messages being stored
        self._storing: dict[str, asyncio.Future[bool]] = {}  # id -> its write's outcome
        self._overloaded: set[str] = set()  # chats told to wait in this overload episode
        self._suspects: set[str] = set()  # replayed ids that were in flight at the last death
        # Messages whose next attempt is counted (committed, or in a write on
        # its way) but has not started: id -> that attempt's number.
        self._begun: dict[str, int] = {}
        self._completing: asyncio.Future[Progress] | None = None  # the write `_done` watches
        self._completed: list[tuple[Message, str | None]] = []  # its entries: message, next
        self._tasks: set[asyncio.Future[None]] = set()  # give-backs nobody waits on
        self._probation = asyncio.Lock()  # suspects run one at a time
        # Set by drain() and by a failed store write: from then on nothing
        # new starts, and what is left replays, in order, at the next start.
        self._draining = False
        self._halted = False

    # -- intake -------------------------------------------------------------

    async def accept(self, messages: Sequence[Message]) -> Accepted:
        """Store and queue messages; return once every stored row is committed.

        An id seen in memory whose first write is still being committed is
        not acknowledged before that commit (and not at all if it failed).
        """
        earlier = {self._storing[m.id] for m in messages if m.id in self._storing}
        fresh = [m for m in messages if not self._dedup.is_duplicate(m.id)]
        duplicates = len(messages) - len(fresh)
        admitted, refused, ready = self._admit(fresh)
        written: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        for message in fresh:
            self._storing[message.id] = written
        try:
            stored = await self._store_new(admitted, "queued", begun=ready)
        except BaseException:
            self._forget(refused)  # never offered to the store: a retry is not a duplicate
            self._end_write(fresh, written, ok=False)
            raise
        finally:
            self._release(admitted)
        for message in stored:
            if message.id in ready:
                self._begun[message.id] = 1
        try:
            result = await self._finish_accept(fresh, stored, refused, duplicates)
        except BaseException:
            self._end_write(fresh, written, ok=False)
            raise
        self._end_write(fresh, written, ok=True)  # before waiting on others: no cycles
        if earlier and not all(await asyncio.gather(*earlier)):
            raise StoreError("an earlier write of the same message id failed; send it again")
        return result

    def _end_write(self, fresh: Sequence[Message], written: asyncio.Future[bool], ok: bool) -> None:
        if not written.done():
            written.set_result(ok)
        for message in fresh:
            if self._storing.get(message.id) is written:
                del self._storing[message.id]

    async def _finish_accept(
        self,
        fresh: Sequence[Message],
        stored: Sequence[Message],
        refused: Sequence[Message],
        duplicates: int,
    ) -> Accepted:
        if not self._draining:  # else a request that arrived before the drain: rows
            for message in stored:  # stay queued, behind the chat's cleared backlog
                self._enqueue(message)
        else:
            await self._give_back()  # those stored `processing` will not run now
        rejected = await self._store_new(refused, "rejected")
        for message in rejected:
            await self._tell_to_wait(message)
        duplicates += len(fresh) - len(stored) - len(rejected)
        self.stats.duplicates += duplicates
        self.stats.rejected += len(rejected)
        return Accepted(len(stored) + len(rejected), duplicates, len(rejected))

    async def replay(
        self,
        unfinished: Sequence[Message],
        replies: Sequence[Reply],
        *,
        suspects: Collection[str] = (),
    ) -> None:
        """Requeue what a previous run accepted but did not finish, in arrival order.

        ``suspects``: ids of the messages that were being handled when the
        previous run died (stored as ``processing``). One of them may be what
        killed it, so they run one at a time and a crash is charged to the
        message that caused it, not to every message in flight beside it.
        """
        self._suspects = set(suspects)
        for message in unfinished:
            self._dedup.is_duplicate(message.id)  # remember it as seen
            self._enqueue(message, force=True)
        self._outbox.submit(replies)
        if unfinished or replies:
            logger.info("replayed {} messages and {} replies", len(unfinished), len(replies))

    def redrive(self, messages: Sequence[Message]) -> None:
        """Queue messages an operator put back (``chatq retry``; rows already ``queued``).

        While draining they stay queued in the store, for the next start.
        """
        if self._draining:
            return
        for message in messages:
            self._dedup.is_duplicate(message.id)  # a resend of it by its chat is a duplicate
            self._enqueue(message, force=True)
        if messages:
            logger.info("requeued {} failed or rejected messages", len(messages))

    def _admit(self, messages: Sequence[Message]) -> tuple[list[Message], list[Message], set[str]]:
        """Split into messages the chats have room for and ones they don't.

        A chat may hold one message in flight plus ``max_queue_size`` pending;
        slots of messages still being stored are reserved so concurrent
        requests cannot overfill a chat. Also the ids of the admitted ones
        that will run as soon as they are stored (nothing before them in
        their chat): their first attempt is counted in the same write.
        """
        admitted: list[Message] = []
        refused: list[Message] = []
        ready: set[str] = set()
        room = self._tenant.max_queue_size + 1
        starting = not (self._draining or self._halted)
        for message in messages:
            chat = message.chat_id
            taken = (
                self.queue.is_busy(chat)
                + self.queue.get_queue_size(chat)
                + self._reserved.get(chat, 0)
            )
            if taken < room:
                self._reserved[chat] = self._reserved.get(chat, 0) + 1
                admitted.append(message)
                if not taken and starting:
                    ready.add(message.id)
            else:
                refused.append(message)
        return admitted, refused, ready

    def _release(self, admitted: Sequence[Message]) -> None:
        for message in admitted:
            left = self._reserved[message.chat_id] - 1
            if left:
                self._reserved[message.chat_id] = left
            else:
                del self._reserved[message.chat_id]

    async def _store_new(
        self, messages: Sequence[Message], status: str, *, begun: Collection[str] = ()
    ) -> list[Message]:
        """Insert rows; the newly stored ones (not already known) come back."""
        if not messages:
            return []
        try:
            if begun:
                new = await self._store_begun(messages, begun)
            else:
                new = await self._store.add_messages(messages, status)
        except BaseException:
            self._forget(messages)  # not stored: a retry must not look like a duplicate
            raise
        return [m for m, is_new in zip(messages, new, strict=True) if is_new]

    async def _store_begun(self, messages: Sequence[Message], begun: Collection[str]) -> list[bool]:
        """`add_messages` with attempts begun; if we stop waiting, they are given back.

        (The write goes on without us: its rows would stay `processing`,
        suspects at the next start, for attempts that never ran.)
        """
        write = asyncio.ensure_future(self._store.add_messages(messages, "queued", begun=begun))
        try:
            return await asyncio.shield(write)
        except asyncio.CancelledError:
            write.add_done_callback(partial(self._give_back_written, messages, begun))
            raise

    def _give_back_written(
        self, messages: Sequence[Message], begun: Collection[str], write: asyncio.Future[list[bool]]
    ) -> None:
        if write.cancelled() or write.exception() is not None:
            return  # nothing stored
        stored = zip(messages, write.result(), strict=True)
        ids = [m.id for m, new in stored if new and m.id in begun]
        for message_id in ids:
            self._begun.pop(message_id, None)
        if ids:
            task = asyncio.ensure_future(self._release_all(ids))
            task.add_done_callback(self._tasks.discard)
            self._tasks.add(task)

    async def _give_back(self) -> None:
        """Give back the attempts counted for messages that will not run in this run."""
        ids = list(self._begun)
        self._begun.clear()
        await self._release_all(ids)

    async def _release_all(self, ids: Sequence[str]) -> None:
        """`release` each (queued together: one commit); a failure leaves suspects."""
        outcomes = await asyncio.gather(
            *(self._store.release(mid, "queued") for mid in ids), return_exceptions=True
        )
        failed = [o for o in outcomes if isinstance(o, BaseException)]
        if failed:
            logger.warning(
                "could not give back {} attempts that never ran: {}", len(failed), failed[0]
            )

    def _forget(self, messages: Sequence[Message]) -> None:
        for message in messages:
            self._dedup.forget(message.id)

    async def _tell_to_wait(self, message: Message) -> None:
        """One wait reply per chat per overload episode, not one per message."""
        if message.chat_id in self._overloaded:
            return
        self._overloaded.add(message.chat_id)
        logger.warning("chat {} is full (QUEUE_FULL); sent the wait text", message.chat_id)
        reply = await self._store.add_reply(message.id, message.chat_id, self._tenant.wait_text)
        self._outbox.submit([reply])

    def _enqueue(self, message: Message, *, force: bool = False) -> None:
        try:
            fut = self.queue.enqueue(message.chat_id, partial(self._process, message), force=force)
        except QueueFullError:  # cannot happen with reservations; never drop silently
            logger.error("chat {} unexpectedly full; {} stays queued", message.chat_id, message.id)
            return
        fut.add_done_callback(self._after)

    def _after(self, fut: asyncio.Future[Any]) -> None:
        if fut.cancelled():
            return
        exc = fut.exception()
        if exc is None or isinstance(exc, QueueClearedError):
            return  # cleared at drain: the row stays queued for the next start
        logger.opt(exception=exc).error("processing stopped by a store failure")
        if self._on_fatal is not None:
            self._on_fatal(exc)

    # -- processing ---------------------------------------------------------

    def _process(self, message: Message) -> Awaitable[Any]:
        """Handle one message; what the chat waits on before its next one.

        The common case is run here, without a coroutine: the attempt is
        counted already, the handler finishes without suspending, and the
        chat waits on the completion's write (shared with the messages
        completed beside it). Anything else goes on in `_process_slowly`.
        """
        attempts = self._begun.pop(message.id, None)
        if attempts is None or self._halted or attempts > self._tenant.max_attempts:
            return self._process_slowly(message, attempts)
        with bind_message(message.chat_id, message.id):
            try:
                tried: _Tried = self._start_handler(message, attempts)
            except BaseException as exc:  # the handler's failure: handled as ever, slowly
                tried = exc
            if type(tried) is not list or not all(storable(text) for text in tried):
                return self._process_slowly(message, attempts, tried)
            return self._complete_soon(message, tried)

    def _complete_soon(self, message: Message, replies: list[str]) -> asyncio.Future[Progress]:
        """Queue the completion, beginning the chat's next message in the same write."""
        after = self._next_of(message.chat_id)
        done = self._store.complete_soon(message.id, replies, begin_next=after)
        if done is not self._completing:
            self._completing, self._completed = done, []
            done.add_done_callback(partial(self._done, self._completed))
        self._completed.append((message, after))
        return done

    def _next_of(self, chat_id: str) -> str | None:
        """The chat's next message, if its attempt may be counted now (see module doc)."""
        if self._draining or self._halted:
            return None
        execute = self.queue.peek(chat_id)
        if type(execute) is not partial:
            return None
        message: Message = execute.args[0]
        if message.id in self._suspects or message.id in self._begun:
            return None  # a suspect begins under probation; the other is begun already
        return message.id

    def _done(
        self, entries: list[tuple[Message, str | None]], done: asyncio.Future[Progress]
    ) -> None:
        """Completions committed: hand over their replies, note the attempts begun.

        Runs before the chats waiting on `done` go on (first callback).
        """
        if done.cancelled():
            return
        if done.exception() is not None:
            self._halted = True  # the chats fail with it: the worker stops and replays
            return
        progress = done.result()
        for message, after in entries:
            try:
                replies = progress.replies_of(message.id)
                if after is not None:
                    self._begun[after] = progress.attempts_of(after)
            except StoreError:
                self._halted = True  # the chat fails with it (see `_settled`)
                continue
            self.stats.processed += 1
            self._outbox.submit(replies)
            chat = message.chat_id
            if chat in self._overloaded and not self.queue.get_queue_size(chat):
                self._overloaded.discard(chat)

    async def _process_slowly(
        self, message: Message, attempts: int | None, tried: _Tried | None = None
    ) -> None:
        if self._halted:
            return  # an earlier store write failed: the row replays after it, in order
        with bind_message(message.chat_id, message.id):
            try:
                if message.id in self._suspects:
                    try:
                        async with self._probation:
                            await self._attempts(message, attempts, tried)
                    finally:
                        self._suspects.discard(message.id)
                else:
                    await self._attempts(message, attempts, tried)
            except StoreError:
                # The chat's next message must not run ahead of this one: stop
                # processing altogether (the worker stops and replays).
                self._halted = True
                raise
        chat = message.chat_id
        if chat in self._overloaded and not self.queue.get_queue_size(chat):
            self._overloaded.discard(chat)  # caught up: the episode is over

    async def _put_back(self, message: Message) -> None:
        """A drain cut this run's attempt short: it is not counted against the message.

        A suspect stays one (``processing``, its crash attempt counted).
        (A handler's own CancelledError is a failed attempt, see
        `_run_handler`: only a cancellation of the task itself gets here.)
        """
        status = "processing" if message.id in self._suspects else "queued"
        try:
            await self._store.release(message.id, status)
        except StoreError as exc:  # it stays `processing`: a suspect at the next start
            logger.warning("could not put the interrupted message back: {}", exc)

    async def _attempts(self, message: Message, attempts: int | None, tried: _Tried | None) -> None:
        try:
            await self._attempt_until_done(message, attempts, tried)
        except asyncio.CancelledError:
            # Whatever we were awaiting, our begin_attempt was queued before it
            # and commits first; the release only touches a row still
            # `processing` (not one completed, failed or queued for a retry).
            await self._put_back(message)
            raise

    async def _attempt_until_done(
        self, message: Message, counted: int | None = None, tried: _Tried | None = None
    ) -> None:
        """Attempts until done; the first may be counted (and started: `tried`) already."""
        limit = self._tenant.max_attempts
        while not self._halted:  # e.g. while a suspect waited, or between retries
            if counted is None:
                attempts = await self._store.begin_attempt(message.id)
            else:
                attempts, counted = counted, None
            if attempts > limit:
                # This check is no attempt: history shows the `limit` that ran.
                await self._store.release(message.id, "queued")
                await self._give_up(
                    message, f"quarantined: {limit} attempts never finished (worker died or hung)"
                )
                return
            try:
                replies = await self._run_handler(message, attempts, tried)
            except (PermanentHandlerError, HandlerTimeoutError) as exc:
                await self._give_up(message, str(exc))
                return
            except Exception as exc:
                if attempts >= limit:
                    await self._give_up(message, f"{exc!r} (after {attempts} attempts)")
                    return
                logger.warning("handler failed (attempt {}/{}): {!r}", attempts, limit, exc)
                await self._store.fail(message.id, repr(exc), final=False)
                await self._sleep(self._retry_delay(attempts, exc))
                tried = None
                continue
            # A drain's cancellation cannot lose this write: the store queues it
            # before the first suspension and commits it even if we stop waiting
            # (its replies then go out from the store on the next start).
            progress = await self._complete_soon(message, replies)  # `_done` sends the replies
            progress.replies_of(message.id)  # its own failure, if it had one
            return

    def _retry_delay(self, attempts: int, exc: Exception) -> float:
        """The handler's backoff, or what its server's Retry-After asked for."""
        if isinstance(exc, ChatqError) and exc.retry_after is not None:
            return exc.retry_after
        return handler_backoff(attempts, self._tenant.retry_backoff)

    async def _run_handler(
        self, message: Message, attempt: int, tried: _Tried | None = None
    ) -> list[str]:
        try:
            replies = await self._call_handler(message, attempt, tried)
        except asyncio.CancelledError:
            task = asyncio.current_task()
            if task is not None and task.cancelling():
                raise  # a drain cancelling us: the row stays for the next start
            # The handler's own (e.g. a cancelled call inside it): a failed
            # attempt like any other, not a row left `processing` until restart.
            raise HandlerError("handler raised CancelledError") from None
        for index, text in enumerate(replies):
            if not storable(text):  # it would fail the store write, not just this message
                raise PermanentHandlerError(
                    f"reply {index} is not valid Unicode (a lone UTF-16 surrogate)"
                )
        return replies

    def _start_handler(self, message: Message, attempt: int) -> list[str] | _Suspended:
        """Run the handler up to its first suspension: its replies, or where it suspended.

        Stepped by hand: a handler that finishes without suspending (echo,
        most module handlers) needs no deadline timer, and arming and
        cancelling one cost more than such a handler.
        """
        started = asyncio.get_running_loop().time()
        work = self._handler.handle(
            message, HandlerContext(tenant_id=self._tenant.id, attempt=attempt)
        )
        try:
            yielded = work.send(None)
        except StopIteration as done:
            return done.value  # type: ignore[no-any-return]
        return _Suspended(work, yielded, started)

    async def _call_handler(
        self, message: Message, attempt: int, tried: _Tried | None = None
    ) -> list[str]:
        if tried is None:
            tried = self._start_handler(message, attempt)
        if isinstance(tried, BaseException):
            raise tried
        if not isinstance(tried, _Suspended):
            return tried
        deadline = asyncio.timeout_at(tried.started + self._tenant.handler_timeout)
        try:
            async with deadline:
                return await resume(tried.work, tried.yielded)
        except TimeoutError:
            if deadline.expired():
                raise HandlerTimeoutError(
                    f"handler ran past handler_timeout ({self._tenant.handler_timeout:g}s)"
                ) from None
            raise

    async def _give_up(self, message: Message, error: str) -> None:
        logger.error("message failed for good: {}", error)
        await self._store.fail(message.id, error, final=True)
        self.stats.failed += 1

    # -- shutdown -----------------------------------------------------------

    async def drain(self, grace: float) -> bool:
        """Finish in-flight messages within ``grace`` s; pending ones stay queued.

        Returns False when in-flight handlers had to be cancelled.
        """
        self._draining = True
        self.queue.clear_all()
        try:
            async with asyncio.timeout(grace):
                await self.queue.wait_idle()
        except TimeoutError:
            logger.warning("drain timeout ({}s): cancelling in-flight handlers", grace)
            self.queue.cancel_all()
            await self.queue.wait_idle()
            await self._give_back()
            return False
        await self._give_back()
        return True
