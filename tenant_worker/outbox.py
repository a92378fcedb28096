"""The outbox: delivers stored replies, in order per chat, through the rate limiters.

Replies are stored (status ``pending``) before they reach the outbox, so a
crash loses none: the next start resubmits every pending reply. Delivery is
at-least-once towards the transport: a reply sent just before a crash, but
not yet marked sent, is sent again.

Replies ride a `ChatQueueManager` of their own: in order per chat, chats in
parallel, state only for chats with replies waiting, and a send that does
not suspend (rate limit free, a local transport) costs no task. Marking a
reply sent is not waited for, for the same reason; if that write fails the
worker stops (``on_fatal``) and the next start sends what is unconfirmed.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import replace
from functools import partial
from typing import Protocol

from loguru import logger

from chatq.shared.errors import PermanentTransportError, StoreError
from chatq.tenant_worker.chat_queue import ChatQueueManager
from chatq.tenant_worker.messages import Reply
from chatq.tenant_worker.rate_limiter import RateLimiter
from chatq.tenant_worker.stats import WorkerStats
from chatq.tenant_worker.transports import Transport

REPLY_MAX_ATTEMPTS = 8
REPLY_BACKOFF_MAX = 300.0
_TENANT_KEY = "*"


class ReplyStore(Protocol):
    """The part of the store the outbox writes to."""

    def mark_sent_soon(self, reply_id: int, provider_id: str) -> asyncio.Future[None]: ...
    async def retry_reply(self, reply_id: int, error: str, next_attempt_at: float) -> None: ...
    async def fail_reply(self, reply_id: int, error: str) -> None: ...


def reply_backoff(attempts: int, base: float) -> float:
    """Seconds before retry number ``attempts`` (1-based) of a reply."""
    return float(min(base * 2 ** (attempts - 1), REPLY_BACKOFF_MAX))


class Outbox:
    """Sends replies per chat in order, at most the configured rates."""

    def __init__(
        self,
        store: ReplyStore,
        transport: Transport,
        stats: WorkerStats,
        *,
        per_chat_per_minute: int,
        tenant_per_minute: int | None = None,
        retry_backoff: float = 1.0,
        clock: Callable[[], float] = time.time,
        monotonic: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
        on_fatal: Callable[[BaseException], None] | None = None,
    ) -> None:
        self._store = store
        self._transport = transport
        self._stats = stats
        self._per_chat = RateLimiter(per_chat_per_minute, monotonic, sleep)
        self._per_tenant = (
            RateLimiter(tenant_per_minute, monotonic, sleep) if tenant_per_minute else None
        )
        self._retry_backoff = retry_backoff
        self._clock = clock
        self._sleep = sleep
        self._on_fatal = on_fatal
        self._lines = ChatQueueManager("outbox", max_queue_size=1)  # submit never refuses
        self._halted = False  # a store write failed: send nothing more (see _deliver)

    def submit(self, replies: Iterable[Reply]) -> None:
        """Queue stored replies for delivery (from the running loop)."""
        for reply in replies:
            done = self._lines.enqueue(reply.chat_id, partial(self._deliver, reply), force=True)
            done.add_done_callback(self._check)

    def pending(self) -> int:
        """Replies not yet delivered or given up on."""
        return self._lines.get_total_queued() + self._lines.in_flight()

    async def wait_empty(self, grace: float) -> bool:
        """Wait up to ``grace`` s for every queued reply to be handled."""
        try:
            async with asyncio.timeout(grace):
                await self._lines.wait_idle()
        except TimeoutError:
            return False
        return True

    async def aclose(self) -> None:
        """Stop sending; undelivered replies stay pending in the store."""
        self._lines.cancel_all()
        await self._lines.wait_idle()

    def _check(self, done: asyncio.Future[None]) -> None:
        # Only a store write gets here (transport errors are retried): the
        # worker restarts and sends the unconfirmed replies, in order, again.
        if not done.cancelled() and (exc := done.exception()) is not None:
            self._halted = True
            logger.opt(exception=exc).error("outbox: a store write failed; replies stay pending")
            if self._on_fatal is not None:
                self._on_fatal(exc)

    async def _deliver(self, reply: Reply) -> None:
        """Send one reply unless halted; a failed store write halts the outbox.

        Halted, nothing more is sent: a chat's next reply must not go out
        before one whose retry or failure could not be recorded. They all
        stay pending and go out, in order, after the restart.
        """
        if self._halted:
            return
        try:
            await self._send(reply)
        except StoreError:
            self._halted = True
            raise

    async def _send(self, reply: Reply) -> None:
        """Send one reply, retrying transient failures; record the outcome."""
        while True:
            delay = reply.next_attempt_at - self._clock()
            if delay > 0:
                await self._sleep(delay)
            await self._acquire(reply.chat_id)
            try:
                provider_id = await self._transport.send(reply.chat_id, reply.text)
            except PermanentTransportError as exc:
                await self._give_up(reply, str(exc))
                return
            except Exception as exc:  # retryable, or a transport bug: retry both
                attempts = reply.attempts + 1
                if attempts >= REPLY_MAX_ATTEMPTS:  # fail_reply counts this last attempt
                    await self._give_up(reply, f"{exc} (after {attempts} attempts)")
                    return
                reply = await self._reschedule(reply, exc)
                continue
            self._store.mark_sent_soon(reply.id, provider_id).add_done_callback(self._check)
            self._stats.sent += 1
            return

    async def _acquire(self, chat_id: str) -> None:
        for limiter, key in ((self._per_chat, chat_id), (self._per_tenant, _TENANT_KEY)):
            if limiter is not None and not limiter.try_acquire(key):
                self._stats.rate_limited += 1
                await limiter.acquire(key)

    async def _reschedule(self, reply: Reply, exc: Exception) -> Reply:
        attempts = reply.attempts + 1
        next_at = self._clock() + reply_backoff(attempts, self._retry_backoff)
        logger.warning(
            "reply {} to chat {} failed ({}); retry #{}", reply.id, reply.chat_id, exc, attempts
        )
        await self._store.retry_reply(reply.id, str(exc), next_at)
        return replace(reply, attempts=attempts, next_attempt_at=next_at)

    async def _give_up(self, reply: Reply, error: str) -> None:
        logger.error("reply {} to chat {} failed for good: {}", reply.id, reply.chat_id, error)
        await self._store.fail_reply(reply.id, error)
        self._stats.send_failed += 1
