"""Store: failed messages and replies put back in line (`chatq retry` / `chatq resend`)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from chatq.shared.errors import RedriveRefused
from chatq.tenant_worker.messages import Message
from chatq.tenant_worker.store import Selection, Store

NOW = 1_800_000_000.0


def msg(mid: str, chat: str = "c1") -> Message:
    return Message(id=mid, chat_id=chat, text=f"text {mid}", tenant_id="acme")


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[Store]:
    """m1 failed (c1), m2 processed with a failed reply, m3 rejected (c2), m4 failed (c1)."""
    opened = await Store.open(tmp_path / "acme.sqlite3", "acme", clock=lambda: NOW)
    await opened.add_messages([msg("m1"), msg("m2"), msg("m4")])
    await opened.add_messages([msg("m3", "c2")], "rejected")
    for mid in ("m1", "m4"):
        await opened.begin_attempt(mid)
        await opened.fail(mid, "provider down", final=True)
    await opened.begin_attempt("m2")
    (reply,) = await opened.complete("m2", ["answer"])
    await opened.fail_reply(reply.id, "131000: try later")
    yield opened
    await opened.close()


async def statuses(store: Store) -> dict[str, tuple[str, int]]:
    rows = await store._read("SELECT id, status, attempts FROM messages ORDER BY seq")
    return {mid: (status, attempts) for mid, status, attempts in rows}


async def test_requeue_every_failed_and_rejected_in_arrival_order(store: Store) -> None:
    back = await store.requeue_failed(Selection())
    assert [(s.message.id, s.status, s.attempts) for s in back] == [
        ("m1", "failed", 1),
        ("m4", "failed", 1),
        ("m3", "rejected", 0),
    ]
    assert await statuses(store) == {
        "m1": ("queued", 0),
        "m2": ("processed", 1),
        "m4": ("queued", 0),
        "m3": ("queued", 0),
    }
    assert [s.message.id for s in await store.unfinished_messages()] == ["m1", "m4", "m3"]


async def test_requeue_one_chat_or_named_ids(store: Store) -> None:
    assert [s.message.id for s in await store.requeue_failed(Selection(chat="c2"))] == ["m3"]
    back = await store.requeue_failed(Selection(ids=("m4",)))
    assert [s.message.id for s in back] == ["m4"]
    assert (await statuses(store))["m1"] == ("failed", 1)


@pytest.mark.parametrize(
    ("ids", "error"),
    [
        (("m1", "m9"), "no such message: m9"),
        (("m1", "m2"), "message m2 is processed, not failed or rejected"),
    ],
)
async def test_a_wrong_id_changes_nothing(store: Store, ids: tuple[str, ...], error: str) -> None:
    before = await statuses(store)
    with pytest.raises(RedriveRefused, match=error):
        await store.requeue_failed(Selection(ids=ids))
    assert await statuses(store) == before


async def test_resend_failed_replies(store: Store) -> None:
    with pytest.raises(RedriveRefused, match="no such reply: 7"):
        await store.resend_failed(Selection(ids=(7,)))
    (reply,) = await store.resend_failed(Selection())
    assert (reply.message_id, reply.text, reply.attempts, reply.next_attempt_at) == (
        "m2",
        "answer",
        0,
        NOW,
    )
    assert [r.id for r in await store.pending_replies()] == [reply.id]
    with pytest.raises(RedriveRefused, match=f"reply {reply.id} is pending, not failed"):
        await store.resend_failed(Selection(ids=(reply.id,)))
    assert await store.resend_failed(Selection()) == []
