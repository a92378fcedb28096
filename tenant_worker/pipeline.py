"""One tenant's message pipeline: dedup -> store -> per-chat queue -> handler -> replies.

    accept(messages)          dedup in memory, then by the store's unique id
      -> store (committed)    queued, or rejected when the chat is full
      -> ChatQueueManager     strict FIFO per chat
      -> handler              attempts counted durably before each try
      -> store.complete       processed + replies, one transaction
      -> outbox               rate-limited delivery

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
from collections.abc import Awaitable, Callable, Collection, Sequence
from dataclasses import dataclass
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

HANDLER_BACKOFF_MAX = 60.0


class MessageStore(Protocol):
    """The part of the store the pipeline uses."""

    async def add_messages(self, messages: Sequence[Message], status: str = ...) -> list[bool]: ...
    async def begin_attempt(self, message_id: str) -> int: ...
    async def complete(self, message_id: str, replies: Sequence[str]) -> list[Reply]: ...
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
        admitted, refused = self._admit(fresh)
        written: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        for message in fresh:
            self._storing[message.id] = written
        try:
            stored = await self._store_new(admitted, "queued")
        except BaseException:
            self._forget(refused)  # never offered to the store: a retry is not a duplicate
            self._end_write(fresh, written, ok=False)
            raise
        finally:
            self._release(admitted)
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

    def _admit(self, messages: Sequence[Message]) -> tuple[list[Message], list[Message]]:
        """Split into messages the chats have room for and ones they don't.

        A chat may hold one message in flight plus ``max_queue_size`` pending;
        slots of messages still being stored are reserved so concurrent
        requests cannot overfill a chat.
        """
        admitted: list[Message] = []
        refused: list[Message] = []
        room = self._tenant.max_queue_size + 1
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
            else:
                refused.append(message)
        return admitted, refused

    def _release(self, admitted: Sequence[Message]) -> None:
        for message in admitted:
            left = self._reserved[message.chat_id] - 1
            if left:
                self._reserved[message.chat_id] = left
            else:
                del self._reserved[message.chat_id]

    async def _store_new(self, messages: Sequence[Message], status: str) -> list[Message]:
        """Insert rows; the newly stored ones (not already known) come back."""
        if not messages:
            return []
        try:
            new = await self._store.add_messages(messages, status)
        except BaseException:
            self._forget(messages)  # not stored: a retry must not look like a duplicate
            raise
        return [m for m, is_new in zip(messages, new, strict=True) if is_new]

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
            fut = self.queue.enqueue(message.chat_id, lambda: self._process(message), force=force)
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

    async def _process(self, message: Message) -> None:
        if self._halted:
            return  # an earlier store write failed: the row replays after it, in order
        with bind_message(message.chat_id, message.id):
            try:
                if message.id in self._suspects:
                    try:
                        async with self._probation:
                            await self._attempts(message)
                    finally:
                        self._suspects.discard(message.id)
                else:
                    await self._attempts(message)
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

    async def _attempts(self, message: Message) -> None:
        try:
            await self._attempt_until_done(message)
        except asyncio.CancelledError:
            # Whatever we were awaiting, our begin_attempt was queued before it
            # and commits first; the release only touches a row still
            # `processing` (not one completed, failed or queued for a retry).
            await self._put_back(message)
            raise

    async def _attempt_until_done(self, message: Message) -> None:
        limit = self._tenant.max_attempts
        while not self._halted:  # e.g. while a suspect waited, or between retries
            attempts = await self._store.begin_attempt(message.id)
            if attempts > limit:
                # This check is no attempt: history shows the `limit` that ran.
                await self._store.release(message.id, "queued")
                await self._give_up(
                    message, f"quarantined: {limit} attempts never finished (worker died or hung)"
                )
                return
            try:
                replies = await self._run_handler(message, attempts)
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
                continue
            # A drain's cancellation cannot lose this write: the store queues it
            # before the first suspension and commits it even if we stop waiting
            # (its replies then go out from the store on the next start).
            stored = await self._store.complete(message.id, replies)
            self.stats.processed += 1
            self._outbox.submit(stored)
            return

    def _retry_delay(self, attempts: int, exc: Exception) -> float:
        """The handler's backoff, or what its server's Retry-After asked for."""
        if isinstance(exc, ChatqError) and exc.retry_after is not None:
            return exc.retry_after
        return handler_backoff(attempts, self._tenant.retry_backoff)

    async def _run_handler(self, message: Message, attempt: int) -> list[str]:
        try:
            replies = await self._call_handler(message, attempt)
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

    async def _call_handler(self, message: Message, attempt: int) -> list[str]:
        started = asyncio.get_running_loop().time()
        work = self._handler.handle(
            message, HandlerContext(tenant_id=self._tenant.id, attempt=attempt)
        )
        # Step it by hand first: a handler that finishes without suspending
        # (echo, most module handlers) needs no deadline timer, and arming
        # and cancelling one cost more than such a handler.
        try:
            yielded = work.send(None)
        except StopIteration as done:
            return done.value  # type: ignore[no-any-return]
        deadline = asyncio.timeout_at(started + self._tenant.handler_timeout)
        try:
            async with deadline:
                return await resume(work, yielded)
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
            return False
        return True
