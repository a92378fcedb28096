"""The `local` transport (the default): a reply counts as sent once it is logged.

For running chatq without a chat provider (demos, development): the replies
are in the store and in the log, which is where an operator looks.

Each reply is one INFO line while they come at a person's pace: the first
`INFO_PER_WINDOW` of every `WINDOW_S` seconds. Past that they are logged at
DEBUG and one INFO line a window says how many more went: at thousands a
second, a line per reply cost more than the rest of the send (the supervisor
relays every line; bench/tenants_bench.py).
"""

from __future__ import annotations

import asyncio
import itertools
import time
import uuid
from collections.abc import Callable

from loguru import logger

from chatq.shared.log import debug_enabled

__all__ = ["INFO_PER_WINDOW", "WINDOW_S", "LocalTransport"]

INFO_PER_WINDOW = 10
WINDOW_S = 1.0


class LocalTransport:
    """Logs each reply (at INFO while they are few, see above) and calls it sent."""

    def __init__(
        self, *, window: float = WINDOW_S, monotonic: Callable[[], float] = time.monotonic
    ) -> None:
        # Unique per instance, then a counter: a uuid4 per reply costs more than the send.
        self._prefix = f"local-{uuid.uuid4().hex[:16]}-"
        self._count = itertools.count(1)
        self._monotonic = monotonic
        self._window = window
        self._window_end = 0.0
        self._shown = 0  # replies logged at INFO in this window
        self._more = 0  # replies past that, not yet reported
        self._report: asyncio.TimerHandle | None = None

    def split(self, text: str) -> list[str]:
        """No length limit: the reply is one message."""
        return [text]

    async def send(self, chat_id: str, text: str) -> str:
        """Log the reply; a fresh id ``local-<hex>-<n>``."""
        now = self._monotonic()
        if now >= self._window_end:
            self._report_more()
            self._window_end, self._shown = now + self._window, 0
        if self._shown < INFO_PER_WINDOW:
            self._shown += 1
            logger.info("reply to {}: {}", chat_id, text)
        else:
            self._more += 1
            if self._report is None:  # say it when the window ends, even if nothing follows
                delay = max(0.0, self._window_end - now)
                self._report = asyncio.get_running_loop().call_later(delay, self._report_more)
            if debug_enabled():
                logger.debug("reply to {}: {}", chat_id, text)
        return f"{self._prefix}{next(self._count)}"

    async def aclose(self) -> None:
        """Say how many replies went unlisted at INFO."""
        self._report_more()

    def _report_more(self) -> None:
        if self._report is not None:
            self._report.cancel()
            self._report = None
        if self._more:
            logger.info(
                "{} more replies sent in {:g} s (one line each at DEBUG)", self._more, self._window
            )
            self._more = 0
