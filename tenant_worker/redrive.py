"""Dead letters back in line: the running worker's side of ``chatq retry`` and ``resend``.

Two internal routes on the worker's unix socket (never on its TCP port: the
socket is mode 0600, the port is open to every local user):

    POST /redrive/messages   {"ids": [message id, ...]} | {"failed": true, "chat"?: str}
    POST /redrive/replies    {"ids": [reply id, ...]}   | {"failed": true, "chat"?: str}

``/redrive/messages`` puts failed and rejected messages back to ``queued``
with their attempts reset and hands them to their chats' queues in arrival
order; ``/redrive/replies`` puts failed replies back to ``pending`` and hands
them to the outbox. Answers: ``200 {"requeued"|"resent": n, "failed": n,
"rejected": n}``; ``400`` for a bad body; ``409`` naming an id that is unknown
or not failed (nothing changed); ``403`` over TCP; ``503`` unless running.

A stopped tenant's store is changed by the CLI itself (`redrive_stored`),
under the store's lock: the worker replays the rows at its next start.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from chatq.shared.errors import RedriveRefused, StoreError
from chatq.shared.http_server import Answer, Request
from chatq.tenant_worker.ingest import Ingest, error_answer, json_answer
from chatq.tenant_worker.outbox import Outbox
from chatq.tenant_worker.pipeline import Pipeline
from chatq.tenant_worker.store import Selection, Store, StoredMessage
from chatq.tenant_worker.store_lock import StoreLock

__all__ = ["MESSAGES_PATH", "REPLIES_PATH", "Redrive", "parse_selection", "redrive_stored"]

MESSAGES_PATH = "/redrive/messages"
REPLIES_PATH = "/redrive/replies"
MAX_BODY_BYTES = 1 << 20
MAX_IDS = 10_000


class BadSelection(ValueError):
    """A redrive body that names no valid selection (answered 400)."""


def parse_selection(body: object, id_type: type[str] | type[int]) -> Selection:
    """The selection a request body describes; BadSelection naming what is wrong."""
    if not isinstance(body, dict) or set(body) - {"ids", "failed", "chat"}:
        raise BadSelection('body must be {"ids": [...]} or {"failed": true, "chat"?: "..."}')
    ids, chat = body.get("ids"), body.get("chat")
    if (ids is None) == (body.get("failed") is not True):
        raise BadSelection('give either "ids" or "failed": true')
    if chat is not None and (ids is not None or not isinstance(chat, str) or not chat):
        raise BadSelection('"chat" is a non-empty string, and goes with "failed"')
    if ids is None:
        return Selection(chat=chat)
    ok = isinstance(ids, list) and 0 < len(ids) <= MAX_IDS
    if not ok or not all(type(i) is id_type and i != "" for i in ids):
        kind = "strings" if id_type is str else "integers"
        raise BadSelection(f'"ids" must be a list of 1 to {MAX_IDS} {kind}')
    return Selection(ids=tuple(dict.fromkeys(ids)))


def message_counts(rows: list[StoredMessage]) -> dict[str, int]:
    """{"requeued": n, "failed": n, "rejected": n}: what was put back, by its old status."""
    by_status = Counter(row.status for row in rows)
    return {"requeued": len(rows), "failed": by_status["failed"], "rejected": by_status["rejected"]}


class Redrive:
    """The routes, over the worker's store, pipeline and outbox."""

    def __init__(
        self, store: Store, pipeline: Pipeline, outbox: Outbox, running: Callable[[], bool]
    ) -> None:
        self._store = store
        self._pipeline = pipeline
        self._outbox = outbox
        self._running = running

    def add_routes(self, ingest: Ingest) -> None:
        for path, serve in ((MESSAGES_PATH, self.post_messages), (REPLIES_PATH, self.post_replies)):
            ingest.add_route("POST", path, serve, MAX_BODY_BYTES, unix_only=True)

    async def post_messages(self, request: Request) -> Answer:
        """Requeue failed/rejected messages, then queue them in their chats, in order."""
        return await self._serve(request, str, self._requeue)

    async def post_replies(self, request: Request) -> Answer:
        """Put failed replies back to pending and hand them to the outbox, oldest first."""
        return await self._serve(request, int, self._resend)

    async def _requeue(self, selection: Selection) -> dict[str, int]:
        rows = await self._store.requeue_failed(selection)
        self._pipeline.redrive([row.message for row in rows])
        return message_counts(rows)

    async def _resend(self, selection: Selection) -> dict[str, int]:
        replies = await self._store.resend_failed(selection)
        self._outbox.submit(replies)
        return {"resent": len(replies)}

    async def _serve(
        self,
        request: Request,
        id_type: type[str] | type[int],
        act: Callable[[Selection], Awaitable[dict[str, int]]],
    ) -> Answer:
        selection = self._selection(request, id_type)
        if isinstance(selection, Answer):
            return selection
        try:
            return json_answer(200, await act(selection))
        except RedriveRefused as exc:
            return error_answer(409, str(exc))
        except StoreError as exc:
            return error_answer(503, f"store unavailable: {exc}")

    def _selection(self, request: Request, id_type: type[str] | type[int]) -> Selection | Answer:
        # Over TCP, or a body over MAX_BODY_BYTES: refused by ingest (403, 413).
        if not self._running():
            return error_answer(503, "tenant is not running (starting or draining); try again")
        assert request.body is not None
        try:
            return parse_selection(json.loads(request.body), id_type)
        except ValueError as exc:  # BadSelection or bad JSON
            return error_answer(400, str(exc))


async def redrive_stored(path: Path, tenant_id: str, kind: str, selection: Selection) -> Any:
    """Change a stopped tenant's store directly, holding its lock (StoreInUse if a worker has it).

    `kind` is "messages" or "replies"; returns the counts the route would.
    """
    lock = await StoreLock.acquire(path)
    assert lock is not None  # no give_up: acquire returns or raises
    try:
        store = await Store.open(path, tenant_id)
        try:
            if kind == "messages":
                return message_counts(await store.requeue_failed(selection))
            return {"resent": len(await store.resend_failed(selection))}
        finally:
            await store.close()
    finally:
        lock.release()
