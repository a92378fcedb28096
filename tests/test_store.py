"""Store: schema and migrations, message and reply lifecycles, group commit, durability."""

from __future__ import annotations

import asyncio
import os
import signal
import sqlite3
import sys
import threading
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from chatq.shared.errors import StoreError
from chatq.tenant_worker import store as store_module
from chatq.tenant_worker.messages import Message
from chatq.tenant_worker.store import MESSAGE_STATUSES, MIGRATIONS, Store

ROOT = Path(__file__).resolve().parent.parent
NOW = 1_800_000_000.0

OpenStore = Callable[..., Awaitable[Store]]


def msg(mid: str, chat: str = "c1", text: str = "hi", **kw: Any) -> Message:
    return Message(id=mid, chat_id=chat, text=text, tenant_id="acme", **kw)


@pytest.fixture
def db_path(tmp_path: Path) -> Path:
    return tmp_path / "data" / "acme.sqlite3"


@pytest.fixture
async def open_store(db_path: Path) -> AsyncIterator[OpenStore]:
    """Opens stores (default: db_path, fixed clock) and closes them all afterwards."""
    stores: list[Store] = []

    async def factory(path: Path = db_path, **kw: Any) -> Store:
        kw.setdefault("clock", lambda: NOW)
        store = await Store.open(path, "acme", **kw)
        stores.append(store)
        return store

    yield factory
    for store in stores:
        await store.close()


def query(path: Path, sql: str, *params: Any) -> list[tuple[Any, ...]]:
    with sqlite3.connect(path) as conn:
        rows = conn.execute(sql, params).fetchall()
    conn.close()
    return rows


# -- opening, schema, migrations ----------------------------------------------


async def test_open_creates_folder_wal_schema_and_version(
    open_store: OpenStore, db_path: Path
) -> None:
    await open_store()
    assert query(db_path, "PRAGMA user_version") == [(len(MIGRATIONS),)]
    assert query(db_path, "PRAGMA journal_mode") == [("wal",)]
    names = {name for (name,) in query(db_path, "SELECT name FROM sqlite_master")}
    assert {"messages", "replies", "messages_unfinished", "replies_pending"} <= names
    assert {"messages_by_chat", "replies_by_message"} <= names


async def test_reopen_keeps_data(open_store: OpenStore) -> None:
    store = await open_store()
    await store.add_messages([msg("m1")])
    await store.close()
    store = await open_store()
    assert [s.message.id for s in await store.unfinished_messages()] == ["m1"]


async def test_migrations_run_once(
    open_store: OpenStore, db_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    await (await open_store()).close()
    v2 = ("CREATE TABLE extra (x INTEGER)",)  # would fail if it ran twice
    monkeypatch.setattr(store_module, "MIGRATIONS", (*MIGRATIONS, v2))
    await (await open_store()).close()
    await (await open_store()).close()
    assert query(db_path, "PRAGMA user_version") == [(len(MIGRATIONS) + 1,)]


async def test_opening_a_current_store_writes_nothing_to_it(
    open_store: OpenStore, db_path: Path
) -> None:
    """A worker's usual boot: no write transaction, no checkpoint of one (boot CPU)."""
    store = await open_store()
    await store.add_messages([msg("m1")])
    await store.close()
    os.utime(db_path, ns=(1_000_000_000, 1_000_000_000))
    store = await open_store()
    assert [s.message.id for s in await store.unfinished_messages()] == ["m1"]
    await store.close()
    assert os.stat(db_path).st_mtime_ns == 1_000_000_000
    assert query(db_path, "PRAGMA user_version") == [(len(MIGRATIONS),)]


async def test_reads_share_the_writers_thread_and_see_every_commit(
    open_store: OpenStore,
) -> None:
    """One thread per store (an idle worker's memory): no reader connection of its own."""
    before = set(threading.enumerate())
    store = await open_store()
    assert await store.counts() == dict.fromkeys(MESSAGE_STATUSES, 0)
    writes = [store.add_messages([msg(f"m{n}", chat=f"c{n}")]) for n in range(20)]
    await asyncio.gather(*writes)
    assert (await store.counts())["queued"] == 20
    assert len(await store.unfinished_messages()) == 20
    [writer] = set(threading.enumerate()) - before
    assert writer.name == "store-writer:acme"
    await store.close()
    writer.join(timeout=5)  # closing ends it: a restarted store leaves no thread behind
    assert not writer.is_alive()


async def test_a_store_made_readable_to_others_is_private_again_once_opened(
    open_store: OpenStore, db_path: Path
) -> None:
    await (await open_store()).close()
    os.chmod(db_path, 0o644)
    store = await open_store()
    assert os.stat(db_path).st_mode & 0o777 == 0o600
    for suffix in ("-wal", "-shm"):
        assert os.stat(f"{db_path}{suffix}").st_mode & 0o077 == 0
    await store.close()


async def test_newer_schema_version_is_refused(db_path: Path) -> None:
    db_path.parent.mkdir()
    with sqlite3.connect(db_path) as conn:
        conn.execute(f"PRAGMA user_version = {len(MIGRATIONS) + 1}")
    conn.close()
    with pytest.raises(StoreError, match="newer") as info:
        await Store.open(db_path, "acme")
    assert str(db_path) in str(info.value)


@pytest.mark.parametrize("kind", ["directory", "parent_is_file", "not_a_database"])
async def test_unopenable_path_is_one_line_store_error(tmp_path: Path, kind: str) -> None:
    path = tmp_path / "acme.sqlite3"
    if kind == "directory":
        path.mkdir()
    elif kind == "parent_is_file":
        (tmp_path / "file").write_text("x")
        path = tmp_path / "file" / "acme.sqlite3"
    else:
        path.write_bytes(b"this is not sqlite" * 100)
    with pytest.raises(StoreError) as info:
        await Store.open(path, "acme")
    text = str(info.value)
    assert text.startswith(f"store {path}: ")
    assert "\n" not in text


# -- messages ---------------------------------------------------------------------


async def test_add_messages_detects_duplicates(open_store: OpenStore, db_path: Path) -> None:
    store = await open_store()
    assert await store.add_messages([msg("a"), msg("b"), msg("a", text="again")]) == [
        True,
        True,
        False,
    ]
    assert await store.add_messages([msg("b", text="changed"), msg("c")]) == [False, True]
    await store.close()
    store = await open_store()
    assert await store.add_messages([msg("c"), msg("d")]) == [False, True]
    texts = query(db_path, "SELECT id, text FROM messages ORDER BY seq")
    assert texts == [("a", "hi"), ("b", "hi"), ("c", "hi"), ("d", "hi")]


async def test_add_messages_keeps_fields_and_refuses_bad_status(open_store: OpenStore) -> None:
    store = await open_store()
    m = msg("m1", sender="alice", ts=12.5, received_at=NOW - 1)
    await store.add_messages([m])
    [stored] = await store.unfinished_messages()
    assert stored.message == m
    assert (stored.status, stored.attempts, stored.last_error) == ("queued", 0, None)
    with pytest.raises(ValueError, match="status"):
        await store.add_messages([msg("m2")], status="weird")
    assert (await store.counts())["queued"] == 1


@pytest.mark.parametrize(
    "text", ["plain", "emoji \U0001f600 and \u00fc", "quotes \" ' \\ \u2028", "", "a\x00b"]
)
async def test_texts_round_trip_exactly(open_store: OpenStore, text: str) -> None:
    # Rows travel to SQLite as JSON; a NUL must not cut a text short there.
    store = await open_store()
    await store.add_messages([msg("m1", text=text, sender=text)])
    [stored] = await store.unfinished_messages()
    assert (stored.message.text, stored.message.sender) == (text, text)
    [reply] = await store.complete("m1", [text])
    assert reply.text == text
    assert [r.text for r in await store.pending_replies()] == [text]


async def test_attempt_fail_and_complete_transitions(open_store: OpenStore) -> None:
    store = await open_store()
    await store.add_messages([msg("m1")])
    assert await store.begin_attempt("m1") == 1
    assert (await store.counts())["processing"] == 1
    await store.fail("m1", "boom", final=False)
    [stored] = await store.unfinished_messages()
    assert (stored.status, stored.attempts, stored.last_error) == ("queued", 1, "boom")
    assert await store.begin_attempt("m1") == 2
    replies = await store.complete("m1", ["one", "two"])
    assert [(r.message_id, r.chat_id, r.text) for r in replies] == [
        ("m1", "c1", "one"),
        ("m1", "c1", "two"),
    ]
    assert replies[1].id == replies[0].id + 1
    assert await store.unfinished_messages() == []
    assert await store.pending_replies() == replies
    counts = await store.counts()
    assert set(counts) == set(MESSAGE_STATUSES)
    assert counts["processed"] == 1


async def test_final_failure_leaves_unfinished(open_store: OpenStore, db_path: Path) -> None:
    store = await open_store()
    await store.add_messages([msg("m1")])
    await store.begin_attempt("m1")
    await store.fail("m1", "bad input", final=True)
    assert await store.unfinished_messages() == []
    assert query(db_path, "SELECT status, last_error FROM messages") == [("failed", "bad input")]


async def test_release_uncounts_an_interrupted_attempt_and_nothing_else(
    open_store: OpenStore, db_path: Path
) -> None:
    store = await open_store()
    await store.add_messages([msg("cut"), msg("done"), msg("retry")])
    for mid in ("cut", "done", "retry"):
        await store.begin_attempt(mid)
    await store.begin_attempt("cut")  # its second attempt is the one a drain cuts short
    await store.complete("done", [])
    await store.fail("retry", "boom", final=False)

    await asyncio.gather(*(store.release(mid) for mid in ("cut", "done", "retry")))

    assert query(db_path, "SELECT id, status, attempts FROM messages ORDER BY seq") == [
        ("cut", "queued", 1),
        ("done", "processed", 1),
        ("retry", "queued", 1),
    ]


async def test_error_texts_with_a_lone_surrogate_are_stored_escaped(
    open_store: OpenStore, db_path: Path
) -> None:
    store = await open_store()
    await store.add_messages([msg("m1")])
    await store.begin_attempt("m1")
    await store.fail("m1", "cannot parse caf\udce9", final=True)  # e.g. a handler's message
    assert query(db_path, "SELECT last_error FROM messages") == [("cannot parse caf\\udce9",)]


async def test_complete_is_atomic(open_store: OpenStore, db_path: Path) -> None:
    store = await open_store()
    await store.add_messages([msg("m1")])
    await store.begin_attempt("m1")
    # The status update runs, then the reply insert fails: both must roll back.
    with pytest.raises(StoreError, match="complete"):
        await store.complete("m1", ["fine", object()])  # type: ignore[list-item]
    assert query(db_path, "SELECT status FROM messages") == [("processing",)]
    assert query(db_path, "SELECT COUNT(*) FROM replies") == [(0,)]


async def test_unknown_ids_are_store_errors(open_store: OpenStore) -> None:
    store = await open_store()
    calls: list[Awaitable[Any]] = [
        store.begin_attempt("nope"),
        store.complete("nope", ["x"]),
        store.fail("nope", "e", final=True),
        store.release("nope"),
        store.add_reply("nope", "c1", "x"),
        store.mark_sent(99, "p"),
        store.retry_reply(99, "e", NOW),
        store.fail_reply(99, "e"),
    ]
    for call in calls:
        with pytest.raises(StoreError, match="unknown"):
            await call
    assert await store.pending_replies() == []


def test_a_run_is_one_statement_up_to_eight_rows_and_few_distinct_ones_beyond() -> None:
    # Each distinct chunk size is a statement text the connection keeps prepared.
    sizes = {n: [len(c) for c in store_module._chunks(range(n))] for n in range(1, 300)}
    assert all(sizes[n] == [n] for n in range(1, 9))  # a gateway forward: one statement a kind
    assert sizes[13] == [8, 5] and sizes[40] == [16, 16, 8]
    assert all(sum(s) == n for n, s in sizes.items())
    assert {size for s in sizes.values() for size in s} == {*range(1, 9), 16}


async def test_long_runs_keep_order_and_duplicates_across_statement_chunks(
    open_store: OpenStore, db_path: Path
) -> None:
    # A run goes to SQLite in chunks of up to store._CHUNK_MAX (16) rows:
    # duplicates land in other chunks than their first.
    store = await open_store()
    await store.add_messages([msg("old-3")])
    ids = [f"m{n:03d}" for n in range(140)]
    ids[70], ids[130], ids[3] = "m005", "m100", "old-3"  # earlier in the run; stored before
    stored = await store.add_messages([msg(mid, f"c{n % 9}") for n, mid in enumerate(ids)])
    first = {mid: ids.index(mid) for mid in ids}
    assert stored == [n == first[mid] and mid != "old-3" for n, mid in enumerate(ids)]
    order = [mid for (mid,) in query(db_path, "SELECT id FROM messages ORDER BY seq")]
    assert order == ["old-3", *(mid for n, mid in enumerate(ids) if stored[n])]
    replies = [
        reply
        for done in await asyncio.gather(*(store.complete(mid, ["r"]) for mid in order[1:]))
        for reply in done
    ]
    assert len({r.id for r in replies}) == len(replies) == len(order) - 1
    marks = [store.mark_sent_soon(r.id, f"p{r.id}") for r in replies]
    await asyncio.gather(*marks)
    sent = query(db_path, "SELECT id, provider_id FROM replies WHERE status = 'sent'")
    assert sorted(sent) == [(r.id, f"p{r.id}") for r in replies]
    # One unknown reply among 70 marks gathered into one write: that write fails,
    # naming it; the rest of its statement chunks still apply.
    await store.add_messages([msg("x")])
    more = await store.complete("x", ["a"] * 69)
    shared = [store.mark_sent_soon(r.id, "q") for r in more] + [store.mark_sent_soon(999_999, "q")]
    with pytest.raises(StoreError, match="999999"):
        await shared[-1]
    assert query(db_path, "SELECT COUNT(*) FROM replies WHERE provider_id = 'q'") == [(69,)]


async def test_unfinished_messages_in_arrival_order(open_store: OpenStore) -> None:
    store = await open_store()
    await store.add_messages([msg("b1", "b"), msg("a1", "a"), msg("b2", "b")])
    await store.add_messages([msg("r1", "a")], status="rejected")
    await store.add_messages([msg("a2", "a"), msg("a3", "a")])
    await store.begin_attempt("a1")
    await store.begin_attempt("a3")
    await store.complete("a3", [])
    unfinished = await store.unfinished_messages()
    assert [s.message.id for s in unfinished] == ["b1", "a1", "b2", "a2"]
    assert [s.status for s in unfinished] == ["queued", "processing", "queued", "queued"]
    assert [s.seq for s in unfinished] == sorted(s.seq for s in unfinished)
    assert all(s.message.tenant_id == "acme" for s in unfinished)


async def test_pending_replies_lifecycle(open_store: OpenStore, db_path: Path) -> None:
    store = await open_store()
    await store.add_messages([msg("m1"), msg("m2", "c2")], status="rejected")
    wait = await store.add_reply("m1", "c1", "please wait")
    [r1, r2] = await store.complete("m2", ["a", "b"])
    assert [r.id for r in await store.pending_replies()] == [wait.id, r1.id, r2.id]
    await store.retry_reply(wait.id, "429", NOW + 30)
    await store.mark_sent(r1.id, "prov-1")
    await store.fail_reply(r2.id, "blocked")
    [pending] = await store.pending_replies()
    assert (pending.id, pending.attempts, pending.next_attempt_at) == (wait.id, 1, NOW + 30)
    rows = query(db_path, "SELECT id, status, provider_id, sent_at, last_error FROM replies")
    assert rows == [
        (wait.id, "pending", None, None, "429"),
        (r1.id, "sent", "prov-1", NOW, None),
        (r2.id, "failed", None, None, "blocked"),
    ]


# -- group commit -------------------------------------------------------------------


async def test_concurrent_writes_share_commits(open_store: OpenStore, db_path: Path) -> None:
    store = await open_store()
    batches = [[msg(f"m{i}-{j}", f"c{i % 7}") for j in range(5)] for i in range(200)]
    results = await asyncio.gather(*(store.add_messages(b) for b in batches))
    assert all(all(flags) for flags in results)
    assert store.commits <= 10
    assert query(db_path, "SELECT COUNT(*) FROM messages") == [(1000,)]


async def test_mixed_kinds_in_one_batch(open_store: OpenStore) -> None:
    store = await open_store()
    await store.add_messages([msg(f"m{i}", f"c{i}") for i in range(10)])
    commits = store.commits
    results = await asyncio.gather(
        *(store.begin_attempt(f"m{i}") for i in range(5)),
        *(store.complete(f"m{i}", [f"r{i}"]) for i in range(5, 10)),
        store.add_messages([msg("new")]),
    )
    assert store.commits == commits + 1
    assert results[:5] == [1] * 5
    completed: list[Any] = results[5:10]
    assert [r[0].text for r in completed] == [f"r{i}" for i in range(5, 10)]
    assert len({r[0].id for r in completed}) == 5


async def test_failing_op_fails_only_its_caller(open_store: OpenStore, db_path: Path) -> None:
    store = await open_store()
    bad = Message(id="bad", chat_id=None, text="x", tenant_id="acme")  # type: ignore[arg-type]
    results = await asyncio.gather(
        store.add_messages([msg("ok1")]),
        store.add_messages([bad]),
        store.add_messages([msg("ok2")]),
        return_exceptions=True,
    )
    assert results[0] == [True]
    assert results[2] == [True]
    assert isinstance(results[1], StoreError)
    assert "NOT NULL" in str(results[1])
    assert query(db_path, "SELECT id FROM messages ORDER BY seq") == [("ok1",), ("ok2",)]


async def test_unknown_id_in_batch_fails_only_its_caller(open_store: OpenStore) -> None:
    store = await open_store()
    await store.add_messages([msg("m1")])
    commits = store.commits
    results = await asyncio.gather(
        store.begin_attempt("m1"), store.begin_attempt("ghost"), return_exceptions=True
    )
    assert results[0] == 1
    assert isinstance(results[1], StoreError)
    assert store.commits == commits + 1  # no rollback and retry for a missing row


async def _two_callers_at_once(store: Store) -> None:
    """One batch of two callers: the load the next linger judges by."""
    await asyncio.gather(store.add_messages([msg("w1")]), store.add_messages([msg("w2")]))


async def test_linger_gathers_a_late_write(open_store: OpenStore) -> None:
    store = await open_store(linger=5.0)  # bounded wait, ended early by the second write
    await _two_callers_at_once(store)
    commits = store.commits
    first = asyncio.create_task(store.add_messages([msg("m1")]))
    await asyncio.sleep(0.01)
    assert not first.done()
    assert await store.add_messages([msg("m2")]) == [True]
    assert await first == [True]
    assert store.commits == commits + 1


async def test_a_lone_caller_after_a_lone_caller_does_not_linger(open_store: OpenStore) -> None:
    store = await open_store(linger=60.0)
    for n in range(3):  # e.g. the gateway's posts, one at a time
        assert await asyncio.wait_for(store.add_messages([msg(f"m{n}")]), 2) == [True]


async def test_owed_writes_do_not_make_a_lone_caller_linger(open_store: OpenStore) -> None:
    store = await open_store(linger=60.0, hold=60.0)
    await store.add_messages([msg(f"m{n}", f"c{n}") for n in range(3)], begun={"m0", "m1", "m2"})
    completed = [store.complete_soon(f"m{n}", ["r"]) for n in range(3)]  # owed: ride along
    assert await asyncio.wait_for(store.add_messages([msg("m3")]), 2) == [True]
    assert all(f.done() for f in completed)
    # The batch had four rows but one caller: the next lone caller does not wait either.
    assert await asyncio.wait_for(store.add_messages([msg("m4")]), 2) == [True]


class Ticks:
    """A monotonic timer the test moves."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


async def _callers_every(store: Store, ticks: Ticks, gap: float) -> None:
    """Two callers' writes `gap` seconds apart: the cadence owed writes are held by."""
    for n in range(2):
        ticks.now += gap
        await store.add_messages([msg(f"cadence{n}", "cadence")])


async def test_owed_writes_wait_for_a_callers_write_and_share_its_commit(
    open_store: OpenStore, db_path: Path
) -> None:
    ticks = Ticks()
    store = await open_store(hold=60.0, timer=ticks)  # held until a caller's write (or close)
    await store.add_messages([msg("m1", "c1")], begun={"m1"})
    await _callers_every(store, ticks, 0.005)
    commits = store.commits
    completed = store.complete_soon("m1", ["r1"])  # nobody is held up by it: owed
    for _ in range(20):
        await asyncio.sleep(0)
    await asyncio.sleep(0.01)
    assert not completed.done()
    assert store.commits == commits
    assert await store.add_messages([msg("m2", "c2")]) == [True]  # a caller waits: no hold
    reply = (await completed).replies_of("m1")[0]
    assert store.commits == commits + 1  # the completion rode along
    marked = store.mark_sent_soon(reply.id, "prov-1")  # owed too
    await asyncio.sleep(0.01)
    assert not marked.done()
    await store.add_messages([msg("m3", "c3")])
    await marked
    assert store.commits == commits + 2
    assert query(db_path, "SELECT status, provider_id FROM replies") == [("sent", "prov-1")]


@pytest.mark.parametrize(
    ("gap", "then"),
    [(100.0, 0.0), (0.005, 61.0)],
    ids=["callers-trickle", "callers-stopped"],
)
async def test_owed_writes_are_not_held_unless_callers_are_due(
    open_store: OpenStore, gap: float, then: float
) -> None:
    # Holding would only delay the reply the completion gates.
    ticks = Ticks()
    store = await open_store(hold=60.0, timer=ticks)
    await store.add_messages([msg("m1", "c1")], begun={"m1"})
    await _callers_every(store, ticks, gap)
    ticks.now += then
    progress = await asyncio.wait_for(store.complete_soon("m1", ["r1"]), timeout=2)
    assert [r.text for r in progress.replies_of("m1")] == ["r1"]


async def test_a_lone_owed_write_commits_within_the_hold(open_store: OpenStore) -> None:
    store = await open_store(hold=0.01)
    await store.add_messages([msg("m1")], begun={"m1"})
    progress = await asyncio.wait_for(store.complete_soon("m1", ["r1"]), timeout=2)
    assert [r.text for r in progress.replies_of("m1")] == ["r1"]


async def test_an_attempt_begun_is_never_held(open_store: OpenStore) -> None:
    store = await open_store(hold=60.0)
    await store.add_messages([msg("m1"), msg("m2"), msg("m3")], begun={"m1"})
    # The chat's next message waits to start: its begin commits at once,
    # with the completion it rides on.
    progress = await asyncio.wait_for(store.complete_soon("m1", [], begin_next="m2"), 2)
    assert progress.attempts_of("m2") == 1
    assert await asyncio.wait_for(store.begin_attempt("m3"), 2) == 1


async def test_close_commits_held_writes_at_once(open_store: OpenStore, db_path: Path) -> None:
    ticks = Ticks()
    store = await open_store(hold=60.0, timer=ticks)
    await store.add_messages([msg("m1")], begun={"m1"})
    await _callers_every(store, ticks, 0.005)
    completed = store.complete_soon("m1", ["r1"])
    await asyncio.sleep(0.01)
    assert not completed.done()  # held
    await asyncio.wait_for(store.close(), timeout=2)
    assert completed.done()
    assert query(db_path, "SELECT status FROM messages WHERE id = 'm1'") == [("processed",)]


async def test_close_flushes_then_refuses(open_store: OpenStore, db_path: Path) -> None:
    store = await open_store(linger=5.0)
    await _two_callers_at_once(store)
    write = asyncio.create_task(store.add_messages([msg("m1")]))
    await asyncio.sleep(0.01)  # the writer is now lingering for company
    assert not write.done()
    await asyncio.wait_for(store.close(), timeout=2)  # closing ends the linger at once
    assert await write == [True]
    await store.close()  # idempotent
    with pytest.raises(StoreError, match="closed"):
        await store.add_messages([msg("late")])
    with pytest.raises(StoreError, match="closed"):
        await store.counts()
    # Checkpointed into the file itself: a stopped tenant's store is one file to copy.
    assert not db_path.with_name(db_path.name + "-wal").exists()
    assert query(db_path, "SELECT COUNT(*) FROM messages") == [(3,)]


@pytest.mark.skipif(not hasattr(os, "SCHED_BATCH"), reason="Linux scheduling policies")
async def test_the_writer_thread_is_a_batch_thread(open_store: OpenStore) -> None:
    store = await open_store()
    await store.add_messages([msg("m1")])
    (writer,) = [t for t in threading.enumerate() if t.name == "store-writer:acme"]
    assert writer.native_id is not None
    # Its wake-up must not preempt the loop's thread, which hands it jobs holding the GIL.
    assert os.sched_getscheduler(writer.native_id) == os.SCHED_BATCH
    assert os.sched_getscheduler(0) == os.SCHED_OTHER  # the loop's thread is left as it was


# -- durability -------------------------------------------------------------------

WRITER = """
import asyncio, sys
from pathlib import Path
from chatq.tenant_worker.messages import Message
from chatq.tenant_worker.store import Store

async def writer(store, w):
    n = 0
    while True:
        ids = [f"w{w}-{n}-{i}" for i in range(10)]
        await store.add_messages([Message(i, f"c{w}", "x", "acme") for i in ids])
        print("acked", *ids, flush=True)
        n += 1

async def main():
    store = await Store.open(Path(sys.argv[1]), "acme")
    await asyncio.gather(*(writer(store, w) for w in range(4)))

asyncio.run(main())
"""


async def test_acked_rows_survive_sigkill(open_store: OpenStore, db_path: Path) -> None:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-c", WRITER, str(db_path), cwd=ROOT, stdout=asyncio.subprocess.PIPE
    )
    assert proc.stdout is not None
    lines: list[bytes] = []
    try:
        while len(lines) < 40:  # let it get well into writing, then kill mid-flight
            lines.append(await asyncio.wait_for(proc.stdout.readline(), timeout=20))
            assert lines[-1].startswith(b"acked"), lines[-1]
    finally:
        proc.send_signal(signal.SIGKILL)
        lines.extend((await proc.stdout.read()).split(b"\n")[:-1])  # drop a cut-off last line
        await proc.wait()
    assert proc.returncode == -signal.SIGKILL
    acked = {mid.decode() for line in lines for mid in line.split()[1:]}
    store = await open_store()
    stored = {s.message.id for s in await store.unfinished_messages()}
    assert len(acked) >= 10
    assert acked <= stored
