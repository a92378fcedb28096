"""Retention: old finished messages go, in small batches, and the store file shrinks."""

from __future__ import annotations

import sqlite3
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from chatq.tenant_worker.messages import Message
from chatq.tenant_worker.retention import DAY, Pace, Retention
from chatq.tenant_worker.store import Store

NOW = 1_800_000_000.0
OLD = NOW - 31 * DAY


def msg(mid: str, received_at: float, text: str = "hi") -> Message:
    return Message(id=mid, chat_id="c1", text=text, tenant_id="acme", received_at=received_at)


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[Store]:
    opened = await Store.open(tmp_path / "acme.sqlite3", "acme", clock=lambda: NOW)
    yield opened
    await opened.close()


async def finish(store: Store, mid: str, reply: str | None = None) -> None:
    await store.begin_attempt(mid)
    await store.complete(mid, [reply] if reply else [])


async def ids(store: Store) -> list[str]:
    return [row[0] for row in await store._read("SELECT id FROM messages ORDER BY seq")]


async def test_only_old_finished_messages_go_with_their_replies(store: Store) -> None:
    await store.add_messages([msg(f"old{n}", OLD + n) for n in range(5)])
    await store.add_messages([msg("old-queued", OLD), msg("old-pending", OLD), msg("young", NOW)])
    await store.add_messages([msg("old-rejected", OLD)], "rejected")
    for n in range(5):
        await finish(store, f"old{n}", "sent reply" if n == 0 else None)
    await store.mark_sent(1, "p1")
    await finish(store, "old-pending", "never sent")  # its reply is still pending: kept
    await finish(store, "young")
    sleeps: list[float] = []

    async def sleep(seconds: float) -> None:
        sleeps.append(seconds)

    quiet = Pace(2, 0.1)
    retention = Retention(store, 30, quiet=quiet, busy=quiet, clock=lambda: NOW, sleep=sleep)
    assert await retention.prune_once() == 6
    assert await ids(store) == ["old-queued", "old-pending", "young"]
    assert len(sleeps) == 3  # batches of 2, 2, 2 (then 0): a pause between full ones
    replies = await store._read("SELECT text FROM replies")
    assert replies == [("never sent",)]
    assert retention.oldest_at == OLD

    assert await Retention(store, 0).prune_once() == 0  # 0 days: keep everything


async def test_a_pass_with_nothing_old_enough_writes_nothing(store: Store) -> None:
    """Every worker's start: one read, no write transaction (boot CPU, memory)."""
    retention = Retention(store, 30, clock=lambda: NOW)
    assert await retention.prune_once() == 0
    assert store.commits == 0 and retention.oldest_at is None
    await store.add_messages([msg("young", NOW - 29 * DAY)], "rejected")
    commits = store.commits
    assert await retention.prune_once() == 0
    assert store.commits == commits and retention.oldest_at == NOW - 29 * DAY
    assert await Retention(store, 28, clock=lambda: NOW).prune_once() == 1


async def test_the_file_shrinks(store: Store) -> None:
    await store.add_messages([msg(f"m{n}", OLD, "x" * 2000) for n in range(600)])
    for n in range(600):
        await finish(store, f"m{n}")

    def pages() -> int:
        with sqlite3.connect(store.path) as conn:
            count = int(conn.execute("PRAGMA page_count").fetchone()[0])
        conn.close()
        return count

    before = pages()
    assert await Retention(store, 30, clock=lambda: NOW).prune_once() == 600
    assert pages() < before / 4


async def test_an_older_store_is_switched_to_incremental_vacuum(tmp_path: Path) -> None:
    path = tmp_path / "old.sqlite3"
    with sqlite3.connect(path) as conn:
        conn.execute("CREATE TABLE t (x)")  # made without auto_vacuum, as before retention
    conn.close()
    store = await Store.open(path, "acme")
    await store.close()
    with sqlite3.connect(path) as conn:
        assert conn.execute("PRAGMA auto_vacuum").fetchone()[0] == 2
    conn.close()


class Backlog:
    """A store with `due` old messages, whose callers write `load` times per pause."""

    def __init__(self, due: int) -> None:
        self.due = due
        self.writes = 0
        self.load = 0
        self.batches: list[int] = []

    async def prune(self, cutoff: float, limit: int) -> int:
        gone = min(limit, self.due)
        self.due -= gone
        self.batches.append(limit)
        return gone

    async def oldest_received_at(self) -> float | None:
        return OLD if self.due else None

    async def sleep(self, seconds: float) -> None:
        self.writes += self.load  # what ingest committed meanwhile


async def test_the_pace_follows_the_load() -> None:
    backlog = Backlog(due=100)
    pauses: list[float] = []

    async def sleep(seconds: float) -> None:
        pauses.append(seconds)
        await backlog.sleep(seconds)

    quiet, busy = Pace(20, 0.1), Pace(5, 0.5)
    retention = Retention(backlog, 30, quiet=quiet, busy=busy, clock=lambda: NOW, sleep=sleep)
    assert await retention.step() == (20, True)  # nothing written: the quiet pace
    backlog.load = 3
    assert await retention.step() == (20, True)  # the load shows from the next step on
    assert await retention.step() == (5, True)
    assert await retention.step() == (5, True)
    backlog.load = 0
    assert await retention.prune_once() == 50  # quiet again after one busy batch
    assert backlog.batches == [20, 20, 5, 5, 5, 20, 20, 20]
    assert pauses == [0.1, 0.1, 0.5, 0.5, 0.5, 0.1, 0.1]  # none after the last, partial batch
    assert backlog.due == 0


async def test_the_store_counts_callers_writes_not_its_prunes(store: Store) -> None:
    await store.add_messages([msg("old", OLD)])
    await finish(store, "old")
    before = store.writes
    assert await store.prune(NOW, 10) == 1
    assert store.writes == before  # a prune is not load
    await store.add_messages([msg("new", NOW)])
    assert store.writes == before + 1
