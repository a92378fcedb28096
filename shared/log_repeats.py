"""Rate limit for repeated log lines: a storm of one message costs a few lines, not 40,000.

`RepeatLimiter` lets `burst` records with the same level and message through
per `window` seconds and counts the rest (like syslog's "last message
repeated N times"). The count is reported, as one line, the next time
anything is logged after that message's window has ended.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

__all__ = ["BURST", "WINDOW_S", "RepeatLimiter", "Suppressed"]

BURST = 10
WINDOW_S = 10.0
MAX_KEYS = 1024  # distinct messages remembered; the oldest is forgotten first

Key = tuple[str, str]  # (level name, message)


@dataclass
class _Window:
    started: float
    seen: int = 0
    suppressed: int = 0
    last: object = None  # the last record held back (what the report is made from)


@dataclass(frozen=True, slots=True)
class Suppressed:
    """How many records of one (level, message) were held back in a window."""

    key: Key
    count: int
    window: float
    last: object = None


class RepeatLimiter:
    """Decides which records are written; counts the ones that are not."""

    def __init__(
        self,
        burst: int = BURST,
        window: float = WINDOW_S,
        clock: Callable[[], float] = time.monotonic,
        max_keys: int = MAX_KEYS,
    ) -> None:
        self._burst = burst
        self._window = window
        self._clock = clock
        self._max_keys = max_keys
        self._windows: OrderedDict[Key, _Window] = OrderedDict()
        self._held: dict[Key, _Window] = {}  # windows with records not yet reported

    def admit(self, key: Key, record: object = None) -> bool:
        """True if a record with this key is to be written now; else it is kept as the last."""
        now = self._clock()
        window = self._windows.get(key)
        if window is None:
            window = self._remember(key, now)
        elif now - window.started >= self._window:
            window.started, window.seen = now, 0
        window.seen += 1
        if window.seen <= self._burst:
            return True
        window.suppressed += 1
        window.last = record
        self._held[key] = window
        return False

    def due(self) -> list[Suppressed]:
        """Counts of windows that have ended with records held back (each reported once).

        Call it before `admit`, so a count comes out ahead of the next record.
        """
        if not self._held:
            return []
        now = self._clock()
        ended = [key for key, w in self._held.items() if now - w.started >= self._window]
        reports = []
        for key in ended:
            window = self._held.pop(key)
            reports.append(Suppressed(key, window.suppressed, self._window, window.last))
            window.suppressed, window.last = 0, None
        return reports

    def _remember(self, key: Key, now: float) -> _Window:
        window = self._windows[key] = _Window(started=now)
        while len(self._windows) > self._max_keys:
            old_key, _ = self._windows.popitem(last=False)
            self._held.pop(old_key, None)  # its count is lost with it: rare, and bounded
        return window
