"""POST JSON to one URL and sort what went wrong for the retry policy.

Shared by the `http` handler and the `webhook` transport, which differ only in
their request bodies, in what a 2xx body means, and in their exception
classes (passed in). 5xx, 429, connection errors and client timeouts raise
the `retryable` class (a timeout its own class, if given); any other non-2xx
status raises the `permanent` class. Every error is one line naming the URL,
and the status and the start of the body when there was an answer. Redirects
are not followed: a POST that gets moved is a configuration mistake. (The
`whatsapp` transport reads every answer itself through `exchange`: Meta's
errors come with any status.)

Every request carries the configured `headers` (e.g. ``Authorization``),
and with a `signing_secret` an ``X-Chatq-Signature: sha256=<hex>`` header:
the HMAC-SHA256 of the exact body bytes, as GitHub and Stripe sign their
webhooks, so a receiver can check the request came from chatq. A 429 or 503
answer's ``Retry-After`` (seconds or an HTTP date) rides the raised error as
`retry_after`, and the retry waits that long (at most `RETRY_AFTER_MAX`).

Workers are forked, so nothing loop-bound is built in `__init__`: the
`ClientSession` is created on first use, inside the worker's running loop.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import time
from collections.abc import Callable, Iterable, Mapping
from email.utils import parsedate_to_datetime
from typing import Any

import aiohttp
from pydantic import SecretStr

from chatq.shared.errors import ChatqError

__all__ = [
    "RETRY_AFTER_MAX",
    "SIGNATURE_HEADER",
    "JsonPoster",
    "retry_after",
    "reveal",
    "reveal_one",
    "sign",
    "snippet",
]

_SNIPPET_CHARS = 200
SIGNATURE_HEADER = "X-Chatq-Signature"
RETRY_AFTER_MAX = 3600.0  # a server asking for more is waited on this long, then asked again


def reveal(headers: Iterable[tuple[str, SecretStr]]) -> dict[str, str]:
    """Configured headers as sent: secret values, kept out of reprs until here."""
    return {name: value.get_secret_value() for name, value in headers}


def reveal_one(secret: SecretStr | None) -> str | None:
    return None if secret is None else secret.get_secret_value()


def sign(secret: bytes, body: bytes) -> str:
    """The X-Chatq-Signature value of `body`: 'sha256=<hex HMAC-SHA256>'."""
    return "sha256=" + hmac.new(secret, body, hashlib.sha256).hexdigest()


def retry_after(value: str | None, now: float) -> float | None:
    """Seconds a ``Retry-After`` value asks for (delta-seconds or HTTP date); None if unusable."""
    if not value:
        return None
    text = value.strip()
    if text.isdigit():
        seconds = float(text)
    else:
        try:
            seconds = parsedate_to_datetime(text).timestamp() - now
        except (TypeError, ValueError):
            return None
    return min(max(seconds, 0.0), RETRY_AFTER_MAX)


class JsonPoster:
    """POSTs JSON bodies to `url`; a 2xx answer's body, or an error by status."""

    def __init__(
        self,
        url: str,
        timeout: float,
        *,
        label: str,
        retryable: type[ChatqError],
        permanent: type[Exception],
        timed_out: type[Exception] | None = None,
        headers: Mapping[str, str] | None = None,
        max_connections: int = 100,
        signing_secret: str | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._url = url
        self._max_connections = max_connections  # 0: no limit
        self._headers = dict(headers or {})
        self._secret = signing_secret.encode() if signing_secret else None
        self._clock = clock
        self._timeout_s = timeout
        self._retryable = retryable
        self._permanent = permanent
        self._timed_out = timed_out or retryable
        self.where = f"{label} {url}"  # how errors name the endpoint
        self._client: aiohttp.ClientSession | None = None

    async def post(self, payload: Mapping[str, Any]) -> bytes:
        """POST `payload`; the body of a 2xx answer, else the error its status calls for."""
        status, body, wait = await self._request(payload)
        if 200 <= status < 300:
            return body
        detail = f"{self.where} answered {status}{snippet(body)}"
        if status >= 500 or status == 429:
            error = self._retryable(detail)
            error.retry_after = wait
            raise error
        raise self._permanent(detail)

    async def aclose(self) -> None:
        """Close the HTTP session, if one was opened (a later `post` opens a new one)."""
        client, self._client = self._client, None
        if client is not None:
            await client.close()

    async def exchange(self, payload: Mapping[str, Any]) -> tuple[int, bytes]:
        """POST `payload`; the answer's status and body, whatever the status.

        Timeouts and connection errors raise the `timed_out` and `retryable` classes.
        """
        status, body, _ = await self._request(payload)
        return status, body

    async def _request(self, payload: Mapping[str, Any]) -> tuple[int, bytes, float | None]:
        """POST; the status, the body and what a 429/503's Retry-After asks for."""
        body = json.dumps(payload, ensure_ascii=False).encode()
        headers = {"Content-Type": "application/json"}
        if self._secret is not None:
            headers[SIGNATURE_HEADER] = sign(self._secret, body)
        try:
            async with self._session().post(
                self._url, data=body, headers=headers, allow_redirects=False
            ) as response:
                wait = None
                if response.status in (429, 503):
                    wait = retry_after(response.headers.get("Retry-After"), self._clock())
                return response.status, await response.read(), wait
        except TimeoutError as exc:  # also aiohttp's ServerTimeoutError
            raise self._timed_out(f"{self.where}: no answer within {self._timeout_s:g}s") from exc
        except aiohttp.ClientError as exc:
            raise self._retryable(f"{self.where}: {exc or type(exc).__name__}") from exc

    def _session(self) -> aiohttp.ClientSession:
        # Lazily, so the session binds to the loop that is running now.
        if self._client is None:
            timeout = aiohttp.ClientTimeout(total=self._timeout_s)
            connector = aiohttp.TCPConnector(limit=self._max_connections)
            self._client = aiohttp.ClientSession(
                timeout=timeout, headers=self._headers, connector=connector
            )
        return self._client


def snippet(body: bytes) -> str:
    """': <start of body>' on one line, so an operator sees why; '' for no body."""
    text = " ".join(body.decode("utf-8", "replace").split())
    if not text:
        return ""
    if len(text) > _SNIPPET_CHARS:
        text = text[:_SNIPPET_CHARS] + "…"
    return f": {text}"
