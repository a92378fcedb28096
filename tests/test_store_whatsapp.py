"""Store: message types and payloads, the v2 migration, delivery statuses."""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from chatq.tenant_worker.delivery import advance
from chatq.tenant_worker.messages import Message, StatusCounts, StatusUpdate
from chatq.tenant_worker.store import MIGRATIONS, Store

NOW = 1_800_000_000.0


def msg(mid: str, **kw: Any) -> Message:
    return Message(id=mid, chat_id="c1", text="hi", tenant_id="acme", **kw)


@pytest.fixture
def db_path(tmp_path: Path) -> Path:
    return tmp_path / "acme.sqlite3"


@pytest.fixture
async def store(db_path: Path) -> AsyncIterator[Store]:
    opened = await Store.open(db_path, "acme", clock=lambda: NOW)
    yield opened
    await opened.close()


def query(path: Path, sql: str) -> list[tuple[Any, ...]]:
    conn = sqlite3.connect(path)
    try:
        return conn.execute(sql).fetchall()
    finally:
        conn.close()


async def sent_reply(store: Store, mid: str, provider_id: str) -> int:
    await store.add_messages([msg(mid)])
    await store.begin_attempt(mid)
    (reply,) = await store.complete(mid, ["re"])
    await store.mark_sent(reply.id, provider_id)
    return reply.id


def reply_row(path: Path, reply_id: int) -> tuple[Any, ...]:
    return query(path, f"SELECT status, last_error FROM replies WHERE id = {reply_id}")[0]


# -- the pure order ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("current", "incoming", "new"),
    [
        ("sent", "delivered", "delivered"),
        ("sent", "read", "read"),
        ("delivered", "read", "read"),
        ("read", "delivered", None),
        ("delivered", "sent", None),
        ("read", "read", None),
        ("sent", "failed", "failed"),
        ("delivered", "failed", "failed"),
        ("read", "failed", None),
        ("failed", "read", None),
        ("failed", "failed", None),
        ("pending", "sent", "sent"),
        ("sent", "deleted", None),
    ],
)
def test_statuses_only_move_forward(current: str, incoming: str, new: str | None) -> None:
    assert advance(current, incoming) == new


# -- types and payloads ------------------------------------------------------------


async def test_type_and_payload_round_trip_through_replay(store: Store) -> None:
    payload = {"type": "image", "image": {"caption": "look", "id": "9"}, "odd": "\ud800"}
    await store.add_messages([msg("w1", type="image", payload=payload), msg("m2")])
    rows = {row.message.id: row.message for row in await store.unfinished_messages()}
    assert (rows["w1"].type, rows["w1"].payload) == ("image", payload)
    assert (rows["m2"].type, rows["m2"].payload) == ("text", None)


# -- migration ----------------------------------------------------------------------


def test_a_v1_store_migrates_keeping_rows_and_indexes(db_path: Path) -> None:
    conn = sqlite3.connect(db_path, isolation_level=None)
    for statement in MIGRATIONS[0]:
        conn.execute(statement)
    conn.execute("PRAGMA user_version = 1")
    conn.execute(
        "INSERT INTO messages (id, chat_id, text, received_at, status, updated_at)"
        " VALUES ('m1', 'c1', 'old', 1, 'processed', 1)"
    )
    conn.execute(
        "INSERT INTO replies (message_id, chat_id, text, status, next_attempt_at, provider_id,"
        " created_at) VALUES ('m1', 'c1', 'r', 'sent', 1, 'wamid.x', 1)"
    )
    conn.close()

    async def migrate() -> None:
        opened = await Store.open(db_path, "acme")
        await opened.apply_statuses([StatusUpdate("wamid.x", "read")])
        await opened.close()

    asyncio.run(migrate())
    assert query(db_path, "PRAGMA user_version") == [(len(MIGRATIONS),)]
    assert query(db_path, "SELECT id, type, payload FROM messages") == [("m1", "text", None)]
    assert query(db_path, "SELECT text, status, provider_id FROM replies") == [
        ("r", "read", "wamid.x")
    ]
    indexes = {
        row[0] for row in query(db_path, "SELECT name FROM sqlite_master WHERE type='index'")
    }
    assert {"replies_pending", "replies_by_message", "replies_by_provider"} <= indexes


def test_a_v3_store_gets_a_provider_index_only_sent_replies_are_in(db_path: Path) -> None:
    conn = sqlite3.connect(db_path, isolation_level=None)
    for statements in MIGRATIONS[:3]:
        for statement in statements:
            conn.execute(statement)
    conn.execute("PRAGMA user_version = 3")
    conn.execute(
        "INSERT INTO messages (id, chat_id, text, received_at, status, updated_at)"
        " VALUES ('m1', 'c1', 'old', 1, 'processed', 1)"
    )
    conn.executemany(
        "INSERT INTO replies (message_id, chat_id, text, status, next_attempt_at, provider_id,"
        " created_at) VALUES ('m1', 'c1', 'r', ?, 1, ?, 1)",
        [("sent", "wamid.x"), ("pending", None)],
    )
    conn.close()

    async def migrate() -> StatusCounts:
        opened = await Store.open(db_path, "acme")
        counts = await opened.apply_statuses([StatusUpdate("wamid.x", "delivered")])
        await opened.close()
        return counts

    assert asyncio.run(migrate()) == StatusCounts(applied=1)
    assert query(db_path, "PRAGMA user_version") == [(len(MIGRATIONS),)]
    assert query(db_path, "SELECT status, provider_id FROM replies ORDER BY id") == [
        ("delivered", "wamid.x"),
        ("pending", None),
    ]
    [(sql,)] = query(db_path, "SELECT sql FROM sqlite_master WHERE name = 'replies_by_provider'")
    assert sql.endswith("WHERE provider_id IS NOT NULL")
    plan = query(db_path, "EXPLAIN QUERY PLAN SELECT id FROM replies WHERE provider_id = 'p'")
    assert "replies_by_provider" in plan[0][3]


# -- statuses ------------------------------------------------------------------------


async def test_read_before_delivered_ends_read(store: Store, db_path: Path) -> None:
    rid = await sent_reply(store, "m1", "wamid.o1")
    first = await store.apply_statuses([StatusUpdate("wamid.o1", "read")])
    later = await store.apply_statuses([StatusUpdate("wamid.o1", "delivered")])
    assert (first, later) == (StatusCounts(applied=1), StatusCounts(stale=1))
    assert reply_row(db_path, rid) == ("read", None)


async def test_one_batch_in_any_order_and_redelivered_is_idempotent(
    store: Store, db_path: Path
) -> None:
    rid = await sent_reply(store, "m1", "wamid.o1")
    batch = [StatusUpdate("wamid.o1", s) for s in ("read", "sent", "delivered", "read")]
    assert await store.apply_statuses(batch) == StatusCounts(applied=1, stale=3)
    assert await store.apply_statuses(batch) == StatusCounts(stale=4)
    assert reply_row(db_path, rid) == ("read", None)


async def test_failed_keeps_the_error_and_is_final(store: Store, db_path: Path) -> None:
    rid = await sent_reply(store, "m1", "wamid.o1")
    update = StatusUpdate("wamid.o1", "failed", "131047: Re-engagement message")
    await store.apply_statuses([update])
    await store.apply_statuses([StatusUpdate("wamid.o1", "delivered"), update])
    assert reply_row(db_path, rid) == ("failed", "131047: Re-engagement message")


async def test_unknown_provider_ids_are_counted_and_change_nothing(
    store: Store, db_path: Path
) -> None:
    rid = await sent_reply(store, "m1", "wamid.o1")
    counts = await store.apply_statuses(
        [StatusUpdate("wamid.nope", "read"), StatusUpdate("wamid.o1", "delivered")]
    )
    assert counts == StatusCounts(applied=1, unknown=1)
    assert reply_row(db_path, rid) == ("delivered", None)


async def test_statuses_queued_with_messages_share_their_commit(store: Store) -> None:
    await sent_reply(store, "m1", "wamid.o1")
    before = store.commits
    applying = store.apply_statuses_soon([StatusUpdate("wamid.o1", "read")])
    await store.add_messages([msg("w2")])
    assert await applying == StatusCounts(applied=1)
    assert store.commits == before + 1


async def test_a_status_queued_after_its_mark_sent_in_one_batch_finds_the_reply(
    store: Store, db_path: Path
) -> None:
    """The writer groups ops by kind; a status for a provider id must not overtake the
    mark_sent that records it (it would be counted unknown and lost)."""
    await sent_reply(store, "m0", "wamid.o0")
    await store.add_messages([msg("m1")])
    await store.begin_attempt("m1")
    (reply,) = await store.complete("m1", ["re"])
    first = store.apply_statuses_soon([StatusUpdate("wamid.o0", "delivered")])
    sent = store.mark_sent_soon(reply.id, "wamid.o1")
    status = store.apply_statuses_soon(
        [StatusUpdate("wamid.o1", "failed", "131026: undeliverable")]
    )
    await asyncio.gather(first, sent, status)
    assert await status == StatusCounts(applied=1)
    assert reply_row(db_path, reply.id) == ("failed", "131026: undeliverable")
