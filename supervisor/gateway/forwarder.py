"""Hands each tenant's part of a webhook to that tenant's worker, over its unix socket.

    await forwarder.forward("acme", part)    # returns once committed; ForwardError if not

``POST /whatsapp/updates`` on the worker's socket answers 200 only after its
commit, so a part that returned is durable. Concurrent webhooks for one
tenant are coalesced: while `MAX_IN_FLIGHT` posts to a tenant are under way
the next parts wait and then go together, as one post and one commit (the
worker's dedup makes a part that appears twice harmless). Every part's
caller gets the outcome of the post that carried it.

When a post comes back, the senders of its parts were just answered and
tend to send again at once: the next post waits for as many parts as the
last one carried plus those already waiting, at most as long as the last post
took and at most `LINGER`, so a steady load travels in fewer, larger posts
(each post costs the worker ~1.5 ms of CPU whatever it carries; a part waits
no longer than it would have for one more post). A part that finds that many
waiting, or comes after a quiet spell, goes at once: a lone webhook never
waits.

A worker that restarted drops its keep-alive connections: a post that fails
on such a connection is sent once more (re-sending is safe, it is deduped).
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import orjson
from loguru import logger

from chatq.shared import json_codec
from chatq.shared.errors import ForwardError
from chatq.shared.whatsapp.webhook import Routed
from chatq.supervisor.gateway.stats import GatewayStats
from chatq.supervisor.gateway.unix_http import BadAnswer, Dropped, UnixHTTP, Unreachable

__all__ = ["MAX_BATCH_ITEMS", "MAX_IN_FLIGHT", "Forwarder", "TenantLink"]

MAX_IN_FLIGHT = 1  # posts per tenant at once; the next parts gather meanwhile
MAX_BATCH_ITEMS = 2000  # messages + statuses per post (one part is never split)
LINGER = 0.002  # seconds a free link may wait at most for the parts of senders just answered
# (2 ms against 5 and 10: smaller posts, but a shorter round trip per tenant, so
# more webhooks/s at a fixed number of senders; BENCHMARKS.md, third-pass re-run)

_Waiting = tuple[Routed, "asyncio.Future[None]"]


class TenantLink:
    """One tenant's worker socket."""

    def __init__(
        self,
        tenant_id: str,
        socket: Path,
        timeout: float,
        stats: GatewayStats,
        *,
        linger: float = LINGER,
    ) -> None:
        self.tenant_id = tenant_id
        self._timeout = timeout
        self._stats = stats
        self._client = UnixHTTP(socket, timeout=timeout)
        self._waiting: list[_Waiting] = []
        self._sending = 0
        self._tasks: set[asyncio.Task[None]] = set()
        self._linger = linger
        self._expected = 0  # parts worth waiting for (see the module doc)
        self._until = 0.0  # loop time the wait for them ends
        self._timer: asyncio.TimerHandle | None = None
        self._loop: asyncio.AbstractEventLoop | None = None  # the running one, on first use

    def forward(self, part: Routed) -> asyncio.Future[None]:
        """Done once `part` is committed by the worker; ForwardError if it is not.

        A future, not a coroutine: one frame less on every webhook's way."""
        if self._loop is None:
            self._loop = asyncio.get_running_loop()
        done = self._loop.create_future()
        self._waiting.append((part, done))
        self._pump()
        return done

    async def aclose(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._linger_over()  # what waits goes now
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        await self._client.aclose()

    def _pump(self) -> None:
        while self._waiting and self._sending < MAX_IN_FLIGHT and not self._lingering():
            batch: list[_Waiting] = []
            size = 0
            while self._waiting and (
                not batch or size + _items(self._waiting[0][0]) <= MAX_BATCH_ITEMS
            ):
                batch.append(self._waiting.pop(0))
                size += _items(batch[-1][0])
            self._sending += 1
            task = asyncio.create_task(self._send(batch))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    def _lingering(self) -> bool:
        """Whether to wait (a timer set) for more parts before the next post."""
        loop = self._loop
        assert loop is not None
        if (
            len(self._waiting) >= self._expected
            or loop.time() >= self._until
            or sum(_items(part) for part, _ in self._waiting) >= MAX_BATCH_ITEMS
        ):
            if self._timer is not None:
                self._timer.cancel()
                self._timer = None
            return False
        if self._timer is None:
            self._timer = loop.call_at(self._until, self._linger_over)
        return True

    def _linger_over(self) -> None:
        self._timer = None
        self._expected = 0
        self._pump()

    async def _send(self, batch: list[_Waiting]) -> None:
        loop = asyncio.get_running_loop()
        started = loop.time()
        try:
            await self._deliver(batch)
        finally:
            self._sending -= 1
            self._expected = len(batch) + len(self._waiting)
            now = loop.time()
            self._until = now + min(self._linger, now - started)
            self._pump()

    async def _deliver(self, batch: list[_Waiting]) -> None:
        """Post the batch and settle every part's future with the outcome."""
        outcome: ForwardError | None = None
        try:
            status, answer = await self._post([part for part, _ in batch])
        except ForwardError as exc:
            outcome = exc
        except Exception as exc:  # a bug: never leave a webhook (and a drain) waiting for ever
            logger.opt(exception=exc).error("forwarding to tenant {} failed", self.tenant_id)
            outcome = ForwardError(f"tenant {self.tenant_id}: forwarding failed ({exc})")
        else:
            if status == 400 and len(batch) > 1:  # one bad part must not sink the others
                for item in batch:
                    await self._deliver([item])
                return
            if status == 200:
                self._count(batch, answer)
            else:
                outcome = _refusal(self.tenant_id, status, answer)
        for _, done in batch:
            if done.done():
                continue
            if outcome is None:
                done.set_result(None)
            else:
                done.set_exception(outcome)

    async def _post(self, parts: Sequence[Routed]) -> tuple[int, dict[str, Any]]:
        body = _body(parts)
        for attempt in (1, 2):
            try:
                status, raw = await self._client.post("/whatsapp/updates", body)
            except Unreachable as exc:
                raise ForwardError(f"tenant {self.tenant_id}: not running ({exc})") from None
            except Dropped as exc:  # e.g. a kept-alive connection to a worker since restarted
                if attempt == 2:
                    raise ForwardError(f"tenant {self.tenant_id}: {exc}") from None
                continue
            except TimeoutError:
                raise ForwardError(
                    f"tenant {self.tenant_id}: no answer within {self._timeout:g}s"
                ) from None
            except (OSError, BadAnswer) as exc:
                raise ForwardError(
                    f"tenant {self.tenant_id}: {type(exc).__name__}: {exc}"
                ) from None
            return status, _answer(raw)
        raise AssertionError("unreachable")

    def _count(self, batch: list[_Waiting], answer: dict[str, Any]) -> None:
        messages = sum(len(part.messages) for part, _ in batch)
        statuses = sum(len(part.statuses) for part, _ in batch)
        counts = {k: v for k, v in answer.items() if isinstance(v, int)}
        self._stats.committed(self.tenant_id, messages, statuses, counts)


class Forwarder:
    """A `TenantLink` per tenant, made on first use."""

    def __init__(self, sockets: dict[str, Path], timeout: float, stats: GatewayStats) -> None:
        self._links = {
            tenant_id: TenantLink(tenant_id, socket, timeout, stats)
            for tenant_id, socket in sockets.items()
        }

    def forward(self, tenant_id: str, part: Routed) -> asyncio.Future[None]:
        """See `TenantLink.forward`."""
        return self._links[tenant_id].forward(part)

    async def aclose(self) -> None:
        await asyncio.gather(*(link.aclose() for link in self._links.values()))


def _items(part: Routed) -> int:
    return len(part.messages) + len(part.statuses)


def _body(parts: Sequence[Routed]) -> bytes:
    body = {
        "messages": [m for part in parts for m in part.messages],
        "statuses": [s.as_json() for part in parts for s in part.statuses],
    }
    return json_codec.dumps(body)  # a lone surrogate or a huge int in a payload: json's


def _answer(raw: bytes) -> dict[str, Any]:
    try:
        answer = orjson.loads(raw)
    except ValueError:
        return {}
    return answer if isinstance(answer, dict) else {}


def _refusal(tenant_id: str, status: int, answer: dict[str, Any]) -> ForwardError:
    error = str(answer.get("error") or f"HTTP {status}")[:300]
    return ForwardError(f"tenant {tenant_id}: {status} {error}")
