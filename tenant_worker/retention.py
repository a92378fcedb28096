"""Retention: a tenant's old, finished messages are deleted, and its store file shrinks.

Messages that are processed, failed or rejected, received more than
``retention_days`` ago (default 30; 0 keeps everything), go with their
replies -- never one with a reply still pending. The worker runs a pass at
start and then every `PASS_EVERY` seconds, batch by batch: each batch joins
the store's group commit like any write (no transaction or fsync of its
own), and gives the pages it freed back to the file system in the same
transaction (incremental vacuum: the store's ``auto_vacuum`` is
INCREMENTAL), so the file shrinks.

What ingest feels is the WAL a batch writes: ids are random, so each deleted
message and reply touches a page of every index (2-3 WAL pages a message),
and the commit that carries them fsyncs them. So the pace follows the load,
the way PostgreSQL's autovacuum throttles itself: while the store commits
other writes, small batches far apart (`BUSY`: a commit grows by ~25 pages,
and ~1 in 100 of ingest's commits carries one); on a quiet store, large ones
close together (`QUIET`). bench/retention_bench.py measures what a large
prune costs ingest.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Protocol

from loguru import logger

__all__ = ["BUSY", "PASS_EVERY", "QUIET", "Pace", "Retention"]


@dataclass(frozen=True, slots=True)
class Pace:
    """Messages per batch, and seconds of pause after a full one."""

    batch: int
    pause: float


# ~450 messages/s: a million old messages in ~40 minutes, a day's worth in seconds.
QUIET = Pace(50, 0.1)
# ~50 messages/s, ~4M a day: more than any tenant receives, so a busy store
# still catches up, and its backlog goes at night.
BUSY = Pace(10, 0.2)
PASS_EVERY = 3600.0
DAY = 86_400.0


class PrunableStore(Protocol):
    async def prune(self, cutoff: float, limit: int) -> int: ...
    async def oldest_received_at(self) -> float | None: ...
    @property
    def writes(self) -> int:
        """Writes committed for callers so far (not counting prunes)."""
        ...


class Retention:
    """Prunes one store; `oldest_at` is what the last pass left (for `chatq status`)."""

    def __init__(
        self,
        store: PrunableStore,
        days: int,
        *,
        quiet: Pace = QUIET,
        busy: Pace = BUSY,
        every: float = PASS_EVERY,
        clock: Callable[[], float] = time.time,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        self._store = store
        self._days = days
        self._quiet = quiet
        self._busy = busy
        self._writes_seen = store.writes
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

    def pace(self) -> Pace:
        """`BUSY` if the store committed other writes since the last look, else `QUIET`."""
        seen, self._writes_seen = self._writes_seen, self._store.writes
        return self._busy if self._writes_seen != seen else self._quiet

    async def step(self) -> tuple[int, bool]:
        """One batch of what is due, at the pace of the load, and its pause.

        Returns how many messages went, and whether more may be due (the batch was full).
        """
        pace = self.pace()
        gone = await self._store.prune(self._cutoff(), pace.batch)
        if gone < pace.batch:
            return gone, False
        await self._sleep(pace.pause)
        return gone, True

    async def prune_once(self) -> int:
        """Delete what is due, batch by batch; returns how many messages went.

        A store whose oldest message is younger than the cutoff is left
        alone: a read instead of a write transaction (every worker's start).
        """
        total = 0
        oldest = await self._store.oldest_received_at()
        if self._days and oldest is not None and oldest < self._cutoff():
            more = True
            while more:
                gone, more = await self.step()
                total += gone
            oldest = await self._store.oldest_received_at()
        if total:
            logger.info("retention: deleted {} messages older than {} days", total, self._days)
        self.oldest_at = oldest
        return total

    def _cutoff(self) -> float:
        return self._clock() - self._days * DAY
