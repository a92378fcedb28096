"""The `http` handler: POST the message to the tenant's `handler_url`.

Request body (JSON)::

    {"id", "chat_id", "text", "from", "ts", "tenant_id", "attempt"}

A 2xx answer carries the replies: ``{"reply": "..."}`` or
``{"replies": ["...", ...]}``; 204, an empty body, ``{}`` or a null value mean
no reply. Other keys are ignored. Anything else in a 2xx body is a
`PermanentHandlerError` naming what was wrong.

Failures map onto the retry policy: 5xx, 429, connection errors and client
timeouts are `HandlerError` (retryable; the timeout is `HandlerTimeoutError`);
any other non-2xx status is `PermanentHandlerError`. Redirects are not
followed: a POST that gets moved is a configuration mistake.

The POST itself, the status mapping, the configured ``handler_headers``, the
``X-Chatq-Signature`` of ``signing_secret``, ``Retry-After`` and the lazily
opened `ClientSession` (workers are forked) are
`chatq.tenant_worker.http_client.JsonPoster`'s.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from chatq.shared.errors import HandlerError, HandlerTimeoutError, PermanentHandlerError
from chatq.tenant_worker.handlers.base import HandlerContext
from chatq.tenant_worker.http_client import JsonPoster, snippet
from chatq.tenant_worker.messages import Message

__all__ = ["HttpHandler", "parse_answer"]

_JSON_TYPES: dict[type, str] = {
    dict: "object",
    list: "array",
    str: "string",
    int: "number",
    float: "number",
    bool: "boolean",
    type(None): "null",
}


class HttpHandler:
    """Asks a web service for the replies to each message."""

    def __init__(
        self,
        url: str,
        timeout: float,
        *,
        headers: Mapping[str, str] | None = None,
        signing_secret: str | None = None,
    ) -> None:
        self._poster = JsonPoster(
            url,
            timeout,
            label="handler_url",
            retryable=HandlerError,
            permanent=PermanentHandlerError,
            timed_out=HandlerTimeoutError,
            headers=headers,
            signing_secret=signing_secret,
        )

    async def handle(self, message: Message, ctx: HandlerContext) -> list[str]:
        """POST the message; the answer's replies, or an error by status."""
        body = await self._poster.post(_payload(message, ctx))
        return parse_answer(body, where=self._poster.where)

    async def aclose(self) -> None:
        """Close the HTTP session, if one was opened."""
        await self._poster.aclose()


def parse_answer(body: bytes, *, where: str) -> list[str]:
    """The replies in a 2xx body; PermanentHandlerError naming what is wrong."""
    if not body.strip():
        return []
    try:
        data = json.loads(body)
    except ValueError:
        raise PermanentHandlerError(f"{where}: answer is not JSON{snippet(body)}") from None
    if not isinstance(data, dict):
        raise PermanentHandlerError(
            f"{where}: answer must be a JSON object, got {_json_type(data)}"
        )
    if "reply" in data and "replies" in data:
        raise PermanentHandlerError(f"{where}: answer has both 'reply' and 'replies'")
    if "replies" in data:
        return _replies(data["replies"], where)
    return _reply(data.get("reply"), where)


def _reply(value: object, where: str) -> list[str]:
    if value is None:
        return []
    if not isinstance(value, str):
        raise PermanentHandlerError(f"{where}: 'reply' must be a string, got {_json_type(value)}")
    return [value]


def _replies(value: object, where: str) -> list[str]:
    if value is None:
        return []
    if not isinstance(value, list):
        raise PermanentHandlerError(
            f"{where}: 'replies' must be an array of strings, got {_json_type(value)}"
        )
    for index, item in enumerate(value):
        if not isinstance(item, str):
            raise PermanentHandlerError(
                f"{where}: 'replies'[{index}] must be a string, got {_json_type(item)}"
            )
    return list(value)


def _payload(message: Message, ctx: HandlerContext) -> dict[str, Any]:
    return {
        "id": message.id,
        "chat_id": message.chat_id,
        "text": message.text,
        "from": message.sender,
        "ts": message.ts,
        "type": message.type,
        "payload": message.payload,
        "tenant_id": ctx.tenant_id,
        "attempt": ctx.attempt,
    }


def _json_type(value: object) -> str:
    return _JSON_TYPES.get(type(value), type(value).__name__)
