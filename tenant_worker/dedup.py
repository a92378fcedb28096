"""Drop messages whose id was seen recently.

The first line of defence against a sender that retries: ingest asks
`MessageDeduplicator.is_duplicate(message_id)` before it writes anything. The
store's unique message id is the durable backstop; this cache only spares the
store the round trip for retries that arrive within the TTL.

It wraps `cachetools.TTLCache` (with the injected clock as its timer) because
that gives exactly the policy we need at O(1) amortised per check, with no
hand-written linked lists:

- an id expires `ttl_seconds` after it was *first* seen: a repeat only reads
  the cache (`in` neither refreshes the expiry nor the eviction order);
- at most `max_entries` ids are held; when full, the id seen first goes first;
- expired ids are swept from the oldest end on every insert.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from cachetools import TTLCache

__all__ = ["MessageDeduplicator"]


class MessageDeduplicator:
    """Remembers message ids for `ttl_seconds`, holding at most `max_entries`."""

    def __init__(
        self,
        ttl_seconds: float,
        max_entries: int,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        # `not x > 0` also refuses NaN.
        if not ttl_seconds > 0:
            raise ValueError(f"ttl_seconds must be > 0, got {ttl_seconds!r}")
        if isinstance(max_entries, bool) or not isinstance(max_entries, int) or max_entries < 1:
            raise ValueError(f"max_entries must be an integer >= 1, got {max_entries!r}")
        self._seen: TTLCache[str, None, float] = TTLCache(
            maxsize=max_entries, ttl=ttl_seconds, timer=clock
        )

    def is_duplicate(self, message_id: str) -> bool:
        """False the first time (and remember the id); True within the TTL after."""
        if message_id in self._seen:
            return True
        self._seen[message_id] = None
        return False

    def forget(self, message_id: str) -> None:
        """Drop `message_id`, so a retry after a failed store write is not a duplicate."""
        self._seen.pop(message_id, None)

    def __len__(self) -> int:
        """Number of ids remembered and not yet expired."""
        return len(self._seen)
