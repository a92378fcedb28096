"""Per-key outgoing rate limit: an exact sliding log.

Guarantee: over ANY `window` seconds (half-open, `[s, s + window)`) a key is
granted at most `max_per_minute` slots. Each key keeps a log of its grant
times (at most `max_per_minute` long); a grant at `t` occupies a slot until
`t + window`. A token bucket would not do: it refills during the window and
allows up to twice the limit across a window edge.

Why not a library: aiolimiter is a leaky bucket (it can exceed the window
bound), and `limits`' moving window is synchronous and storage-backed with no
way to await a slot; this class awaits a slot FIFO per key through an injected
clock and sleep, so tests run on fake time.

Waiting: `acquire` callers of one key queue on a per-key `asyncio.Lock`
(FIFO); only the head of the queue sleeps, until the oldest grant leaves the
window, then re-checks, so there is no thundering herd and no overshoot.
`try_acquire` never jumps that queue.

Idle keys: keys are ordered by their newest grant; every call first drops
keys from the old end whose newest grant has left the window. That is O(1)
amortised, and memory holds only keys with a grant inside the window.

A log is a flat array of doubles (8 bytes a grant; a deque of float objects
costs ~35): a worker sending 1,000 replies a second holds 60,000 grants.

Per second: `ThroughputLimiter(rate)` paces one sender (a WhatsApp number)
evenly, one grant per 1.03 / rate s, under a hard cap of this log.
"""

from __future__ import annotations

import asyncio
import math
import time
from array import array
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

__all__ = ["JITTER_S", "THROUGHPUT_MARGIN", "RateLimiter", "ThroughputLimiter"]

# What reaches the provider bunches up by network and scheduling jitter, and
# its count must not exceed the tier: the hard cap holds any 1 s + JITTER_S
# window to the tier, and the pace runs THROUGHPUT_MARGIN under it, which is
# more than JITTER_S (so the cap only binds while catching up).
THROUGHPUT_MARGIN = 0.03
JITTER_S = 0.025
# How far behind its schedule the pace still catches up at once: a loop busy
# with a burst of ingest for 20 ms then loses no slots (measured at 1,000/s:
# 0.95 of the tier with 10 ms, 0.96 with 25 ms); the cap bounds the catching up.
CATCH_UP_S = 0.025


@dataclass
class _WaitLine:
    """The `acquire` callers queued on one key."""

    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    waiting: int = 0


class _Log:
    """One key's grant times, oldest first: ``times[head:]``."""

    __slots__ = ("_head", "_times")

    def __init__(self) -> None:
        self._times = array("d")
        self._head = 0

    def __len__(self) -> int:
        return len(self._times) - self._head

    def oldest(self) -> float:
        return self._times[self._head]

    def newest(self) -> float:
        return self._times[-1]

    def append(self, when: float) -> None:
        self._times.append(when)

    def expire(self, now: float, window: float) -> None:
        """Drop grants that have left the window `(now - window, now]`."""
        times, head, end = self._times, self._head, len(self._times)
        while head < end and times[head] + window <= now:
            head += 1
        if head > 32 and head * 2 > end:  # reclaim the expired front, amortised O(1)
            del times[:head]
            head = 0
        self._head = head


class RateLimiter:
    """At most `max_per_minute` grants per key over any `window` seconds."""

    def __init__(
        self,
        max_per_minute: int,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
        *,
        window: float = 60.0,
    ) -> None:
        if (
            isinstance(max_per_minute, bool)
            or not isinstance(max_per_minute, int)
            or max_per_minute < 1
        ):
            raise ValueError(f"max_per_minute must be an integer >= 1, got {max_per_minute!r}")
        # `not x > 0` also refuses NaN.
        if not window > 0:
            raise ValueError(f"window must be > 0 seconds, got {window!r}")
        self._max = max_per_minute
        self._window = window
        self._clock = clock
        self._sleep = sleep
        # key -> grant times, oldest first; keys ordered by newest grant, oldest first.
        self._logs: OrderedDict[str, _Log] = OrderedDict()
        self._lines: dict[str, _WaitLine] = {}

    def try_acquire(self, key: str) -> bool:
        """Take a slot for `key` now if one is free and nobody is queued; never waits."""
        if key in self._lines:
            return False
        return self._grant(key, self._clock())

    async def acquire(self, key: str) -> None:
        """Wait until `key` has a free slot and take it; callers are served FIFO."""
        line = self._lines.get(key)
        if line is None:
            line = self._lines[key] = _WaitLine()
        line.waiting += 1
        try:
            async with line.lock:
                while not self._grant(key, self._clock()):
                    await self._sleep(self.wait_time(key))
        finally:
            line.waiting -= 1
            if line.waiting == 0:
                del self._lines[key]

    def wait_time(self, key: str) -> float:
        """Seconds until `key`'s log has a free slot; 0.0 if one is free now.

        Callers already queued in `acquire` go first.
        """
        now = self._clock()
        self._drop_idle(now)
        log = self._logs.get(key)
        if log is None:
            return 0.0
        log.expire(now, self._window)
        if not log:
            # Only reachable if the clock stepped back; keep "no empty logs" true.
            del self._logs[key]
        if len(log) < self._max:
            return 0.0
        return log.oldest() + self._window - now

    def __len__(self) -> int:
        """Number of keys tracked (those with a grant inside the window, as of the last call)."""
        return len(self._logs)

    def _grant(self, key: str, now: float) -> bool:
        """Record a grant for `key` at `now` if its log has room."""
        self._drop_idle(now)
        log = self._logs.get(key)
        if log is None:
            log = self._logs[key] = _Log()
        else:
            log.expire(now, self._window)
            if len(log) >= self._max:
                return False
        log.append(now)
        self._logs.move_to_end(key)
        return True

    def _drop_idle(self, now: float) -> None:
        """Forget keys whose newest grant has left the window.

        `_logs` is ordered by newest grant (the clock is monotonic), so the idle
        keys are all at the front; each key is dropped once, hence O(1) amortised.
        """
        while self._logs:
            key = next(iter(self._logs))
            if self._logs[key].newest() + self._window > now:
                return
            del self._logs[key]


class ThroughputLimiter:
    """At most `per_second` grants in any 1 s window, spread evenly over it.

    Two rules. The pace: grants follow a fixed schedule, one slot every
    ``(1 + margin) / per_second`` s; a grant late for its slot (a busy loop)
    does not push the later slots back, so lateness never adds up to a lower
    rate; up to CATCH_UP_S behind, grants catch up at once, further behind
    (or after an idle spell) the schedule restarts from now, so there is no
    burst of saved-up slots. The cap: a `RateLimiter` of `per_second` grants
    per ``1 + jitter`` s, exact on the grant times, so even catching up never
    puts more than `per_second` into one second, and up to `jitter` s of delay
    between a grant and the provider's clock cannot either.

    One sender: the key is ignored. Callers are served FIFO.
    """

    def __init__(
        self,
        per_second: int,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
        *,
        margin: float = THROUGHPUT_MARGIN,
        jitter: float = JITTER_S,
    ) -> None:
        if isinstance(per_second, bool) or not isinstance(per_second, int) or per_second < 1:
            raise ValueError(f"per_second must be an integer >= 1, got {per_second!r}")
        if not 0 <= margin < 1:
            raise ValueError(f"margin must be in [0, 1), got {margin!r}")
        if not 0 <= jitter < 1:
            raise ValueError(f"jitter must be in [0, 1) seconds, got {jitter!r}")
        self._interval = (1 + margin) / per_second
        self._next = -math.inf  # the next free slot on the schedule
        self._cap = RateLimiter(per_second, clock, sleep, window=1 + jitter)
        self._clock = clock
        self._sleep = sleep
        self._line = asyncio.Lock()

    def try_acquire(self, key: str = "") -> bool:
        """Take the current slot if it is due and nobody is queued; never waits."""
        if self._line.locked():
            return False
        now = self._clock()
        slot = self._slot(now)
        if slot > now or not self._cap.try_acquire(key):
            return False
        self._next = slot + self._interval
        return True

    async def acquire(self, key: str = "") -> None:
        """Wait for the next slot (and the cap) and take it."""
        async with self._line:
            while (slot := self._slot(now := self._clock())) > now:
                await self._sleep(slot - now)
            await self._cap.acquire(key)
            self._next = slot + self._interval

    def _slot(self, now: float) -> float:
        """The next slot; behind by more than the slack (or idle), the schedule starts now."""
        return self._next if self._next >= now - CATCH_UP_S else now
