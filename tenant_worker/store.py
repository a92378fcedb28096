"""The tenant's durable inbox and outbox: one SQLite file, group-committed writes.

Every inbound message and every reply is a row. A write is acknowledged only
once its transaction is committed with `synchronous=FULL` in WAL mode, so an
acknowledged row survives a crash or a power loss.

Group commit: each write method enqueues an operation and awaits its future.
One writer task takes every waiting operation (up to `max_batch`), lingers up
to `linger` seconds for more while the batch is not full, runs them all in
ONE transaction, commits, then resolves every caller. If the batch fails it
is rolled back and each operation is retried alone, so one bad operation
fails only its own caller.

The writer's connection lives on a thread of its own, and a whole
transaction (BEGIN, one statement per kind of operation, COMMIT) is one hop
to it. (aiosqlite makes every statement a round trip through the event
loop: under load each one queued behind the loop's callbacks while SQLite
sat idle.)

Operations waiting together are concurrent (no caller has its result yet), so
the writer may group them by kind, unless two of them touch the same row; then
it keeps their submission order.

The writes made per message (begin an attempt, complete, mark a reply sent)
are *gathered*: while the last such operation on its table is still waiting
for the writer, a new one joins it as one more entry and shares its future,
instead of being an operation, and a future, of its own (at 15k messages a
second that plumbing cost more than the SQL). An entry joins only an
operation nothing else on its table was queued after, and not one that
already touches its row, so the submission order the writer keeps is the
same as if each entry were an operation of its own.

Writes no caller is held up by (a completion whose chat has nothing waiting,
a reply marked sent) are *owed*: while callers' writes (new messages,
statuses, an attempt begun) come at least every `hold` seconds, an owed write
waits up to `hold` for the next one and shares its commit, instead of a
commit each. Under the gateway's steady stream of small forwards that is one
commit per forward instead of two or three. Under a trickle, or once callers
stop, nothing is held: a held completion delays its reply. Nothing
acknowledged waits: an ingest commit never holds.

Reads run on the writer's connection and thread too, between transactions,
so they see exactly what is committed. They are few and none is in a hurry
(the replay at start, retention's oldest message once a pass): a second
connection with a thread of its own cost every idle worker ~0.4 MB of
private memory for them.

A transient failure (disk full, locked, I/O error; tenant_worker/store_errors.py)
fails no caller that can be answered "later": new messages and delivery
statuses get `StoreUnavailable` (ingest answers 503, the sender retries),
while the writes the worker owes (attempts, completions, sends) wait and are
retried with backoff until they commit. A permanent failure fails its caller.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import math
import queue
import sqlite3
import threading
import time
from collections import deque
from collections.abc import Callable, Collection, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Generic, Self, TypeVar

from loguru import logger

from chatq.shared import json_codec
from chatq.shared.errors import RedriveRefused, StoreError, StoreUnavailable
from chatq.shared.thread_policy import run_as_batch
from chatq.tenant_worker.checkpoint import BACKSTOP_PAGES, Checkpointer
from chatq.tenant_worker.delivery import advance
from chatq.tenant_worker.messages import Message, Reply, StatusCounts, StatusUpdate, storable_text
from chatq.tenant_worker.store_errors import is_transient, one_line, store_error

__all__ = [
    "MESSAGE_STATUSES",
    "MIGRATIONS",
    "REPLY_STATUSES",
    "Progress",
    "Selection",
    "Store",
    "StoredMessage",
]

MESSAGE_STATUSES = ("queued", "processing", "processed", "failed", "rejected")
REPLY_STATUSES = ("pending", "sent", "delivered", "read", "failed")

_V1 = (
    """CREATE TABLE messages (
        seq         INTEGER PRIMARY KEY,  -- arrival order
        id          TEXT    NOT NULL UNIQUE,
        chat_id     TEXT    NOT NULL,
        sender      TEXT,
        text        TEXT    NOT NULL,
        ts          REAL,
        received_at REAL    NOT NULL,
        status      TEXT    NOT NULL CHECK (status IN
                        ('queued', 'processing', 'processed', 'failed', 'rejected')),
        attempts    INTEGER NOT NULL DEFAULT 0,
        last_error  TEXT,
        updated_at  REAL    NOT NULL
    )""",
    """CREATE TABLE replies (
        id              INTEGER PRIMARY KEY,
        message_id      TEXT    NOT NULL REFERENCES messages (id),
        chat_id         TEXT    NOT NULL,
        text            TEXT    NOT NULL,
        status          TEXT    NOT NULL CHECK (status IN ('pending', 'sent', 'failed')),
        attempts        INTEGER NOT NULL DEFAULT 0,
        next_attempt_at REAL    NOT NULL,
        provider_id     TEXT,
        last_error      TEXT,
        created_at      REAL    NOT NULL,
        sent_at         REAL
    )""",
    """CREATE INDEX messages_unfinished ON messages (seq)
        WHERE status IN ('queued', 'processing')""",
    "CREATE INDEX messages_by_chat ON messages (chat_id, seq)",
    "CREATE INDEX replies_pending ON replies (id) WHERE status = 'pending'",
    "CREATE INDEX replies_by_message ON replies (message_id)",
)

_REPLY_COLUMNS = (
    "id, message_id, chat_id, text, status, attempts, next_attempt_at, provider_id,"
    " last_error, created_at, sent_at"
)
# WhatsApp: a message's kind and raw object; replies move on to delivered and
# read. SQLite cannot change a CHECK, so `replies` is rebuilt (rows and indexes kept).
_V2 = (
    "ALTER TABLE messages ADD COLUMN type TEXT NOT NULL DEFAULT 'text'",
    "ALTER TABLE messages ADD COLUMN payload TEXT",  # JSON, or NULL
    """CREATE TABLE replies_v2 (
        id              INTEGER PRIMARY KEY,
        message_id      TEXT    NOT NULL REFERENCES messages (id),
        chat_id         TEXT    NOT NULL,
        text            TEXT    NOT NULL,
        status          TEXT    NOT NULL CHECK (status IN
                            ('pending', 'sent', 'delivered', 'read', 'failed')),
        attempts        INTEGER NOT NULL DEFAULT 0,
        next_attempt_at REAL    NOT NULL,
        provider_id     TEXT,
        last_error      TEXT,
        created_at      REAL    NOT NULL,
        sent_at         REAL
    )""",
    f"INSERT INTO replies_v2 ({_REPLY_COLUMNS}) SELECT {_REPLY_COLUMNS} FROM replies",
    "DROP TABLE replies",
    "ALTER TABLE replies_v2 RENAME TO replies",
    "CREATE INDEX replies_pending ON replies (id) WHERE status = 'pending'",
    "CREATE INDEX replies_by_message ON replies (message_id)",
    "CREATE INDEX replies_by_provider ON replies (provider_id)",  # statuses find them by it
)

# Retention (tenant_worker/retention.py) finds old rows by arrival time.
_V3 = ("CREATE INDEX messages_by_received ON messages (received_at)",)

# Statuses find replies by provider_id, which only a sent reply has: a reply
# stored pending then no longer adds an entry (at NULL) that its mark-sent
# moves, and a commit writes one index page fewer (bench/worker_bench.py).
_V4 = (
    "DROP INDEX replies_by_provider",
    "CREATE INDEX replies_by_provider ON replies (provider_id) WHERE provider_id IS NOT NULL",
)

# Forward migrations: entry N (0-based) takes the schema from user_version N
# to N + 1. Append only; never edit a released entry.
MIGRATIONS: tuple[tuple[str, ...], ...] = (_V1, _V2, _V3, _V4)

# Page cache per connection. Writes touch the tail of each table and index,
# reads are rare (replay, counts): SQLite's default 2 MiB per connection bought
# no throughput in bench/worker_bench.py and was 4 MB of a worker's 60 MB.
CACHE_KIB = 256
VACUUM_PAGES_MAX = 2000  # free pages one prune gives back (8 MB): bounds its transaction
_MESSAGE_COLUMNS = (
    "seq, id, chat_id, sender, text, ts, received_at, status, attempts, last_error, type, payload"
)

T = TypeVar("T")
G = TypeVar("G", bound="_Gathered[Any]")
# Backoff of the writes waiting out a transient failure. New messages try the
# store on every request anyway, so the first one after the fault commits.
RETRY_INITIAL = 0.05
RETRY_MAX = 1.0
BUSY_TIMEOUT = 5.0  # seconds SQLite waits for another process's lock
# How long an owed write (see the module doc) waits for company, while callers
# come that often: above the gap between a worker's answer and the gateway's
# next forward under load (~6 ms; at 5 ms a quarter of the commits were owed
# writes alone, bench/gateway_bench.py), far below what a person notices.
HOLD = 0.020
GAP_WEIGHT = 0.25  # of the newest gap between callers' commits in their running average


@dataclass(frozen=True, slots=True)
class StoredMessage:
    """A message as stored, with its place in arrival order and its progress."""

    message: Message
    seq: int
    status: str
    attempts: int
    last_error: str | None


@dataclass(eq=False, slots=True)
class Progress:
    """What one gathered progress write did, for each of its entries."""

    attempts: dict[str, int] = field(default_factory=dict)  # begun: id -> attempts now
    replies: dict[str, list[Reply]] = field(default_factory=dict)  # completed: id -> replies
    errors: dict[str, StoreError] = field(default_factory=dict)  # an entry's own failure
    where: str = ""  # the store, for the errors

    def attempts_of(self, message_id: str) -> int:
        """The attempt count `begin` gave this message; StoreError if it could not."""
        attempts = self.attempts.get(message_id)
        if attempts is None:
            raise self._error(message_id)
        return attempts

    def replies_of(self, message_id: str) -> list[Reply]:
        """The replies stored with this message's completion; StoreError if it failed."""
        replies = self.replies.get(message_id)
        if replies is None:
            raise self._error(message_id)
        return replies

    def _error(self, message_id: str) -> StoreError:
        error = self.errors.get(message_id)
        if error is None:
            return StoreError(f"{self.where}: no such entry: {message_id!r}")
        return StoreError(f"{self.where}: {error}")


@dataclass(frozen=True, slots=True)
class Selection:
    """Dead letters to put back (`chatq retry`/`resend`): these ids, or every one (of a chat)."""

    ids: tuple[str | int, ...] | None = None  # message ids (str) or reply ids (int)
    chat: str | None = None  # with ids None: only this chat's


class Store:
    """One tenant's SQLite store. Open with `await Store.open(...)`."""

    def __init__(
        self,
        path: Path,
        tenant_id: str,
        writer: _Writer,
        *,
        clock: Callable[[], float],
        linger: float,
        max_batch: int,
        hold: float = 0.0,
        busy_timeout: float = BUSY_TIMEOUT,
        timer: Callable[[], float] = time.monotonic,
    ) -> None:
        self.path = path
        self.tenant_id = tenant_id
        self.commits = 0  # committed write transactions; tests read it to see batching
        self.writes = 0  # callers' writes committed (not housekeeping): retention's pace
        self._db = writer
        self._clock = clock
        self._linger = linger
        self._hold = hold
        self._timer = timer
        self._caller_at = -math.inf  # when the last batch with callers was taken
        self._caller_gap = math.inf  # running average of the gaps between such batches
        self._max_batch = max_batch
        self._last_batch = 1  # callers in the previous batch, to judge when to linger
        self._pending: deque[_Op[Any]] = deque()
        # table -> the last op queued on it, if it gathers entries and is not taken yet
        self._open: dict[str, _Op[Any] | None] = {}
        self._wake = asyncio.Event()
        self._urgent = False  # a write a caller waits on is pending: commit without holding
        self._closing = False
        self._writer: asyncio.Task[None] | None = None
        self._close_task: asyncio.Task[None] | None = None
        self.unavailable: str | None = None  # why writes fail for now, while they do
        self._unavailable_since = 0.0
        self._retry_delay = RETRY_INITIAL
        self._checkpoints = Checkpointer(path, busy_timeout)

    @classmethod
    async def open(
        cls,
        path: Path,
        tenant_id: str,
        *,
        clock: Callable[[], float] = time.time,
        linger: float = 0.002,
        max_batch: int = 1000,
        hold: float = HOLD,
        busy_timeout: float = BUSY_TIMEOUT,
        timer: Callable[[], float] = time.monotonic,
    ) -> Store:
        """Open (creating and migrating if needed) the store file at `path`.

        `clock` stamps rows (epoch seconds); `timer` (monotonic) times the
        callers' cadence that owed writes are held by.

        StoreUnavailable if it cannot be opened for now (retry), StoreError for good.
        """
        if not linger >= 0:
            raise ValueError(f"linger must be >= 0, got {linger!r}")
        if not hold >= 0:
            raise ValueError(f"hold must be >= 0, got {hold!r}")
        if max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {max_batch!r}")
        writer = await _open_writer(path, tenant_id, busy_timeout)
        store = cls(
            path,
            tenant_id,
            writer,
            clock=clock,
            linger=linger,
            max_batch=max_batch,
            hold=hold,
            busy_timeout=busy_timeout,
            timer=timer,
        )
        store._writer = asyncio.create_task(store._write_loop(), name=f"store-writer:{tenant_id}")
        return store

    async def close(self) -> None:
        """Commit every write already submitted, stop the writer, close. Idempotent."""
        if self._close_task is None:
            self._closing = True
            self._wake.set()
            self._close_task = asyncio.create_task(self._shutdown())
        # Shielded: a cancelled caller must not cut the final flush short.
        await asyncio.shield(self._close_task)

    # -- writes ---------------------------------------------------------------

    async def add_messages(
        self, messages: Sequence[Message], status: str = "queued", *, begun: Collection[str] = ()
    ) -> list[bool]:
        """Store new messages; per message True if stored now, False if its id was known.

        Those whose id is in `begun` (new, status ``queued``) are stored
        ``processing`` with their first attempt counted: `begin_attempt` in
        the same commit, for messages that will run as soon as it is made.
        """
        _check_status(status, MESSAGE_STATUSES)
        if begun and status != "queued":
            raise ValueError("only queued messages can be stored with an attempt begun")
        return await self._submit(_AddMessages(list(messages), status, begun))

    async def begin_attempt(self, message_id: str) -> int:
        """Mark a message processing and count the attempt; returns the attempt count."""
        op = self._gather(_Progress, message_id)
        op.begins.append(message_id)
        self._urge()  # a handler waits to start
        return (await op.future).attempts_of(message_id)

    async def complete(self, message_id: str, replies: Sequence[str]) -> list[Reply]:
        """In one transaction: mark the message processed and store its pending replies."""
        return (await self.complete_soon(message_id, replies)).replies_of(message_id)

    def complete_soon(
        self, message_id: str, replies: Sequence[str], *, begin_next: str | None = None
    ) -> asyncio.Future[Progress]:
        """`complete` without waiting: its write's future (shared), `replies_of` tells.

        `begin_next`: also `begin_attempt` that message in the same commit
        (`attempts_of` tells): the next of a chat with a backlog starts as
        soon as this one is done, without a write of its own.
        """
        if isinstance(replies, str):
            raise TypeError("replies must be a sequence of strings, not one string")
        op = self._gather(_Progress, message_id, begin_next)
        op.completions.append((message_id, list(replies)))
        if begin_next is not None:
            op.begins.append(begin_next)
            self._urge()  # the chat's next message waits to start
        return op.future

    async def fail(self, message_id: str, error: str, *, final: bool) -> None:
        """Record a failed attempt: `failed` for good if final, else `queued` for a retry."""
        await self._submit(_Fail(message_id, storable_text(error), final))

    async def release(self, message_id: str, status: str = "queued") -> None:
        """Undo `begin_attempt` for a message whose attempt a drain cut short.

        The attempt is not counted (being stopped is not the message's
        fault) and the row gets `status`: ``queued``, or ``processing`` for
        one that must stay a crash suspect. A row no longer ``processing``
        is left as it is.
        """
        _check_status(status, ("queued", "processing"))
        await self._submit(_Release(message_id, status))

    async def add_reply(self, message_id: str, chat_id: str, text: str) -> Reply:
        """Store one pending reply to a stored message (e.g. a wait text)."""
        return await self._submit(_AddReply(message_id, chat_id, text))

    async def mark_sent(self, reply_id: int, provider_id: str) -> None:
        """Record that a reply was delivered; counts the attempt."""
        await self.mark_sent_soon(reply_id, provider_id)

    def mark_sent_soon(self, reply_id: int, provider_id: str) -> asyncio.Future[None]:
        """`mark_sent` without waiting: queue the write, return its outcome's future.

        The future is shared by the marks gathered into one write: it fails
        if any of them failed.
        """
        op = self._gather(_MarkSent, reply_id)
        op.marks.append((reply_id, provider_id))
        return op.future

    async def retry_reply(self, reply_id: int, error: str, next_attempt_at: float) -> None:
        """Record a failed send to try again at `next_attempt_at`; stays pending."""
        await self._submit(_RetryReply(reply_id, storable_text(error), next_attempt_at))

    async def fail_reply(self, reply_id: int, error: str) -> None:
        """Record that a reply cannot be delivered; counts the attempt."""
        await self._submit(_FailReply(reply_id, storable_text(error)))

    async def apply_statuses(self, updates: Sequence[StatusUpdate]) -> StatusCounts:
        """Move replies, found by provider_id, along their delivery statuses."""
        return await self.apply_statuses_soon(updates)

    def apply_statuses_soon(self, updates: Sequence[StatusUpdate]) -> asyncio.Future[StatusCounts]:
        """`apply_statuses` without waiting: queued now, so it can share a commit."""
        return self._enqueue(_ApplyStatuses(list(updates)))

    async def requeue_failed(self, selection: Selection) -> list[StoredMessage]:
        """Put failed and rejected messages back to ``queued``, attempts 0, in arrival order.

        Returns them as they were (their old status and attempts). RedriveRefused,
        changing nothing, if a named id is unknown or not failed/rejected.
        """
        rows = _check_redrive(await self._submit(_Requeue(selection)))
        return [self._stored_message(row) for row in rows]

    async def resend_failed(self, selection: Selection) -> list[Reply]:
        """Put failed replies back to ``pending``, attempts 0, due now, oldest first.

        RedriveRefused, changing nothing, if a named id is unknown or not failed.
        """
        rows = _check_redrive(await self._submit(_Resend(selection)))
        return [Reply(*row) for row in rows]

    async def prune(self, cutoff: float, limit: int) -> int:
        """Delete up to `limit` finished messages received before `cutoff`, with their replies.

        Finished: processed, failed or rejected, and no reply still pending.
        Returns how many messages went. It shares a group commit with the
        writes waiting beside it, and gives the pages it freed back to the
        file system in the same transaction (incremental vacuum).
        """
        return await self._submit(_Prune(cutoff, limit))

    # -- reads ----------------------------------------------------------------

    async def oldest_received_at(self) -> float | None:
        """When the oldest stored message arrived (epoch seconds); None if there is none."""
        rows = await self._read("SELECT MIN(received_at) FROM messages")
        return None if rows[0][0] is None else float(rows[0][0])

    def size_bytes(self) -> int:
        """The store on disk: its file and write-ahead log."""
        total = 0
        for file in (self.path, self.path.with_name(self.path.name + "-wal")):
            with contextlib.suppress(FileNotFoundError):
                total += file.stat().st_size
        return total

    async def unfinished_messages(self) -> list[StoredMessage]:
        """Messages still queued or processing, in arrival order (for replay)."""
        rows = await self._read(
            f"SELECT {_MESSAGE_COLUMNS} FROM messages"
            " WHERE status IN ('queued', 'processing') ORDER BY seq"
        )
        return [self._stored_message(row) for row in rows]

    async def pending_replies(self) -> list[Reply]:
        """Replies not yet sent nor given up, oldest first."""
        rows = await self._read(
            "SELECT id, message_id, chat_id, text, attempts, next_attempt_at"
            " FROM replies WHERE status = 'pending' ORDER BY id"
        )
        return [Reply(*row) for row in rows]

    async def counts(self) -> dict[str, int]:
        """Number of messages per status; every status is a key."""
        rows = await self._read("SELECT status, COUNT(*) FROM messages GROUP BY status")
        result = dict.fromkeys(MESSAGE_STATUSES, 0)
        result.update({status: count for status, count in rows})
        return result

    # -- internals ------------------------------------------------------------

    async def _submit(self, op: _Op[T]) -> T:
        # If this caller is cancelled the write still happens; only the wait ends.
        return await self._enqueue(op)

    def _enqueue(self, op: _Op[T]) -> asyncio.Future[T]:
        if self._closing:
            raise StoreError(f"store {self.path}: closed")
        self._pending.append(op)
        self._open[op.TABLE] = op if isinstance(op, _Gathered) else None
        if op.urgent():
            self._urge()
        elif len(self._pending) == 1:
            self._wake.set()  # an idle writer starts holding it
        return op.future

    def _urge(self) -> None:
        self._urgent = True
        self._wake.set()

    def _gather(self, kind: type[G], row: str | int, other: str | int | None = None) -> G:
        """The open op of `kind` to add an entry on `row` (and `other`) to; a new one if none.

        Joining the open op is the same as queueing right after it: nothing
        on its table was queued since. Never two entries on one row: one
        statement must not touch a row twice.
        """
        if self._closing:
            raise StoreError(f"store {self.path}: closed")
        op = self._open.get(kind.TABLE)
        if not isinstance(op, kind) or row in op.touched or other in op.touched:
            op = kind()
            self._enqueue(op)
        op.touched.add(row)
        if other is not None:
            op.touched.add(other)
        return op

    async def _read(self, sql: str) -> list[tuple[Any, ...]]:
        if self._closing:
            raise StoreError(f"store {self.path}: closed")
        try:
            return await self._db.run(_fetch_all, sql)
        except sqlite3.Error as exc:
            raise store_error(self.path, exc) from exc

    def _stored_message(self, row: tuple[Any, ...]) -> StoredMessage:
        seq, mid, chat_id, sender, text, ts, received_at, status, attempts, last_error = row[:10]
        kind, payload = row[10], json.loads(row[11]) if row[11] is not None else None
        message = Message(
            mid, chat_id, text, self.tenant_id, sender, ts, received_at, kind, payload
        )
        return StoredMessage(message, seq, status, attempts, last_error)

    async def _shutdown(self) -> None:
        if self._writer is not None:
            await self._writer
        await self._checkpoints.close()
        # The read-write connection last: the last one to close checkpoints
        # the WAL into the file and deletes it.
        await self._db.close()

    async def _write_loop(self) -> None:
        while self._pending or not self._closing:
            if not self._pending:
                self._wake.clear()
                await self._wake.wait()
                continue
            await self._hold_owed()
            await self._commit(await self._take_batch())

    async def _hold_owed(self) -> None:
        """Only owed writes are waiting: give a caller's write up to `hold` s to join them.

        Only while callers come that often (see the module doc).
        """
        if not self._callers_due():
            return
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._hold
        while not (self._urgent or self._closing):
            remaining = deadline - loop.time()
            if remaining <= 0:
                return
            self._wake.clear()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(remaining):
                    await self._wake.wait()

    def _callers_due(self) -> bool:
        """Whether callers' writes have been coming at least every `hold` s, and still do."""
        return self._caller_gap <= self._hold and self._timer() - self._caller_at <= self._hold

    def _saw_callers(self, count: int) -> None:
        """A batch with `count` callers was taken: the load the next linger and hold judge by."""
        self._last_batch = count
        now = self._timer()
        gap, self._caller_at = now - self._caller_at, now
        if math.isinf(self._caller_gap):
            self._caller_gap = gap  # still inf after the first batch
        else:
            self._caller_gap += (gap - self._caller_gap) * GAP_WEIGHT

    async def _take_batch(self) -> list[_Op[Any]]:
        """Take what is waiting, lingering (bounded) for more while the batch is small.

        Small means fewer waiting callers than the previous batch carried: the
        load just seen says more are coming. Callers that all waited on the
        last commit resubmit together, so a steady closed-loop load rarely
        pays it, and a lone caller after a lone caller (the gateway's one
        post at a time) never does. Owed writes are not callers: they only
        ride along (`_hold_owed`), so they neither start a linger nor raise
        the next one's target (they did: a gateway forward's ~4 ms commit
        spent 0.9-2.0 ms lingering, BENCHMARKS.md, gateway fourth pass).
        """
        batch: list[_Op[Any]] = []
        size = 0  # rows: a gathered op counts its entries
        deadline = asyncio.get_running_loop().time() + self._linger
        while True:
            while self._pending and size < self._max_batch:
                batch.append(self._pending.popleft())
                size += batch[-1].size()
            self._open.clear()  # taken: what comes now is a new write
            self._urgent = any(op.urgent() for op in self._pending)
            callers = sum(op.size() for op in batch if op.urgent() and not op.BACKGROUND)
            remaining = deadline - asyncio.get_running_loop().time()
            if not 0 < callers < min(self._max_batch, self._last_batch) or (
                size >= self._max_batch or self._closing or remaining <= 0
            ):
                if callers:  # owed writes alone say nothing about the load to come
                    self._saw_callers(callers)
                return batch
            self._wake.clear()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(remaining):
                    await self._wake.wait()

    async def _commit(self, batch: list[_Op[Any]]) -> None:
        """Run a batch in one transaction; on failure retry each op alone."""
        try:
            await self._transaction(batch)
        except Exception as exc:
            if is_transient(exc):
                await self._wait_out(batch, exc)
            elif len(batch) > 1:
                for op in batch:
                    await self._commit([op])
            else:
                batch[0].reject(self._error(batch[0], exc))
            return
        self._available_again()
        self.commits += 1
        self.writes += sum(not op.BACKGROUND for op in batch)
        self._checkpoints.after_commit()
        for op in batch:
            op.settle(f"store {self.path}")

    async def _wait_out(self, batch: list[_Op[Any]], exc: Exception) -> None:
        """A transient failure: refuse what can be sent again, retry the rest later.

        Nothing of the batch was written (its transaction rolled back). While
        closing, nothing waits: an owed write not made is redone after the
        next start (a message still `processing` is replayed).
        """
        reason = one_line(exc)
        if self.unavailable is None:
            self._unavailable_since = time.monotonic()
            logger.warning("store unavailable ({}): new messages get 503; retrying", reason)
        self.unavailable = reason
        error = StoreUnavailable(f"store {self.path}: {reason}")
        owed: list[_Op[Any]] = []
        self._open.clear()  # they go back to the front: nothing joins them there
        for op in batch:
            if op.REFUSABLE or self._closing:
                op.reject(error)
            else:
                owed.append(op)
        if owed:
            self._pending.extendleft(reversed(owed))  # first again, in their order
            await asyncio.sleep(self._retry_delay)
            self._retry_delay = min(self._retry_delay * 2, RETRY_MAX)

    def _available_again(self) -> None:
        self._retry_delay = RETRY_INITIAL
        if self.unavailable is not None:
            took = time.monotonic() - self._unavailable_since
            logger.info("store available again after {:.1f}s", took)
            self.unavailable = None

    async def _transaction(self, batch: list[_Op[Any]]) -> None:
        await self._db.run(_transaction, batch, self._clock())

    def _error(self, op: _Op[Any], exc: Exception) -> StoreError:
        if isinstance(exc, StoreError):
            return exc
        return store_error(self.path, exc, op.NAME)


# -- opening ------------------------------------------------------------------


class _Writer:
    """The writer's sqlite3 connection, used only on its own thread.

    Jobs go to the thread through a queue and come back as a callback on the
    loop: a plain future per job, where `run_in_executor` made a concurrent
    future, its chaining and the executor's locks (~40 us of the loop's CPU
    per commit). A job runs even if its caller stopped waiting.
    """

    def __init__(self, tenant_id: str) -> None:
        self._jobs: queue.SimpleQueue[_Job | None] = queue.SimpleQueue()
        self._thread = threading.Thread(
            target=self._serve, name=f"store-writer:{tenant_id}", daemon=True
        )
        self._conn: sqlite3.Connection | None = None

    async def connect(self, path: Path, busy_timeout: float) -> None:
        self._thread.start()
        self._conn = await self._call(_connect_writer, path, busy_timeout)

    async def run(self, fn: Callable[..., T], *args: Any) -> T:
        """``fn(connection, *args)`` on the writer's thread."""
        assert self._conn is not None, "not connected"
        return await self._call(fn, self._conn, *args)

    async def close(self) -> None:
        """Close the connection (quietly) and end the thread."""
        if self._conn is not None:
            with contextlib.suppress(Exception):
                await self.run(sqlite3.Connection.close)
            self._conn = None
        if self._thread.is_alive():
            self._jobs.put(None)

    def _call(self, fn: Callable[..., T], *args: Any) -> asyncio.Future[T]:
        loop = asyncio.get_running_loop()
        future: asyncio.Future[T] = loop.create_future()
        self._jobs.put((loop, future, fn, args))
        return future

    def _serve(self) -> None:
        run_as_batch()  # the loop's hand-over must not be preempted (shared/thread_policy.py)
        while (job := self._jobs.get()) is not None:
            loop, future, fn, args = job
            try:
                result = fn(*args)
            except BaseException as exc:  # handed to the caller, as an executor would
                _hand_back(loop, _settle_error, future, exc)
            else:
                _hand_back(loop, _settle_result, future, result)


_Job = tuple[asyncio.AbstractEventLoop, "asyncio.Future[Any]", Callable[..., Any], tuple[Any, ...]]


def _hand_back(loop: asyncio.AbstractEventLoop, settle: Callable[..., None], *args: Any) -> None:
    with contextlib.suppress(RuntimeError):  # the loop is closed: nobody waits any more
        loop.call_soon_threadsafe(settle, *args)


def _settle_result(future: asyncio.Future[Any], result: Any) -> None:
    if not future.done():  # its caller may have been cancelled
        future.set_result(result)


def _settle_error(future: asyncio.Future[Any], exc: BaseException) -> None:
    if not future.done():
        future.set_exception(exc)


def _connect_writer(path: Path, busy_timeout: float) -> sqlite3.Connection:
    _make_folder(path)
    conn = sqlite3.connect(
        path, isolation_level=None, timeout=busy_timeout, cached_statements=_STATEMENTS
    )
    try:
        if not _is_current(conn):
            _prepare_file(conn, path)
        _make_private(path)
        # FULL: a commit is on disk before we acknowledge it, even across power loss.
        conn.execute("PRAGMA synchronous = FULL")
        conn.execute("PRAGMA foreign_keys = ON")
        conn.execute(f"PRAGMA cache_size = -{CACHE_KIB}")
        # Checkpoints run beside the writer (checkpoint.py); its own is a backstop.
        conn.execute(f"PRAGMA wal_autocheckpoint = {BACKSTOP_PAGES}")
    except BaseException:
        conn.close()
        raise
    return conn


def _transaction(db: sqlite3.Connection, batch: list[_Op[Any]], now: float) -> None:
    """On the writer's thread: apply `batch` in one transaction, or none of it."""
    db.execute("BEGIN IMMEDIATE")
    try:
        for run in _runs(batch):
            type(run[0]).run_many(db, run, now)
        db.commit()
    except BaseException:
        db.rollback()
        raise


async def _open_writer(path: Path, tenant_id: str, busy_timeout: float) -> _Writer:
    """The writer's connection, schema migrated; any failure is one StoreError line."""
    writer = _Writer(tenant_id)
    try:
        await writer.connect(path, busy_timeout)
    except BaseException as exc:
        await writer.close()
        if isinstance(exc, OSError | sqlite3.Error):
            raise store_error(path, exc) from exc
        raise
    return writer


def _fetch_all(db: sqlite3.Connection, sql: str) -> list[tuple[Any, ...]]:
    """On the writer's thread, between its transactions: a read."""
    return [tuple(row) for row in db.execute(sql).fetchall()]


def _make_folder(path: Path) -> None:
    try:
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)  # chat content: ours only
    except OSError as exc:
        kind = StoreUnavailable if is_transient(exc) else StoreError
        raise kind(f"store {path}: cannot create folder {path.parent}: {exc.strerror}") from exc


def _is_current(conn: sqlite3.Connection) -> bool:
    """Whether the file is already what `_prepare_file` makes it (three reads, no write).

    The usual start: a worker's boot then needs no second connection, no
    write transaction and no checkpoint of it.
    """
    return bool(
        conn.execute("PRAGMA user_version").fetchone()[0] == len(MIGRATIONS)
        and conn.execute("PRAGMA auto_vacuum").fetchone()[0] == 2
        and conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    )


def _prepare_file(conn: sqlite3.Connection, path: Path) -> None:
    """Switch a new or older file to WAL (a lasting setting) and migrate it."""
    _incremental_vacuum(conn)
    mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
    if mode != "wal":
        raise StoreError(f"store {path}: cannot use WAL journal mode (got {mode})")
    _migrate(conn, path)


def _incremental_vacuum(conn: sqlite3.Connection) -> None:
    """auto_vacuum = INCREMENTAL, so pruned stores shrink (`Store.vacuum`).

    A new file takes it before its first table; an older one needs one full
    VACUUM (a rewrite of the file, once, at the first start that has this).
    """
    if conn.execute("PRAGMA auto_vacuum").fetchone()[0] == 2:
        return
    conn.execute("PRAGMA auto_vacuum = INCREMENTAL")
    if conn.execute("SELECT COUNT(*) FROM sqlite_master").fetchone()[0]:
        conn.execute("VACUUM")


def _make_private(path: Path) -> None:
    """Mode 0600 for a store made readable to others before (SQLite's WAL and SHM
    files take the store's mode when they are created)."""
    for file in (path, path.with_name(path.name + "-wal"), path.with_name(path.name + "-shm")):
        with contextlib.suppress(FileNotFoundError):
            if file.stat().st_mode & 0o077:
                file.chmod(0o600)


def _migrate(conn: sqlite3.Connection, path: Path) -> None:
    """Apply the migrations this file lacks, all in one transaction."""
    conn.execute("BEGIN IMMEDIATE")  # read and bump the version under the write lock
    try:
        version = conn.execute("PRAGMA user_version").fetchone()[0]
        if version > len(MIGRATIONS):
            raise StoreError(
                f"store {path}: schema version {version} is newer than this chatq knows"
                f" ({len(MIGRATIONS)}); upgrade chatq"
            )
        for statements in MIGRATIONS[version:]:
            for statement in statements:
                conn.execute(statement)
        conn.execute(f"PRAGMA user_version = {len(MIGRATIONS)}")
        conn.commit()
    except BaseException:
        conn.rollback()
        raise


def read_only_uri(path: Path) -> str:
    """A SQLite URI that opens `path` read-only and never creates it."""
    return f"{path.resolve().as_uri()}?mode=ro"


def _check_status(status: str, allowed: Sequence[str]) -> None:
    if status not in allowed:
        raise ValueError(f"status must be one of {', '.join(allowed)}; got {status!r}")


# -- operations ---------------------------------------------------------------


def _fetch(db: sqlite3.Connection, sql: str, *params: Any) -> list[tuple[Any, ...]]:
    return [tuple(row) for row in db.execute(sql, params).fetchall()]


def _stored_ids(db: sqlite3.Connection, ids: list[str]) -> set[str]:
    """Those of `ids` that are stored messages."""
    sql = "SELECT id FROM messages WHERE id IN (SELECT value FROM json_each(?))"
    return {row[0] for row in _fetch(db, sql, _json(ids))}


def _json(rows: Any) -> str:
    return json.dumps(rows, ensure_ascii=False, allow_nan=False)


def _insert_rows(db: sqlite3.Connection, insert: str, rows: list[tuple[Any, ...]]) -> None:
    """Run ``insert`` ("INSERT INTO t (c1, ..., cN)") for every row, in order."""
    _values_statements(db, insert, rows, "")


def _values_statements(
    db: sqlite3.Connection, head: str, rows: Sequence[tuple[Any, ...]], tail: str
) -> list[tuple[Any, ...]]:
    """Run ``head VALUES (row), (row), ... tail`` over `rows`, in order; the rows
    its ``RETURNING`` tail returns (a tail is one).

    Rows go as bound parameters of multi-row statements, one sqlite3 call
    per `_chunks` chunk. (A statement over a JSON array, ``json_each``, costs
    the encoding in Python and the parsing in SQLite: 20-30 us more per
    statement at the few rows of a gateway forward, ~3 us more per row at 100.)
    """
    out: list[tuple[Any, ...]] = []
    for chunk in _chunks(rows):
        sql = _values_sql(head, len(chunk), len(chunk[0]), tail)
        cursor = db.execute(sql, [value for row in chunk for value in row])
        if tail:
            out.extend(cursor.fetchall())
    return out


def _in_statements(
    db: sqlite3.Connection, sql: str, first: Sequence[Any], ids: Sequence[Any]
) -> list[tuple[Any, ...]]:
    """Run `sql`, whose ``{ids}`` is ``(?, ?, ...)``, over `ids` in chunks; its rows.

    `first`: the parameters before the list. Every chunk is its own statement.
    """
    out: list[tuple[Any, ...]] = []
    for chunk in _chunks(ids):
        text = _in_sql(sql, len(chunk))
        out.extend(db.execute(text, [*first, *chunk]).fetchall())
    return out


# A run of rows is cut into chunks: up to `_EXACT_MAX` rows, one chunk of
# exactly that many (a gateway forward carries ~5 messages: one statement a
# kind, not a 4 and a 1; 12-15 % less of the store's CPU per commit at 3-5
# rows); beyond, chunks of 2**k rows, at most `_CHUNK_MAX`. So nine statement
# texts per kind (1-8 rows, 16), which the connection's statement cache
# (`_STATEMENTS`) keeps prepared (a text per row count would be prepared anew
# each time). Prepared statements of up to 64 rows held ~0.8 MB, of up to 16
# about half (sizes 1-8 added ~0.2 MB); a sqlite3 call more per 16 rows costs
# < 1 us a message.
_EXACT_MAX = 8
_CHUNK_MAX = 16
_STATEMENTS = 256  # the cache's size (sqlite3's default, 128, is near what we use)


def _chunks(rows: Sequence[T]) -> Iterable[Sequence[T]]:
    start, left = 0, len(rows)
    while left:
        size = left if left <= _EXACT_MAX else min(_CHUNK_MAX, 1 << (left.bit_length() - 1))
        yield rows[start : start + size]
        start, left = start + size, left - size


@functools.cache
def _values_sql(head: str, rows: int, width: int, tail: str) -> str:
    row = f"({', '.join('?' * width)})"
    return f"{head} VALUES {', '.join([row] * rows)}{tail}"


@functools.cache
def _in_sql(sql: str, count: int) -> str:
    return sql.replace("{ids}", f"({', '.join('?' * count)})")


def _runs(batch: list[_Op[Any]]) -> list[list[_Op[Any]]]:
    """Split a batch into runs of one kind, each run one set-based statement.

    Without two ops on one row, ops of a kind are grouped whatever their
    order. Otherwise submission order is kept, and a run ends before a row
    it already touches: one statement must not touch a row twice.
    """
    keys = [key for op in batch for key in op.rows()]
    if len(keys) == len(set(keys)):
        by_kind: dict[type[_Op[Any]], list[_Op[Any]]] = {}
        for op in batch:
            by_kind.setdefault(type(op), []).append(op)
        return list(by_kind.values())
    runs: list[list[_Op[Any]]] = []
    touched: set[Any] = set()
    for op in batch:
        rows = set(op.rows())
        if not runs or type(op) is not type(runs[-1][0]) or not rows.isdisjoint(touched):
            runs.append([])
            touched = set()
        runs[-1].append(op)
        touched |= rows
    return runs


@dataclass(eq=False)
class _Op(Generic[T]):
    """One caller's write. `run_many` sets each op's outcome; `settle` hands it over.

    Each kind runs as one statement over a JSON array of all its ops' rows
    (``json_each``): SQLite does the whole run in one call, giving up and
    taking back the GIL once rather than once per row (``executemany``),
    and each take-back can wait for the busy event loop.
    """

    NAME: ClassVar[str]
    # Refused (not retried) while the store is unavailable: its caller can be
    # answered "later" (503) and sends it again.
    REFUSABLE: ClassVar[bool] = False
    TABLE: ClassVar[str] = "messages"
    BACKGROUND: ClassVar[bool] = False  # housekeeping no caller waits on for an answer
    OWED: ClassVar[bool] = False  # no caller is held up by it: it may wait for company
    future: asyncio.Future[T] = field(init=False, repr=False)
    outcome: T | StoreError = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self.future = asyncio.get_running_loop().create_future()

    def rows(self) -> Iterable[tuple[str, str | int]]:
        """The (table, id) rows this op reads or writes."""
        raise NotImplementedError

    def size(self) -> int:
        """How many callers' writes this op carries."""
        return 1

    def urgent(self) -> bool:
        """Whether to commit as soon as the writer can (see `Store._hold_owed`)."""
        return not self.OWED

    @classmethod
    def run_many(cls, db: sqlite3.Connection, ops: Sequence[Self], now: float) -> None:
        """Apply `ops` (all of this kind, no row twice) inside the open transaction."""
        raise NotImplementedError

    def settle(self, where: str) -> None:
        """Hand the committed outcome to the caller; `where` prefixes an error."""
        if isinstance(self.outcome, StoreError):
            self.reject(StoreError(f"{where}: {self.outcome}"))
        elif not self.future.done():
            self.future.set_result(self.outcome)

    def reject(self, error: StoreError) -> None:
        if not self.future.done():
            self.future.set_exception(error)

    def unknown(self, row_id: str | int) -> StoreError:
        noun = "message" if self.TABLE == "messages" else "reply"
        return StoreError(f"{self.NAME}: unknown {noun} id {row_id!r}")


@dataclass(eq=False)
class _AddMessages(_Op[list[bool]]):
    NAME = "add_messages"
    REFUSABLE = True
    messages: list[Message]
    status: str
    begun: Collection[str] = ()  # ids stored `processing`, attempt 1

    def rows(self) -> Iterable[tuple[str, str | int]]:
        return [("messages", message.id) for message in self.messages]

    @classmethod
    def run_many(cls, db: sqlite3.Connection, ops: Sequence[Self], now: float) -> None:
        rows: list[tuple[Any, ...]] = []
        for op in ops:
            for m in op.messages:
                begun = m.id in op.begun
                status = "processing" if begun else op.status
                rows.append((*_message_row(m, now), status, int(begun), now))
        # A known id (stored before, or earlier in this run) is not inserted,
        # and not returned: the first of each new id is the one stored.
        new = {
            row[0]
            for row in _values_statements(
                db,
                "INSERT INTO messages (id, chat_id, sender, text, ts, received_at, type, payload,"
                " status, attempts, updated_at)",
                rows,
                " ON CONFLICT (id) DO NOTHING RETURNING id",
            )
        }
        for op in ops:
            fresh = []
            for m in op.messages:
                fresh.append(m.id in new)
                new.discard(m.id)
            op.outcome = fresh


def _message_row(m: Message, now: float) -> tuple[Any, ...]:
    # A lone surrogate in a provider's payload is kept as its escape (json_codec).
    payload = None if m.payload is None else json_codec.dumps(m.payload).decode()
    return (m.id, m.chat_id, m.sender, m.text, m.ts, m.received_at or now, m.type, payload)


def _insert_replies(
    db: sqlite3.Connection, specs: list[tuple[str, str, str]], now: float
) -> list[Reply]:
    """Insert pending replies (message_id, chat_id, text), due now; returns them with ids."""
    if not specs:
        return []
    # The writer is the only one writing, inside BEGIN IMMEDIATE: ids are ours to pick.
    first = (_fetch(db, "SELECT COALESCE(MAX(id), 0) + 1 FROM replies"))[0][0]
    replies = [Reply(first + i, *spec, next_attempt_at=now) for i, spec in enumerate(specs)]
    _insert_rows(
        db,
        "INSERT INTO replies (id, message_id, chat_id, text, status, next_attempt_at, created_at)",
        [(r.id, r.message_id, r.chat_id, r.text, "pending", now, now) for r in replies],
    )
    return replies


@dataclass(eq=False)
class _Gathered(_Op[T]):
    """An op that takes more entries while it waits (see `Store._gather`)."""

    touched: set[str | int] = field(init=False, repr=False, default_factory=set)

    def rows(self) -> Iterable[tuple[str, str | int]]:
        return [(self.TABLE, row) for row in self.touched]

    def size(self) -> int:
        return len(self.touched)


@dataclass(eq=False)
class _Progress(_Gathered[Progress]):
    """Messages' progress: attempts begun, completions (processed + their replies)."""

    NAME = "progress"
    OWED = True  # completions are; an attempt begun is not (`urgent`)
    begins: list[str] = field(default_factory=list)
    completions: list[tuple[str, list[str]]] = field(default_factory=list)

    def urgent(self) -> bool:
        return bool(self.begins)  # a handler waits to start

    def __post_init__(self) -> None:
        super().__post_init__()
        self.outcome = Progress()

    def settle(self, where: str) -> None:
        assert isinstance(self.outcome, Progress)
        self.outcome.where = where
        super().settle(where)

    @classmethod
    def run_many(cls, db: sqlite3.Connection, ops: Sequence[Self], now: float) -> None:
        # Completions first: a chat's next message is begun once the one before is done.
        if any(op.completions for op in ops):
            _complete(db, ops, now)
        begins = [mid for op in ops for mid in op.begins]
        if begins:
            sql = (
                "UPDATE messages SET status = 'processing', attempts = attempts + 1,"
                " updated_at = ? WHERE id IN {ids} RETURNING id, attempts"
            )
            attempts = dict(_in_statements(db, sql, (now,), begins))
            for op in ops:
                progress = _progress(op)
                for mid in op.begins:
                    if mid in attempts:
                        progress.attempts[mid] = attempts[mid]
                    else:
                        progress.errors[mid] = op.unknown(mid)


def _progress(op: _Progress) -> Progress:
    assert isinstance(op.outcome, Progress)
    return op.outcome


def _complete(db: sqlite3.Connection, ops: Sequence[_Progress], now: float) -> None:
    """Mark the completed messages processed and store their replies, pending."""
    sql = (
        "UPDATE messages SET status = 'processed', last_error = NULL, updated_at = ?"
        " WHERE id IN {ids} RETURNING id, chat_id"
    )
    ids = [mid for op in ops for mid, _ in op.completions]
    chats = dict(_in_statements(db, sql, (now,), ids))
    specs = [
        (mid, chats[mid], text)
        for op in ops
        for mid, texts in op.completions
        if mid in chats
        for text in texts
    ]
    replies = iter(_insert_replies(db, specs, now))
    for op in ops:
        progress = _progress(op)
        for mid, texts in op.completions:
            if mid in chats:
                progress.replies[mid] = [next(replies) for _ in texts]
            else:
                progress.errors[mid] = op.unknown(mid)


@dataclass(eq=False)
class _AddReply(_Op[Reply]):
    NAME = "add_reply"
    message_id: str
    chat_id: str
    text: str

    def rows(self) -> Iterable[tuple[str, str | int]]:
        return [("messages", self.message_id)]  # reads it; its reply is a new row

    @classmethod
    def run_many(cls, db: sqlite3.Connection, ops: Sequence[Self], now: float) -> None:
        known = _stored_ids(db, [op.message_id for op in ops])
        done = [op for op in ops if op.message_id in known]
        for op in ops:
            if op.message_id not in known:
                op.outcome = op.unknown(op.message_id)
        specs = [(op.message_id, op.chat_id, op.text) for op in done]
        for op, reply in zip(done, _insert_replies(db, specs, now), strict=True):
            op.outcome = reply


@dataclass(eq=False)
class _RowUpdate(_Op[None]):
    """An update of one existing row by id.

    `SET` assigns from ``j.value ->> N``: item N of `params(now)` (item 0 is
    the id), so a whole run is one ``UPDATE ... FROM json_each``.
    """

    SET: ClassVar[str]

    def row_id(self) -> str | int:
        raise NotImplementedError

    def rows(self) -> Iterable[tuple[str, str | int]]:
        return [(self.TABLE, self.row_id())]

    def params(self, now: float) -> tuple[Any, ...]:
        raise NotImplementedError

    @classmethod
    def run_many(cls, db: sqlite3.Connection, ops: Sequence[Self], now: float) -> None:
        sql = (
            f"UPDATE {cls.TABLE} SET {cls.SET} FROM json_each(?) AS j"
            f" WHERE {cls.TABLE}.id = j.value ->> 0 RETURNING {cls.TABLE}.id"
        )
        rows = _json([op.params(now) for op in ops])
        known = {row[0] for row in _fetch(db, sql, rows)}
        for op in ops:
            op.outcome = None if op.row_id() in known else op.unknown(op.row_id())


@dataclass(eq=False)
class _Fail(_RowUpdate):
    NAME = "fail"
    SET = "status = j.value ->> 1, last_error = j.value ->> 2, updated_at = j.value ->> 3"
    message_id: str
    error: str
    final: bool

    def row_id(self) -> str:
        return self.message_id

    def params(self, now: float) -> tuple[Any, ...]:
        return (self.message_id, "failed" if self.final else "queued", self.error, now)


@dataclass(eq=False)
class _Release(_RowUpdate):
    NAME = "release"
    SET = (  # every CASE reads the row as it was: only a `processing` one changes
        "status = CASE status WHEN 'processing' THEN j.value ->> 2 ELSE status END,"
        " attempts = CASE status WHEN 'processing' THEN MAX(attempts - 1, 0) ELSE attempts END,"
        " updated_at = CASE status WHEN 'processing' THEN j.value ->> 1 ELSE updated_at END"
    )
    message_id: str
    status: str

    def row_id(self) -> str:
        return self.message_id

    def params(self, now: float) -> tuple[Any, ...]:
        return (self.message_id, now, self.status)


# (Not a WITH clause: Python's sqlite3 gives no rowcount for a statement
# that does not start with INSERT, UPDATE, DELETE or REPLACE.)
_MARK_SENT = (
    "UPDATE replies SET status = 'sent', attempts = attempts + 1,"
    " provider_id = j.column2, last_error = NULL, sent_at = ? FROM ("
)
_MARK_SENT_END = ") AS j WHERE replies.id = j.column1"
_REPLY_IDS = "SELECT id FROM replies WHERE id IN {ids}"


@dataclass(eq=False)
class _MarkSent(_Gathered[None]):
    NAME = "mark_sent"
    TABLE = "replies"
    OWED = True  # lost in a crash, the reply is sent again: at-least-once either way
    marks: list[tuple[int, str]] = field(default_factory=list)  # reply id, provider id

    def rows(self) -> Iterable[tuple[str, str | int]]:
        # Also the provider ids: a status for one queued after this op must run
        # after it, not be grouped ahead with other statuses and find no reply.
        return [
            *(("replies", rid) for rid, _ in self.marks),
            *(("provider_id", pid) for _, pid in self.marks),
        ]

    @classmethod
    def run_many(cls, db: sqlite3.Connection, ops: Sequence[Self], now: float) -> None:
        marks = [mark for op in ops for mark in op.marks]
        changed = 0
        for chunk in _chunks(marks):
            sql = _values_sql(_MARK_SENT, len(chunk), 2, _MARK_SENT_END)
            params = [value for mark in chunk for value in mark]
            changed += db.execute(sql, [now, *params]).rowcount
        if changed == len(marks):
            known: Collection[int] = {rid for rid, _ in marks}
        else:  # some reply is unknown: which (the rest are changed, and all exist)
            known = {row[0] for row in _in_statements(db, _REPLY_IDS, (), [r for r, _ in marks])}
        for op in ops:
            missing = next((rid for rid, _ in op.marks if rid not in known), None)
            op.outcome = None if missing is None else op.unknown(missing)


@dataclass(eq=False)
class _RetryReply(_RowUpdate):
    NAME = "retry_reply"
    TABLE = "replies"
    SET = "attempts = attempts + 1, last_error = j.value ->> 1, next_attempt_at = j.value ->> 2"
    reply_id: int
    error: str
    next_attempt_at: float

    def row_id(self) -> int:
        return self.reply_id

    def params(self, now: float) -> tuple[Any, ...]:
        return (self.reply_id, self.error, self.next_attempt_at)


@dataclass(eq=False)
class _FailReply(_RowUpdate):
    NAME = "fail_reply"
    TABLE = "replies"
    SET = "status = 'failed', attempts = attempts + 1, last_error = j.value ->> 1"
    reply_id: int
    error: str

    def row_id(self) -> int:
        return self.reply_id

    def params(self, now: float) -> tuple[Any, ...]:
        return (self.reply_id, self.error)


@dataclass(eq=False)
class _ApplyStatuses(_Op[StatusCounts]):
    """Delivery statuses for replies found by provider_id (see tenant_worker/delivery.py)."""

    NAME = "apply_statuses"
    REFUSABLE = True
    TABLE = "replies"
    updates: list[StatusUpdate]

    def rows(self) -> Iterable[tuple[str, str | int]]:
        return [("provider_id", update.provider_id) for update in self.updates]

    @classmethod
    def run_many(cls, db: sqlite3.Connection, ops: Sequence[Self], now: float) -> None:
        ids = [update.provider_id for op in ops for update in op.updates]
        sql = (
            "SELECT id, provider_id, status, last_error FROM replies"
            " WHERE provider_id IN (SELECT value FROM json_each(?))"
        )
        found: dict[str, list[list[Any]]] = {}
        for rid, provider_id, status, error in _fetch(db, sql, _json(ids)):
            found.setdefault(provider_id, []).append([rid, status, error])
        changed: dict[int, list[Any]] = {}
        for op in ops:
            op.outcome = _advance_all(op.updates, found, changed)
        rows = [(rid, status, error) for rid, (status, error) in changed.items()]
        if rows:
            db.execute(
                "UPDATE replies SET status = j.value ->> 1, last_error = j.value ->> 2"
                " FROM json_each(?) AS j WHERE replies.id = j.value ->> 0",
                (_json(rows),),
            )


@dataclass(eq=False)
class _Prune(_Op[int]):
    NAME = "prune"
    BACKGROUND = True
    cutoff: float
    limit: int

    def rows(self) -> Iterable[tuple[str, str | int]]:
        return [("messages", "*")]  # old, finished rows: no other op touches them

    @classmethod
    def run_many(cls, db: sqlite3.Connection, ops: Sequence[Self], now: float) -> None:
        for op in ops:
            ids = [
                row[0]
                for row in _fetch(
                    db,
                    "SELECT id FROM messages WHERE received_at < ?"
                    " AND status IN ('processed', 'failed', 'rejected') AND NOT EXISTS"
                    " (SELECT 1 FROM replies WHERE message_id = messages.id"
                    " AND status = 'pending') ORDER BY received_at LIMIT ?",
                    op.cutoff,
                    op.limit,
                )
            ]
            chosen = _json(ids)
            db.execute(
                "DELETE FROM replies WHERE message_id IN (SELECT value FROM json_each(?))",
                (chosen,),
            )
            db.execute(
                "DELETE FROM messages WHERE id IN (SELECT value FROM json_each(?))", (chosen,)
            )
            op.outcome = len(ids)
        _give_back_free_pages(db, VACUUM_PAGES_MAX)


def _give_back_free_pages(db: sqlite3.Connection, most: int) -> None:
    """Incremental vacuum inside the open transaction, one page per step.

    (sqlite3's execute steps a statement without columns once, and each step
    of ``incremental_vacuum`` frees one page.)
    """
    free = db.execute("PRAGMA freelist_count").fetchone()[0]
    for _ in range(min(free, most)):
        db.execute("PRAGMA incremental_vacuum(1)")


Redriven = tuple[list[tuple[Any, ...]], str | None]  # the rows put back, or why none were


def _check_redrive(outcome: Redriven) -> list[tuple[Any, ...]]:
    rows, refusal = outcome
    if refusal is not None:
        raise RedriveRefused(refusal)
    return rows


@dataclass(frozen=True, slots=True)
class _DeadLetters:
    """Where a kind of dead letter lives: its query, and the columns of its id and status."""

    noun: str
    select: str
    id_at: int
    status_at: int
    statuses: tuple[str, ...]

    def find(self, db: sqlite3.Connection, selection: Selection) -> Redriven:
        """The rows `selection` names, oldest first; or why it names a wrong one."""
        if selection.ids is None:
            where = "status IN (SELECT value FROM json_each(?))"
            params: list[Any] = [_json(list(self.statuses))]
            if selection.chat is not None:
                where, params = f"{where} AND chat_id = ?", [*params, selection.chat]
            return _fetch(db, f"{self.select} WHERE {where} ORDER BY 1", *params), None
        rows = _fetch(
            db,
            f"{self.select} WHERE id IN (SELECT value FROM json_each(?)) ORDER BY 1",
            _json(list(selection.ids)),
        )
        found = {row[self.id_at]: row[self.status_at] for row in rows}
        for wanted in selection.ids:
            status = found.get(wanted)
            if status is None:
                return [], f"no such {self.noun}: {wanted}"
            if status not in self.statuses:
                return [], f"{self.noun} {wanted} is {status}, not {' or '.join(self.statuses)}"
        return rows, None


_FAILED_MESSAGES = _DeadLetters(
    "message", f"SELECT {_MESSAGE_COLUMNS} FROM messages", 1, 7, ("failed", "rejected")
)
_FAILED_REPLIES = _DeadLetters(
    "reply", "SELECT id, message_id, chat_id, text, status FROM replies", 0, 4, ("failed",)
)


@dataclass(eq=False)
class _Requeue(_Op[Redriven]):
    NAME = "requeue_failed"
    selection: Selection

    def rows(self) -> Iterable[tuple[str, str | int]]:
        return [("messages", "*")]  # which rows is only known inside: one at a time

    @classmethod
    def run_many(cls, db: sqlite3.Connection, ops: Sequence[Self], now: float) -> None:
        for op in ops:
            op.outcome = _FAILED_MESSAGES.find(db, op.selection)
            ids = [row[1] for row in op.outcome[0]]
            db.execute(
                "UPDATE messages SET status = 'queued', attempts = 0, last_error = NULL,"
                " updated_at = ? WHERE id IN (SELECT value FROM json_each(?))",
                (now, _json(ids)),
            )


@dataclass(eq=False)
class _Resend(_Op[Redriven]):
    NAME = "resend_failed"
    TABLE = "replies"
    selection: Selection

    def rows(self) -> Iterable[tuple[str, str | int]]:
        return [("replies", "*")]

    @classmethod
    def run_many(cls, db: sqlite3.Connection, ops: Sequence[Self], now: float) -> None:
        for op in ops:
            found, refusal = _FAILED_REPLIES.find(db, op.selection)
            op.outcome = ([(*row[:4], 0, now) for row in found], refusal)
            db.execute(
                "UPDATE replies SET status = 'pending', attempts = 0, last_error = NULL,"
                " next_attempt_at = ? WHERE id IN (SELECT value FROM json_each(?))",
                (now, _json([row[0] for row in found])),
            )


def _advance_all(
    updates: Sequence[StatusUpdate],
    found: dict[str, list[list[Any]]],
    changed: dict[int, list[Any]],
) -> StatusCounts:
    """Apply `updates` in order to the rows in `found` (changed in place); count them."""
    applied = stale = unknown = 0
    for update in updates:
        rows = found.get(update.provider_id)
        if not rows:
            unknown += 1
            continue
        moved = False
        for row in rows:
            new = advance(row[1], update.status)
            if new is not None:
                row[1] = new
                if new == "failed":
                    row[2] = storable_text(update.error or "failed")
                changed[row[0]] = [row[1], row[2]]
                moved = True
        applied, stale = (applied + 1, stale) if moved else (applied, stale + 1)
    return StatusCounts(applied=applied, stale=stale, unknown=unknown)
