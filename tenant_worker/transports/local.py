"""The `local` transport (the default): a reply counts as sent once it is logged.

For running chatq without a chat provider (demos, development): the replies
are in the store and in the log, which is where an operator looks.
"""

from __future__ import annotations

import itertools
import uuid

from loguru import logger

__all__ = ["LocalTransport"]


class LocalTransport:
    """Logs each reply at INFO and calls it sent."""

    def __init__(self) -> None:
        # Unique per instance, then a counter: a uuid4 per reply costs more than the send.
        self._prefix = f"local-{uuid.uuid4().hex[:16]}-"
        self._count = itertools.count(1)

    def split(self, text: str) -> list[str]:
        """No length limit: the reply is one message."""
        return [text]

    async def send(self, chat_id: str, text: str) -> str:
        """Log the reply; a fresh id ``local-<hex>-<n>``."""
        logger.info("reply to {}: {}", chat_id, text)
        return f"{self._prefix}{next(self._count)}"

    async def aclose(self) -> None:
        """Nothing to release."""
