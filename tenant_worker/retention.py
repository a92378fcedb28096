"""Retention: a tenant's old, finished messages are deleted, and its store file shrinks.

Messages that are processed, failed or rejected, received more than
``retention_days`` ago (default 30; 0 keeps everything), go with their
replies -- never one with a reply still pending. The worker runs a pass at
start and then every `PASS_EVERY` seconds, in batches of `BATCH` messages:
each batch joins the store's group commit like any write (no transaction or
fsync of its own), so ingest's commits take turns with it instead of waiting
behind one long delete, and it gives the pages it freed back to the file
system in the same transaction (incremental vacuum: the store's
``auto_vacuum`` is INCREMENTAL), so the file shrinks.
bench/retention_bench.py measures what a large prune costs ingest.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Protocol

from loguru import logger

__all__ = ["BATCH", "PASS_EVERY", "Retention"]

BATCH = 50  # messages per prune: about a millisecond of the writer's time
# Seconds between prunes: ~450 messages/s. What ingest feels is the WAL the
# deletes write (each deleted message touches pages of every index), so the
# rate is kept low: 1M old messages take ~40 minutes, a day's worth a few seconds.
PAUSE = 0.1
PASS_EVERY = 3600.0
DAY = 86_400.0


class PrunableStore(Protocol):
    async def prune(self, cutoff: float, limit: int) -> int: ...
    async def oldest_received_at(self) -> float | None: ...


class Retention:
    """Prunes one store; `oldest_at` is what the last pass left (for `chatq status`)."""

    def __init__(
        self,
        store: PrunableStore,
        days: int,
        *,
        batch: int = BATCH,
        pause: float = PAUSE,
        every: float = PASS_EVERY,
        clock: Callable[[], float] = time.time,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        self._store = store
        self._days = days
        self._batch = batch
        self._pause = pause
        self._every = every
        self._clock = clock
        self._sleep = sleep
        self.oldest_at: float | None = None

    async def run(self) -> None:
        """Pass after pass until cancelled (a failed pass is logged; the next one retries)."""
        while True:
            try:
                await self.prune_once()
            except Exception:  # a store error: the worker's own writes will say so too
                logger.exception("retention: pruning failed; trying again at the next pass")
            await self._sleep(self._every)

    async def prune_batch(self) -> int:
        """Delete one batch of what is due; how many messages went."""
        return await self._store.prune(self._cutoff(), self._batch)

    async def prune_once(self) -> int:
        """Delete what is due, batch by batch; returns how many messages went.

        A store whose oldest message is younger than the cutoff is left
        alone: a read instead of a write transaction (every worker's start).
        """
        total = 0
        oldest = await self._store.oldest_received_at()
        if self._days and oldest is not None and oldest < self._cutoff():
            while True:
                gone = await self.prune_batch()
                total += gone
                if gone < self._batch:
                    break
                await self._sleep(self._pause)
            oldest = await self._store.oldest_received_at()
        if total:
            logger.info("retention: deleted {} messages older than {} days", total, self._days)
        self.oldest_at = oldest
        return total

    def _cutoff(self) -> float:
        return self._clock() - self._days * DAY
