"""Checkpointer: WAL checkpoints beside the writer, not inside its commits."""

from __future__ import annotations

import asyncio
import contextlib
import os
import sqlite3
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from loguru import logger

from chatq.tenant_worker.checkpoint import Checkpointer
from chatq.tenant_worker.messages import Message
from chatq.tenant_worker.store import Store


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def writer(tmp_path: Path) -> Iterator[sqlite3.Connection]:
    """A WAL database whose writer never checkpoints by itself."""
    conn = sqlite3.connect(tmp_path / "s.sqlite3", isolation_level=None)
    conn.execute("PRAGMA journal_mode = WAL")
    conn.execute("PRAGMA wal_autocheckpoint = 0")
    conn.execute("CREATE TABLE t (x TEXT)")
    yield conn
    conn.close()


def write_pages(conn: sqlite3.Connection, rows: int = 200) -> None:
    conn.executemany("INSERT INTO t VALUES (?)", [("x" * 1000,) for _ in range(rows)])


def wal_left(path: Path) -> tuple[int, int]:
    """(frames in the WAL, frames of them already copied into the file)."""
    with contextlib.closing(sqlite3.connect(path)) as conn:
        _busy, log, done = conn.execute("PRAGMA wal_checkpoint(NOOP)").fetchone()
    return log, done


def db_size(path: Path) -> int:
    return path.stat().st_size


async def wait_done(cp: Checkpointer, count: int) -> None:
    async with asyncio.timeout(5):
        while cp.done < count:  # noqa: ASYNC110 - the checkpointer has no event to wait on
            await asyncio.sleep(0.005)


async def test_a_commit_after_the_interval_copies_the_wal_into_the_file_on_a_batch_thread(
    writer: sqlite3.Connection, tmp_path: Path
) -> None:
    path = tmp_path / "s.sqlite3"
    clock = Clock()
    cp = Checkpointer(path, 1.0, every=0.5, clock=clock)
    write_pages(writer)
    before = db_size(path)

    cp.after_commit()  # too soon after the start: nothing runs
    await asyncio.sleep(0.05)
    assert cp.done == 0 and db_size(path) == before

    clock.now += 0.5
    cp.after_commit()
    await wait_done(cp, 1)
    assert db_size(path) > before + 150_000  # the rows are in the file now
    (thread,) = [t for t in threading.enumerate() if t.name.startswith("store-checkpoint")]
    if hasattr(os, "SCHED_BATCH"):  # Linux: its wake-ups do not preempt the loop's thread
        assert thread.native_id is not None
        assert os.sched_getscheduler(thread.native_id) == os.SCHED_BATCH
    await cp.close()


async def test_one_checkpoint_at_a_time_and_at_most_one_per_interval(
    writer: sqlite3.Connection, tmp_path: Path
) -> None:
    clock = Clock()
    cp = Checkpointer(tmp_path / "s.sqlite3", 1.0, every=0.5, clock=clock)
    clock.now += 1
    cp.after_commit()
    cp.after_commit()  # one is running
    clock.now += 0.2
    cp.after_commit()  # within the interval
    await wait_done(cp, 1)
    await asyncio.sleep(0.05)
    assert cp.done == 1
    clock.now += 0.5
    cp.after_commit()
    await wait_done(cp, 2)
    await cp.close()


async def test_no_commits_no_thread(tmp_path: Path) -> None:
    cp = Checkpointer(tmp_path / "s.sqlite3", 1.0)
    await cp.close()  # an idle store never made a thread or a connection
    assert cp.done == 0


async def test_a_failing_checkpoint_warns_once_and_the_next_one_works(
    writer: sqlite3.Connection, tmp_path: Path
) -> None:
    path = tmp_path / "s.sqlite3"
    clock = Clock()
    gone = tmp_path / "gone.sqlite3"  # a store removed under the worker
    cp = Checkpointer(gone, 1.0, every=0.5, clock=clock)
    lines: list[str] = []
    sink = logger.add(lines.append, level="WARNING", format="{message}")
    try:
        for _ in range(2):
            clock.now += 1
            cp.after_commit()
            async with asyncio.timeout(5):
                while cp._running is not None:  # noqa: ASYNC110
                    await asyncio.sleep(0.005)
    finally:
        logger.remove(sink)
    assert cp.done == 0 and not gone.exists()  # no empty store made in its place
    assert len(lines) == 1 and "store checkpoint failed" in lines[0]
    await cp.close()

    good = Checkpointer(path, 1.0, every=0.5, clock=clock)
    write_pages(writer)
    clock.now += 1
    good.after_commit()
    await wait_done(good, 1)
    log, done = wal_left(path)
    assert log == done > 0
    await good.close()


async def test_the_store_checkpoints_beside_its_writer(tmp_path: Path) -> None:
    path = tmp_path / "acme.sqlite3"
    store = await Store.open(path, "acme")
    store._checkpoints = Checkpointer(path, 1.0, every=0.0)  # after every commit, if idle
    try:
        for n in range(20):
            batch = [
                Message(id=f"{n}-{i}", chat_id="c", text="y" * 2000, tenant_id="acme")
                for i in range(50)
            ]
            await store.add_messages(batch)
        await wait_done(store._checkpoints, 1)
        assert db_size(path) > 1_000_000  # the messages were copied into the file
    finally:
        await store.close()
    assert store._checkpoints.done >= 1
    assert not path.with_name(path.name + "-wal").exists()  # the clean close still folds it in
