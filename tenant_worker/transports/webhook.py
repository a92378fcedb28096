"""The `webhook` transport: POST each reply to the tenant's `webhook_url`.

Request body (JSON): ``{"tenant_id", "chat_id", "text"}``. A 2xx answer means
sent; the provider's message id is the answer's ``"id"`` when it has one
(string or integer), else a fresh ``webhook-<hex>``. 5xx, 429, timeouts and
connection errors are `RetryableTransportError`; any other status is
`PermanentTransportError`. Redirects are not followed (a moved POST is a
configuration mistake). The error messages name the URL and the status.

The shape is meant to grow a WhatsApp Cloud API transport later: that is the
same POST (to the Graph API ``/<phone-number-id>/messages``, with an
``Authorization: Bearer <token>`` header and the WhatsApp body), the same
status mapping, and the id read from ``messages[0].id`` of the answer. Only
`_body` and `_provider_id` would differ.

Workers are forked, so the `ClientSession` is created on first use, inside the
worker's running loop, never in `__init__`.
"""

from __future__ import annotations

import json
import uuid
from typing import Any

import aiohttp

from shared.errors import PermanentTransportError, RetryableTransportError

__all__ = ["DEFAULT_TIMEOUT_S", "WebhookTransport"]

DEFAULT_TIMEOUT_S = 10.0
_SNIPPET_CHARS = 200


class WebhookTransport:
    """Hands replies to a web service that delivers them."""

    def __init__(self, url: str, tenant_id: str, timeout: float = DEFAULT_TIMEOUT_S) -> None:
        self._url = url
        self._tenant_id = tenant_id
        self._timeout_s = timeout
        self._client: aiohttp.ClientSession | None = None

    async def send(self, chat_id: str, text: str) -> str:
        """POST the reply; the provider's id, or an error by status."""
        status, body = await self._post(self._body(chat_id, text))
        if 200 <= status < 300:
            return _provider_id(body)
        detail = f"webhook_url {self._url} answered {status}{_snippet(body)}"
        if status >= 500 or status == 429:
            raise RetryableTransportError(detail)
        raise PermanentTransportError(detail)

    async def aclose(self) -> None:
        """Close the HTTP session, if one was opened."""
        client, self._client = self._client, None
        if client is not None:
            await client.close()

    def _body(self, chat_id: str, text: str) -> dict[str, Any]:
        return {"tenant_id": self._tenant_id, "chat_id": chat_id, "text": text}

    async def _post(self, payload: dict[str, Any]) -> tuple[int, bytes]:
        try:
            async with self._session().post(
                self._url, json=payload, allow_redirects=False
            ) as response:
                return response.status, await response.read()
        except TimeoutError as exc:  # also aiohttp's ServerTimeoutError
            raise RetryableTransportError(
                f"webhook_url {self._url}: no answer within {self._timeout_s:g}s"
            ) from exc
        except aiohttp.ClientError as exc:
            raise RetryableTransportError(
                f"webhook_url {self._url}: {exc or type(exc).__name__}"
            ) from exc

    def _session(self) -> aiohttp.ClientSession:
        # Lazily, so the session binds to the loop that is running now.
        if self._client is None:
            timeout = aiohttp.ClientTimeout(total=self._timeout_s)
            self._client = aiohttp.ClientSession(timeout=timeout)
        return self._client


def _provider_id(body: bytes) -> str:
    """The answer's "id" if it is a string or integer; else a fresh local one."""
    try:
        data = json.loads(body) if body.strip() else None
    except ValueError:
        data = None  # the send succeeded; an odd body does not undo that
    value = data.get("id") if isinstance(data, dict) else None
    if isinstance(value, str) and value:
        return value
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    return f"webhook-{uuid.uuid4().hex}"


def _snippet(body: bytes) -> str:
    """': <start of body>' on one line, so an operator sees why; '' for no body."""
    text = " ".join(body.decode("utf-8", "replace").split())
    if not text:
        return ""
    if len(text) > _SNIPPET_CHARS:
        text = text[:_SNIPPET_CHARS] + "…"
    return f": {text}"
