"""The `echo` handler: replies with the message's own text."""

from __future__ import annotations

from chatq.tenant_worker.handlers.base import HandlerContext
from chatq.tenant_worker.messages import Message

__all__ = ["EchoHandler"]


class EchoHandler:
    """Replies with the text it was given; holds nothing."""

    async def handle(self, message: Message, ctx: HandlerContext) -> list[str]:
        """One reply: the message text."""
        return [message.text]

    async def aclose(self) -> None:
        """Nothing to release."""
