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

The POST itself, the status mapping, the configured ``webhook_headers``, the
``X-Chatq-Signature`` of ``signing_secret``, ``Retry-After`` and the lazily
opened `ClientSession` (workers are forked) are
`chatq.tenant_worker.http_client.JsonPoster`'s. How long a failing reply is
retried is the tenant's ``webhook_max_attempts`` and ``webhook_retry_backoff``
(the outbox's schedule; see tenant_worker/outbox.py).
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Mapping
from typing import Any

from chatq.shared.errors import PermanentTransportError, RetryableTransportError
from chatq.tenant_worker.http_client import JsonPoster

__all__ = ["DEFAULT_TIMEOUT_S", "WebhookTransport"]

DEFAULT_TIMEOUT_S = 10.0


class WebhookTransport:
    """Hands replies to a web service that delivers them."""

    def __init__(
        self,
        url: str,
        tenant_id: str,
        timeout: float = DEFAULT_TIMEOUT_S,
        *,
        headers: Mapping[str, str] | None = None,
        signing_secret: str | None = None,
    ) -> None:
        self._tenant_id = tenant_id
        self._poster = JsonPoster(
            url,
            timeout,
            label="webhook_url",
            retryable=RetryableTransportError,
            permanent=PermanentTransportError,
            headers=headers,
            signing_secret=signing_secret,
        )

    def split(self, text: str) -> list[str]:
        """The web service gets the reply whole."""
        return [text]

    async def send(self, chat_id: str, text: str) -> str:
        """POST the reply; the provider's id, or an error by status."""
        return _provider_id(await self._poster.post(self._body(chat_id, text)))

    async def aclose(self) -> None:
        """Close the HTTP session, if one was opened."""
        await self._poster.aclose()

    def _body(self, chat_id: str, text: str) -> dict[str, Any]:
        return {"tenant_id": self._tenant_id, "chat_id": chat_id, "text": text}


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
