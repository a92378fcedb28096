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

Workers are forked, so nothing loop-bound is built in `__init__`: the
`ClientSession` is created on first use, inside the worker's running loop.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import aiohttp

__all__ = ["JsonPoster", "snippet"]

_SNIPPET_CHARS = 200


class JsonPoster:
    """POSTs JSON bodies to `url`; a 2xx answer's body, or an error by status."""

    def __init__(
        self,
        url: str,
        timeout: float,
        *,
        label: str,
        retryable: type[Exception],
        permanent: type[Exception],
        timed_out: type[Exception] | None = None,
        headers: Mapping[str, str] | None = None,
        max_connections: int = 100,
    ) -> None:
        self._url = url
        self._max_connections = max_connections  # 0: no limit
        self._headers = dict(headers or {})
        self._timeout_s = timeout
        self._retryable = retryable
        self._permanent = permanent
        self._timed_out = timed_out or retryable
        self.where = f"{label} {url}"  # how errors name the endpoint
        self._client: aiohttp.ClientSession | None = None

    async def post(self, payload: Mapping[str, Any]) -> bytes:
        """POST `payload`; the body of a 2xx answer, else the error its status calls for."""
        status, body = await self.exchange(payload)
        if 200 <= status < 300:
            return body
        detail = f"{self.where} answered {status}{snippet(body)}"
        if status >= 500 or status == 429:
            raise self._retryable(detail)
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
        try:
            async with self._session().post(
                self._url, json=payload, allow_redirects=False
            ) as response:
                return response.status, await response.read()
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
