"""read_history / format_transcript: shape, order, limit, chat filter, read-only."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest
from fakes import FakeClock

from chatq.shared.errors import StoreError
from chatq.tenant_worker.history import format_transcript, iso_utc, read_history
from chatq.tenant_worker.messages import Message
from chatq.tenant_worker.store import Store

NOON = datetime(2026, 11, 28, 12, 0, 0, tzinfo=UTC).timestamp()


def msg(mid: str, chat: str = "c1", text: str = "hello", sender: str | None = None) -> Message:
    return Message(id=mid, chat_id=chat, text=text, tenant_id="acme", sender=sender)


@pytest.fixture
def db_path(tmp_path: Path) -> Path:
    return tmp_path / "acme.sqlite3"


@pytest.fixture
async def store(db_path: Path) -> AsyncIterator[Store]:
    store = await Store.open(db_path, "acme", clock=FakeClock(NOON + 0.123))
    yield store
    await store.close()


def test_iso_utc_rounds_to_milliseconds() -> None:
    assert iso_utc(NOON + 0.123) == "2026-11-28T12:00:00.123Z"
    assert iso_utc(NOON + 59.9996) == "2026-11-28T12:01:00.000Z"
    assert iso_utc(None) is None


async def test_entry_shape_with_replies(store: Store, db_path: Path) -> None:
    await store.add_messages([msg("m1", sender="alice")])
    await store.begin_attempt("m1")
    sent, unsent = await store.complete("m1", ["hi back", "and more"])
    await store.mark_sent(sent.id, "prov-9")
    assert read_history(db_path) == [
        {
            "id": "m1",
            "chat_id": "c1",
            "from": "alice",
            "text": "hello",
            "type": "text",
            "status": "processed",
            "attempts": 1,
            "last_error": None,
            "received_at": "2026-11-28T12:00:00.123Z",
            "replies": [
                {
                    "id": sent.id,
                    "text": "hi back",
                    "status": "sent",
                    "attempts": 1,
                    "provider_id": "prov-9",
                    "last_error": None,
                    "sent_at": "2026-11-28T12:00:00.123Z",
                },
                {
                    "id": unsent.id,
                    "text": "and more",
                    "status": "pending",
                    "attempts": 0,
                    "provider_id": None,
                    "last_error": None,
                    "sent_at": None,
                },
            ],
        }
    ]


async def test_last_messages_oldest_first_with_limit_and_chat(store: Store, db_path: Path) -> None:
    await store.add_messages([msg(f"m{i}", chat=f"c{i % 2}") for i in range(10)])
    assert [e["id"] for e in read_history(db_path)] == [f"m{i}" for i in range(10)]
    assert [e["id"] for e in read_history(db_path, limit=3)] == ["m7", "m8", "m9"]
    assert [e["id"] for e in read_history(db_path, chat_id="c0", limit=2)] == ["m6", "m8"]
    assert read_history(db_path, chat_id="nobody") == []


async def test_reads_beside_an_open_store_and_after_close(store: Store, db_path: Path) -> None:
    await store.add_messages([msg("m1")])
    assert [e["id"] for e in read_history(db_path)] == ["m1"]
    await store.add_messages([msg("m2")])  # the writer still works after our read
    await store.close()
    assert [e["id"] for e in read_history(db_path)] == ["m1", "m2"]


def test_missing_store_is_one_line_error_and_not_created(tmp_path: Path) -> None:
    path = tmp_path / "data" / "ghost.sqlite3"
    with pytest.raises(StoreError, match=r"^no store at .*ghost\.sqlite3 \(has tenant ghost") as e:
        read_history(path)
    assert "\n" not in str(e.value)
    assert not path.exists()
    assert not path.parent.exists()


def test_bad_limit_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="limit"):
        read_history(tmp_path / "x.sqlite3", limit=0)


@pytest.fixture
def kolkata(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Local time UTC+05:30: human output shows it, with its offset."""
    monkeypatch.setenv("TZ", "Asia/Kolkata")
    time.tzset()
    yield
    monkeypatch.undo()
    time.tzset()


@pytest.mark.usefixtures("kolkata")
async def test_transcript_groups_by_chat(store: Store, db_path: Path) -> None:
    await store.add_messages([msg("a1", "c1"), msg("b1", "c2", "line\nbreak"), msg("a2", "c1")])
    await store.begin_attempt("a1")
    [reply] = await store.complete("a1", ["hello"])
    await store.mark_sent(reply.id, "p1")
    await store.begin_attempt("b1")
    await store.fail("b1", "handler down", final=True)
    assert format_transcript(read_history(db_path)).splitlines() == [
        "2026-11-28 17:30:00 +0530  c1  <- [processed] hello",
        "    -> [sent] hello",
        "2026-11-28 17:30:00 +0530  c1  <- [queued] hello",
        "",
        "2026-11-28 17:30:00 +0530  c2  <- [failed] line\\nbreak  (error: handler down)",
    ]
    assert format_transcript([]) == ""


async def test_a_failed_reply_shows_its_last_error(store: Store, db_path: Path) -> None:
    await store.add_messages([msg("m1")])
    await store.begin_attempt("m1")
    doomed, waiting = await store.complete("m1", ["too late", "later"])
    await store.fail_reply(doomed.id, "131047: Re-engagement message")
    await store.retry_reply(waiting.id, "130429: rate limit hit", NOON + 5)
    (entry,) = read_history(db_path)
    assert [(r["status"], r["last_error"]) for r in entry["replies"]] == [
        ("failed", "131047: Re-engagement message"),
        ("pending", "130429: rate limit hit"),
    ]
    assert format_transcript([entry]).splitlines()[1:] == [
        "    -> [failed] too late  (error: 131047: Re-engagement message)",
        "    -> [pending] later  (error: 130429: rate limit hit)",
    ]
