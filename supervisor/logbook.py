"""The recent log lines the supervisor relays, kept per source for ``chatq logs``.

    book = LogBook()
    book.add("acme", line)                      # from the loop (workers) or any thread (own)
    page = book.read("acme", after=0, limit=20)  # the last 20 of acme
    page = book.read(None, after=page.next)     # what every source wrote since

Every line gets a sequence number, one counter over all sources, so a reader
follows the stream by asking for what came after the last number it saw
(``chatq logs -f`` polls the control socket with it). Each source keeps its
last `KEEP_PER_SOURCE` lines, so one noisy tenant cannot push a quiet one's
lines out. A lock guards the book: the supervisor's own records may be
written from its metrics thread too.
"""

from __future__ import annotations

import heapq
import threading
from collections import deque
from dataclasses import dataclass

__all__ = ["KEEP_PER_SOURCE", "LogBook", "Page"]

KEEP_PER_SOURCE = 1000


@dataclass(frozen=True, slots=True)
class Page:
    """Lines after a sequence number, oldest first, and the number to ask after next."""

    lines: list[str]
    next: int


class LogBook:
    """Bounded recent lines per source, numbered in arrival order."""

    def __init__(self, keep: int = KEEP_PER_SOURCE) -> None:
        self._keep = keep
        self._sources: dict[str, deque[tuple[int, str]]] = {}
        self._seq = 0
        self._lock = threading.Lock()

    def add(self, source: str, line: str) -> None:
        """Keep `line` (without its trailing newline) as `source`'s latest."""
        with self._lock:
            self._seq += 1
            kept = self._sources.get(source)
            if kept is None:
                kept = self._sources[source] = deque(maxlen=self._keep)
            kept.append((self._seq, line.rstrip("\n")))

    def read(self, source: str | None, after: int = 0, limit: int | None = None) -> Page:
        """`source`'s lines (every source's if None) numbered above `after`: the last `limit`."""
        with self._lock:
            chosen = (
                [self._sources.get(source, ())] if source is not None else self._sources.values()
            )
            found = list(heapq.merge(*(_after(list(kept), after) for kept in chosen)))
            last = self._seq
        if limit is not None:
            found = found[-limit:] if limit else []
        return Page([line for _, line in found], last)


def _after(kept: list[tuple[int, str]], after: int) -> list[tuple[int, str]]:
    """The entries numbered above `after` (entries are in ascending order)."""
    start = len(kept)
    while start > 0 and kept[start - 1][0] > after:
        start -= 1
    return kept[start:]
