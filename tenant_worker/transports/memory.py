"""`MemoryTransport`: a fake transport for tests and benchmarks.

It records what it sent and can be told to fail: `fail_with(chat_id, text)`
is asked before each send and, if it returns an exception, that exception is
raised instead of sending (e.g. a `RetryableTransportError` the first two
times, to exercise the sender's retries). With `max_chars` it splits long
replies as the `whatsapp` transport does, at that length.
"""

from __future__ import annotations

from collections.abc import Callable

from chatq.shared.whatsapp.graph import split_text

__all__ = ["FailWith", "MemoryTransport"]

FailWith = Callable[[str, str], Exception | None]


class MemoryTransport:
    """Keeps every successful send in `.sent` as ``(chat_id, text)``, in order."""

    def __init__(self, fail_with: FailWith | None = None, max_chars: int | None = None) -> None:
        self.sent: list[tuple[str, str]] = []
        self.max_chars = max_chars
        self.attempts = 0  # sends tried, including the failed ones
        self.closed = False
        self._fail_with = fail_with

    def split(self, text: str) -> list[str]:
        """`text` whole, or cut at `max_chars` like a WhatsApp reply."""
        return [text] if self.max_chars is None else split_text(text, self.max_chars)

    async def send(self, chat_id: str, text: str) -> str:
        """Record the reply (or raise the injected failure); ids are ``mem-1``, ``mem-2``, ..."""
        self.attempts += 1
        if self._fail_with is not None:
            error = self._fail_with(chat_id, text)
            if error is not None:
                raise error
        self.sent.append((chat_id, text))
        return f"mem-{len(self.sent)}"

    async def aclose(self) -> None:
        """Mark the transport closed (tests can check the worker closed it)."""
        self.closed = True
