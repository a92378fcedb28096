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

What a transport error does (the `whatsapp` transport sorts Meta's codes
into these classes):

    RetryableTransportError  retry after reply_backoff (with jitter), or after what
                             the server's Retry-After asked for; fail after
                             `max_attempts` (REPLY_MAX_ATTEMPTS; the webhook
                             transport's own webhook_max_attempts and
                             webhook_retry_backoff, see tenant_worker/worker.py)
    TransientTransportError  the same, without the attempt limit: it is known to pass
                             (the backoff is capped at REPLY_BACKOFF_MAX)
    PairRateLimitError       transient, but the wait is 4^n s (jitter only adds to it),
                             n = that chat's consecutive pair-rate refusals: only that
                             chat waits
    PermanentTransportError  the reply fails for good, with the error in last_error
    SendingPausedError       the outbox pauses: nothing more is sent, replies stay
                             pending in the store until the worker starts again

Long replies: the transport's `split` gives the messages a reply goes out
as; each passes the rate limiters on its own. The reply is marked sent, with
the provider id of its LAST part, once every part is out. A retry in the same
run resumes at the part that failed; after a restart (or a pause) the reply
is sent again from its first part: at-least-once, a user may see a part twice.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, replace
from functools import partial
from typing import Protocol

from loguru import logger

from chatq.shared.errors import (
    ChatqError,
    PairRateLimitError,
    PermanentTransportError,
    SendingPausedError,
    StoreError,
    TransientTransportError,
)
from chatq.tenant_worker.chat_queue import ChatQueueManager
from chatq.tenant_worker.messages import Reply
from chatq.tenant_worker.rate_limiter import RateLimiter, ThroughputLimiter
from chatq.tenant_worker.stats import WorkerStats
from chatq.tenant_worker.transports import Transport

REPLY_MAX_ATTEMPTS = 8
REPLY_BACKOFF_MAX = 300.0
PAUSE_REASON_MAX = 300  # characters of the provider's reason kept for chatq status
PAIR_RATE_BACKOFF_MAX = 4.0**6  # 68 min: past that the chat is not coming back soon
_TENANT_KEY = "*"


class ReplyStore(Protocol):
    """The part of the store the outbox writes to."""

    def mark_sent_soon(self, reply_id: int, provider_id: str) -> asyncio.Future[None]: ...
    async def retry_reply(self, reply_id: int, error: str, next_attempt_at: float) -> None: ...
    async def fail_reply(self, reply_id: int, error: str) -> None: ...


def reply_backoff(attempts: int, base: float) -> float:
    """Seconds before retry number ``attempts`` (1-based) of a reply."""
    return float(min(base * 2 ** (attempts - 1), REPLY_BACKOFF_MAX))


def pair_rate_backoff(strikes: int) -> float:
    """Seconds a chat waits after its ``strikes``-th pair-rate refusal in a row: 4^n."""
    return float(min(4.0**strikes, PAIR_RATE_BACKOFF_MAX))


def pair_rate_wait(strikes: int, jitter: Callable[[float], float]) -> float:
    """`pair_rate_backoff`, jittered upwards only: a retry sooner than 4^n s is refused again."""
    wait = pair_rate_backoff(strikes)
    return wait + abs(jitter(wait) - wait)


def jittered(delay: float) -> float:
    """`delay` spread over [0.8, 1.2] of itself, so retries do not come back in step."""
    return delay * (0.8 + 0.4 * random.random())


@dataclass(frozen=True, slots=True)
class Pause:
    """Why and since when (wall-clock seconds) the outbox sends nothing."""

    reason: str
    since: float


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
        number_per_second: int | None = None,
        retry_backoff: float = 1.0,
        max_attempts: int = REPLY_MAX_ATTEMPTS,
        jitter: Callable[[float], float] = jittered,
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
        self._per_number = (
            ThroughputLimiter(number_per_second, monotonic, sleep) if number_per_second else None
        )
        self._retry_backoff = retry_backoff
        self._max_attempts = max_attempts
        self._jitter = jitter
        self._clock = clock
        self._sleep = sleep
        self._on_fatal = on_fatal
        self._lines = ChatQueueManager("outbox", max_queue_size=1)  # submit never refuses
        self._halted = False  # a store write failed: send nothing more (see _deliver)
        self.paused: Pause | None = None  # the provider refused all sending (see _pause)
        self._pair_strikes: dict[str, int] = {}  # chat -> consecutive pair-rate refusals
        self._unsent = 0  # submitted, neither sent nor failed for good (paused ones too)
        self._marking: asyncio.Future[None] | None = None  # the last mark-sent write watched

    def submit(self, replies: Iterable[Reply]) -> None:
        """Queue stored replies for delivery (from the running loop)."""
        for reply in replies:
            self._unsent += 1
            done = self._lines.enqueue(reply.chat_id, partial(self._deliver, reply), force=True)
            done.add_done_callback(self._check)

    def pending(self) -> int:
        """Replies not yet delivered or given up on."""
        return self._lines.get_total_queued() + self._lines.in_flight()

    def unsent(self) -> int:
        """Replies submitted in this run and not yet sent or failed for good.

        Unlike `pending`, those held by a pause or a halt still count: they
        are pending in the store (the operator's "reply backlog").
        """
        return self._unsent

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
        if self._halted or self.paused is not None:
            return
        try:
            await self._send(reply)
        except StoreError:
            self._halted = True
            raise

    async def _send(self, reply: Reply) -> None:
        """Send one reply (all its parts), retrying transient failures; record the outcome."""
        parts = self._transport.split(reply.text)
        sent: list[str] = []  # provider ids of the parts out in this run
        while True:
            delay = reply.next_attempt_at - self._clock()
            if delay > 0:
                await self._sleep(delay)
            try:
                await self._send_parts(reply.chat_id, parts, sent)
            except SendingPausedError as exc:
                self._pause(exc)
                return
            except PermanentTransportError as exc:
                await self._give_up(reply, _part_error(exc, len(sent), len(parts)))
                return
            except Exception as exc:  # retryable, or a transport bug: retry both
                error = _part_error(exc, len(sent), len(parts))
                attempts = reply.attempts + 1
                bounded = not isinstance(exc, TransientTransportError)
                if bounded and attempts >= self._max_attempts:  # fail_reply counts this one
                    await self._give_up(reply, f"{error} (after {attempts} attempts)")
                    return
                reply = await self._reschedule(reply, error, self._retry_delay(reply, exc))
                continue
            if len(sent) < len(parts):  # paused meanwhile: the reply stays pending
                return
            self._pair_strikes.pop(reply.chat_id, None)
            marked = self._store.mark_sent_soon(reply.id, sent[-1])
            if marked is not self._marking:  # shared by the marks gathered into one write
                self._marking = marked
                marked.add_done_callback(self._check)
            self._stats.sent += 1
            self._unsent -= 1
            return

    async def _send_parts(self, chat_id: str, parts: list[str], sent: list[str]) -> None:
        """Send the parts not sent yet, each through the limiters; stop if paused."""
        for part in parts[len(sent) :]:
            await self._acquire(chat_id)
            if self.paused is not None:
                return
            sent.append(await self._transport.send(chat_id, part))

    def _retry_delay(self, reply: Reply, exc: Exception) -> float:
        if isinstance(exc, ChatqError) and exc.retry_after is not None:
            return exc.retry_after  # the server said when (Retry-After): no jitter needed
        if isinstance(exc, PairRateLimitError):
            strikes = self._pair_strikes.get(reply.chat_id, 0) + 1
            self._pair_strikes[reply.chat_id] = strikes
            return pair_rate_wait(strikes, self._jitter)
        return self._jitter(reply_backoff(reply.attempts + 1, self._retry_backoff))

    def _pause(self, exc: SendingPausedError) -> None:
        """The provider refuses the tenant's sending: hold every reply until a restart."""
        if self.paused is None:
            reason = str(exc)
            if len(reason) > PAUSE_REASON_MAX:  # it rides every heartbeat
                reason = reason[: PAUSE_REASON_MAX - 1] + "…"
            self.paused = Pause(reason=reason, since=self._clock())
            logger.error("sending paused until restart or reload: {}", exc)

    async def _acquire(self, chat_id: str) -> None:
        for limiter, key in (
            (self._per_chat, chat_id),
            (self._per_tenant, _TENANT_KEY),
            (self._per_number, _TENANT_KEY),
        ):
            if limiter is not None and not limiter.try_acquire(key):
                self._stats.rate_limited += 1
                await limiter.acquire(key)

    async def _reschedule(self, reply: Reply, error: str, delay: float) -> Reply:
        attempts = reply.attempts + 1
        next_at = self._clock() + delay
        logger.warning(
            "reply {} to chat {} failed ({}); retry #{} in {:.1f}s",
            reply.id,
            reply.chat_id,
            error,
            attempts,
            delay,
        )
        await self._store.retry_reply(reply.id, error, next_at)
        self._stats.retried += 1
        return replace(reply, attempts=attempts, next_attempt_at=next_at)

    async def _give_up(self, reply: Reply, error: str) -> None:
        logger.error("reply {} to chat {} failed for good: {}", reply.id, reply.chat_id, error)
        await self._store.fail_reply(reply.id, error)
        self._pair_strikes.pop(reply.chat_id, None)
        self._stats.send_failed += 1
        self._unsent -= 1


def _part_error(exc: BaseException, done: int, parts: int) -> str:
    """The error text, naming the part when the reply went out in several."""
    return f"part {done + 1} of {parts}: {exc}" if parts > 1 else str(exc)
