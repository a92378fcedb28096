"""WAL checkpoints off the commit path.

SQLite's automatic checkpoint runs inside the commit that crosses its
threshold: that commit, and every caller waiting on it, pays for copying the
WAL into the file and fsyncing it. Deletes (retention) write a lot of WAL, so
pruning a large store raised ingest's p99 by two thirds (bench/retention_bench.py).

Instead, the writer's own automatic checkpoint is only a backstop
(`BACKSTOP_PAGES`, for a checkpointer that cannot keep up), and after a
commit, at most every `EVERY` seconds, a PASSIVE checkpoint runs on a
connection and thread of its own while the writer goes on committing (in WAL
mode a checkpoint never blocks the writer). Nothing runs while no commits
come, so an idle tenant has no timer and no thread for it. Checkpoints never
touch durability: every commit is already fsynced in the WAL.

    cp = Checkpointer(path, busy_timeout)
    cp.after_commit()        # the writer, after each commit
    await cp.close()         # before the writer closes (which checkpoints the rest)
"""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from loguru import logger

from chatq.shared.thread_policy import run_as_batch
from chatq.tenant_worker.store_errors import one_line

__all__ = ["BACKSTOP_PAGES", "EVERY", "Checkpointer"]

EVERY = 0.5  # seconds between checkpoints while commits come
BACKSTOP_PAGES = 8000  # the writer's own automatic checkpoint (SQLite's default: 1,000)
_CACHE_KIB = 64  # a checkpoint copies pages; it needs next to no cache


class Checkpointer:
    """Runs PASSIVE checkpoints of one store in the background, one at a time."""

    def __init__(
        self,
        path: Path,
        busy_timeout: float,
        *,
        every: float = EVERY,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._path = path
        self._busy_timeout = busy_timeout
        self._every = every
        self._clock = clock
        self._last = clock()
        self._thread: ThreadPoolExecutor | None = None  # made at the first checkpoint
        self._conn: sqlite3.Connection | None = None
        self._running: asyncio.Future[None] | None = None
        self._failing = False
        self.done = 0  # checkpoints completed; tests read it

    def after_commit(self) -> None:
        """Start a checkpoint if none runs and the last began `every` seconds ago."""
        if self._running is not None or self._clock() - self._last < self._every:
            return
        self._last = self._clock()
        if self._thread is None:
            self._thread = ThreadPoolExecutor(
                1, thread_name_prefix="store-checkpoint", initializer=run_as_batch
            )
        loop = asyncio.get_running_loop()
        self._running = loop.run_in_executor(self._thread, self._checkpoint)
        self._running.add_done_callback(self._finished)

    async def close(self) -> None:
        """Wait for a checkpoint under way, then close the connection and the thread."""
        if self._running is not None:
            with contextlib.suppress(Exception):
                await self._running
        if self._thread is not None:
            await asyncio.get_running_loop().run_in_executor(self._thread, self._close_conn)
            self._thread.shutdown(wait=False)
            self._thread = None

    def _finished(self, future: asyncio.Future[None]) -> None:
        self._running = None
        exc = None if future.cancelled() else future.exception()
        if exc is None:
            self.done += 1
            self._failing = False
        elif not self._failing:  # once per streak: the writer reports the store's faults
            self._failing = True
            logger.warning(
                "store checkpoint failed ({}); the writer checkpoints by itself meanwhile",
                one_line(exc),
            )

    def _checkpoint(self) -> None:
        """On the checkpoint thread."""
        if self._conn is None:
            self._conn = sqlite3.connect(  # mode=rw: a store gone is an error, not a new file
                f"{self._path.resolve().as_uri()}?mode=rw",
                uri=True,
                isolation_level=None,
                timeout=self._busy_timeout,
            )
            self._conn.execute("PRAGMA synchronous = FULL")
            self._conn.execute(f"PRAGMA cache_size = -{_CACHE_KIB}")
        self._conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall()

    def _close_conn(self) -> None:
        if self._conn is not None:
            with contextlib.suppress(sqlite3.Error):
                self._conn.close()
            self._conn = None
