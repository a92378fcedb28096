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

Workers are forked, so nothing loop-bound is built in `__init__`: the
`ClientSession` is created on first use, inside the worker's running loop.
"""

from __future__ import annotations

import json
from typing import Any

import aiohttp

from shared.errors import HandlerError, HandlerTimeoutError, PermanentHandlerError
from tenant_worker.handlers.base import HandlerContext
from tenant_worker.messages import Message

__all__ = ["HttpHandler", "parse_answer"]

_SNIPPET_CHARS = 200
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

    def __init__(self, url: str, timeout: float) -> None:
        self._url = url
        self._timeout_s = timeout
        self._client: aiohttp.ClientSession | None = None

    async def handle(self, message: Message, ctx: HandlerContext) -> list[str]:
        """POST the message; the answer's replies, or an error by status."""
        status, body = await self._post(_payload(message, ctx))
        if 200 <= status < 300:
            return parse_answer(body, where=f"handler_url {self._url}")
        detail = f"handler_url {self._url} answered {status}{_snippet(body)}"
        if status >= 500 or status == 429:
            raise HandlerError(detail)
        raise PermanentHandlerError(detail)

    async def aclose(self) -> None:
        """Close the HTTP session, if one was opened."""
        client, self._client = self._client, None
        if client is not None:
            await client.close()

    async def _post(self, payload: dict[str, Any]) -> tuple[int, bytes]:
        try:
            async with self._session().post(
                self._url, json=payload, allow_redirects=False
            ) as response:
                return response.status, await response.read()
        except TimeoutError as exc:  # also aiohttp's ServerTimeoutError
            raise HandlerTimeoutError(
                f"handler_url {self._url}: no answer within {self._timeout_s:g}s"
            ) from exc
        except aiohttp.ClientError as exc:
            raise HandlerError(f"handler_url {self._url}: {exc or type(exc).__name__}") from exc

    def _session(self) -> aiohttp.ClientSession:
        # Lazily, so the session binds to the loop that is running now.
        if self._client is None:
            timeout = aiohttp.ClientTimeout(total=self._timeout_s)
            self._client = aiohttp.ClientSession(timeout=timeout)
        return self._client


def parse_answer(body: bytes, *, where: str) -> list[str]:
    """The replies in a 2xx body; PermanentHandlerError naming what is wrong."""
    if not body.strip():
        return []
    try:
        data = json.loads(body)
    except ValueError:
        raise PermanentHandlerError(f"{where}: answer is not JSON{_snippet(body)}") from None
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
        "tenant_id": ctx.tenant_id,
        "attempt": ctx.attempt,
    }


def _json_type(value: object) -> str:
    return _JSON_TYPES.get(type(value), type(value).__name__)


def _snippet(body: bytes) -> str:
    """': <start of body>' on one line, so an operator sees why; '' for no body."""
    text = " ".join(body.decode("utf-8", "replace").split())
    if not text:
        return ""
    if len(text) > _SNIPPET_CHARS:
        text = text[:_SNIPPET_CHARS] + "…"
    return f": {text}"
