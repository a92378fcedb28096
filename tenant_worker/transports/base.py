"""What a transport is: the one call that hands a reply to the chat provider.

A transport fails only through the exception tree: `RetryableTransportError`
when sending may work later (5xx, 429, timeouts, connection errors),
`PermanentTransportError` when it will not (other 4xx, bad recipient).
"""

from __future__ import annotations

from typing import Protocol

__all__ = ["Transport"]


class Transport(Protocol):
    """Sends reply texts to chats; built once per worker by `make_transport`."""

    def split(self, text: str) -> list[str]:
        """The messages one reply goes out as, in order (``[text]`` where there is no limit).

        The outbox sends them one by one, each through the rate limiters.
        """
        ...

    async def send(self, chat_id: str, text: str) -> str:
        """Deliver `text` to `chat_id`; the provider's id for the sent message."""
        ...

    async def aclose(self) -> None:
        """Release what the transport holds (e.g. an HTTP session); safe to call twice."""
        ...
