"""The `whatsapp` transport: replies go out through Meta's Cloud API (the Graph API).

One tenant is one business phone number. `send` POSTs one text message (see
`chatq.shared.whatsapp.graph`) and returns its wamid; `split` cuts a long
reply into the parts the outbox sends one by one. An error answer is sorted
by its ``error.code`` (`chatq.shared.whatsapp.errors`), never by its status:

    retry          TransientTransportError   (also: 5xx, timeouts, connection errors;
                                              an unknown code: RetryableTransportError)
    pair rate      PairRateLimitError        (131056: that chat backs off)
    fail           PermanentTransportError   (the code and Meta's text in last_error)
    pause          SendingPausedError        (the tenant sends nothing more until restarted)

The access token travels only in the ``Authorization`` header of the
session; every error text is scrubbed of it as well, in case an answer ever
echoes it. The session is opened on first use, in the worker's loop (workers
are forked).
"""

from __future__ import annotations

import uuid

from loguru import logger

from chatq.config.settings import WhatsAppSettings
from chatq.shared.errors import (
    PairRateLimitError,
    PermanentTransportError,
    RetryableTransportError,
    SendingPausedError,
    TransientTransportError,
    TransportError,
)
from chatq.shared.whatsapp.errors import Action, GraphError, is_known, parse_error
from chatq.shared.whatsapp.graph import message_id, messages_url, split_text, text_message
from chatq.tenant_worker.http_client import JsonPoster, snippet

__all__ = ["WhatsAppTransport"]

_ERRORS: dict[Action, type[TransportError]] = {
    Action.RETRY: TransientTransportError,
    Action.PAIR_RATE: PairRateLimitError,
    Action.FAIL: PermanentTransportError,
    Action.PAUSE: SendingPausedError,
}
_REDACTED = "[redacted]"


class WhatsAppTransport:
    """Sends text messages from one WhatsApp business number."""

    def __init__(self, settings: WhatsAppSettings) -> None:
        self._token = settings.access_token.get_secret_value()
        self._poster = JsonPoster(
            messages_url(settings.graph_url, settings.graph_version, settings.phone_number_id),
            settings.request_timeout,
            label="graph_url",
            retryable=TransientTransportError,
            permanent=PermanentTransportError,
            headers={"Authorization": f"Bearer {self._token}"},
            # Meta takes as many connections as the tier needs; aiohttp's default of
            # 100 would queue granted sends and let them out later in a burst.
            max_connections=0,
        )

    def __repr__(self) -> str:
        return f"WhatsAppTransport({self._poster.where!r})"

    def split(self, text: str) -> list[str]:
        """The messages a reply goes out as: at most 4096 characters each."""
        return split_text(text)

    async def send(self, chat_id: str, text: str) -> str:
        """POST one text message to the user `chat_id`; its wamid, or an error by code."""
        try:
            status, body = await self._poster.exchange(text_message(chat_id, text))
        except RetryableTransportError as exc:  # timeout or connection error
            raise TransientTransportError(self._scrub(str(exc))) from None
        if 200 <= status < 300:
            return self._wamid(body)
        error = parse_error(body)
        if error is None:  # a proxy's or a server's own page
            detail = self._scrub(f"{self._poster.where} answered {status}{snippet(body)}")
            # 5xx: Meta or its edge is down, it passes; anything else: retried, then failed
            raise (
                TransientTransportError(detail)
                if status >= 500
                else RetryableTransportError(detail)
            )
        raise self._error(error)

    async def aclose(self) -> None:
        """Close the HTTP session, if one was opened."""
        await self._poster.aclose()

    def _wamid(self, body: bytes) -> str:
        try:
            return message_id(body)
        except ValueError as exc:
            # Accepted all the same: sending again would send twice.
            logger.warning("graph answer without a message id ({}); sent anyway", exc)
            return f"whatsapp-{uuid.uuid4().hex}"

    def _error(self, error: GraphError) -> TransportError:
        text = self._scrub(error.describe())
        if error.action is Action.RETRY and not is_known(error.code):
            return RetryableTransportError(text)  # a guess: bounded by the attempt limit
        return _ERRORS[error.action](text)

    def _scrub(self, text: str) -> str:
        return text.replace(self._token, _REDACTED)
