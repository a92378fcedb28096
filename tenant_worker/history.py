"""The read side of a tenant's store, for `chatq history`.

It opens the SQLite file read-only with plain sqlite3, so it works whether the
worker is running (WAL lets a reader in beside the writer) or stopped, and it
never creates or changes the file.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Mapping, Sequence
from contextlib import closing
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from chatq.shared.errors import StoreError
from chatq.shared.escape import printable
from chatq.shared.local_time import stamp_of
from chatq.tenant_worker.store import read_only_uri

__all__ = ["format_transcript", "read_history", "unfinished_counts"]


def read_history(
    path: Path, *, chat_id: str | None = None, limit: int = 50
) -> list[dict[str, Any]]:
    """The last `limit` messages (of one chat, if given), oldest first, with their replies."""
    if limit < 1:
        raise ValueError(f"limit must be >= 1, got {limit}")
    if not path.is_file():
        raise StoreError(f"no store at {path} (has tenant {path.stem} run yet?)")
    try:
        with closing(sqlite3.connect(read_only_uri(path), uri=True, timeout=5.0)) as conn:
            entries = _last_messages(conn, chat_id, limit)
            _attach_replies(conn, entries)
    except sqlite3.Error as exc:
        raise StoreError(f"store {path}: {' '.join(str(exc).split())}") from exc
    return entries


def unfinished_counts(path: Path) -> dict[str, int]:
    """Rows a worker still owes work on: messages queued or processing, replies pending.

    Zeros for a store that does not exist; StoreError if it cannot be read.
    """
    if not path.is_file():
        return {"messages": 0, "replies": 0}
    try:
        with closing(sqlite3.connect(read_only_uri(path), uri=True, timeout=5.0)) as conn:
            (messages,) = conn.execute(
                "SELECT COUNT(*) FROM messages WHERE status IN ('queued', 'processing')"
            ).fetchone()
            (replies,) = conn.execute(
                "SELECT COUNT(*) FROM replies WHERE status = 'pending'"
            ).fetchone()
    except sqlite3.Error as exc:
        raise StoreError(f"store {path}: {' '.join(str(exc).split())}") from exc
    return {"messages": messages, "replies": replies}


def _last_messages(
    conn: sqlite3.Connection, chat_id: str | None, limit: int
) -> list[dict[str, Any]]:
    where, params = ("WHERE chat_id = ?", [chat_id]) if chat_id is not None else ("", [])
    rows = conn.execute(
        "SELECT id, chat_id, sender, text, type, status, attempts, last_error, received_at"
        f" FROM messages {where} ORDER BY seq DESC LIMIT ?",
        [*params, limit],
    ).fetchall()
    keys = ("id", "chat_id", "from", "text", "type", "status", "attempts", "last_error")
    entries = []
    for row in reversed(rows):
        entry = dict(zip(keys, row[:8], strict=True))
        entry["received_at"] = iso_utc(row[8])
        entry["replies"] = []
        entries.append(entry)
    return entries


def _attach_replies(conn: sqlite3.Connection, entries: list[dict[str, Any]]) -> None:
    by_message = {entry["id"]: entry["replies"] for entry in entries}
    rows = conn.execute(
        "SELECT message_id, id, text, status, attempts, provider_id, last_error, sent_at"
        " FROM replies WHERE message_id IN (SELECT value FROM json_each(?)) ORDER BY id",
        [json.dumps(list(by_message))],
    )
    for message_id, rid, text, status, attempts, provider_id, last_error, sent_at in rows:
        by_message[message_id].append(
            {
                "id": rid,
                "text": text,
                "status": status,
                "attempts": attempts,
                "provider_id": provider_id,
                "last_error": last_error,
                "sent_at": iso_utc(sent_at),
            }
        )


def iso_utc(seconds: float | None) -> str | None:
    """Epoch seconds as ISO-8601 UTC with milliseconds, e.g. 2026-11-28T12:00:00.123Z."""
    if seconds is None:
        return None
    millis = round(seconds * 1000)  # round once, so .123 never prints as .122
    moment = datetime.fromtimestamp(millis // 1000, tz=UTC)
    return f"{moment:%Y-%m-%dT%H:%M:%S}.{millis % 1000:03d}Z"


def format_transcript(entries: Sequence[Mapping[str, Any]]) -> str:
    """Readable transcript, one block per chat (in order of first appearance).

    `2026-11-28 12:00:00  c1  <- [processed] hello` for a message, then
    `    -> [sent] hello` for each of its replies (with ``(error: ...)`` when a
    pending or failed one has a last error). Empty for no entries.
    """
    chats: dict[str, list[Mapping[str, Any]]] = {}
    for entry in entries:
        chats.setdefault(entry["chat_id"], []).append(entry)
    blocks = ["\n".join(_chat_lines(chat_entries)) for chat_entries in chats.values()]
    return "\n\n".join(blocks)


def _chat_lines(entries: Sequence[Mapping[str, Any]]) -> list[str]:
    lines = []
    for entry in entries:
        received = entry.get("received_at")
        when = _local(received) if received else "?" * 25
        kind = _flat(entry.get("type", "text"))
        shown = _flat(entry["text"]) if kind == "text" else f"({kind}) {_flat(entry['text'])}"
        line = f"{when}  {_flat(entry['chat_id'])}  <- [{entry['status']}] {shown.rstrip()}"
        if entry.get("last_error") and entry["status"] != "processed":
            line += f"  (error: {_flat(entry['last_error'])})"
        lines.append(line)
        lines.extend(_reply_line(reply) for reply in entry["replies"])
    return lines


def _reply_line(reply: Mapping[str, Any]) -> str:
    line = f"    -> [{reply['status']}] {_flat(reply['text'])}"
    if reply.get("last_error") and reply["status"] in ("pending", "failed"):
        line += f"  (error: {_flat(reply['last_error'])})"
    return line


def _local(iso: str) -> str:
    """The stored UTC time as local time with its offset, as all human output shows it."""
    return stamp_of(datetime.fromisoformat(iso.replace("Z", "+00:00")).astimezone())


def _flat(text: str) -> str:
    """Keep one entry on one line, and chat content's control characters harmless."""
    return printable(text)
