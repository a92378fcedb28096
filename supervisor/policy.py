"""When to restart a worker that exited, and after how long: pure policy.

Two rules, both on an injected clock so tests never sleep:

- **Backoff.** The first failure restarts at once; the n-th consecutive one
  waits ``initial * 2**(n-2)`` seconds, capped at ``maximum``, spread by
  ± ``jitter`` (a fraction) so tenants that died together do not restart in
  lockstep. A run that lasted ``healthy_after`` seconds or more was healthy:
  the next failure starts the count again at 1.
- **Intensity.** More than ``max_restarts`` exits within ``window`` seconds
  make the tenant fatal: it stays down until an operator restarts it
  (`RestartPolicy.reset`).

Why the defaults (those of `config.settings.SupervisorSettings`):

- Immediate first restart, then ``initial=0.1`` s doubling to ``maximum=30`` s:
  a one-off crash costs a tenant only the respawn (tens of ms); a tenant
  whose dependency is down retries twice a minute.
- ``healthy_after=10`` s: ten heartbeat intervals of useful work.
- ``max_restarts=10`` in ``window=60`` s. A handler that crashes the worker on
  one message (segfault, os._exit, OOM) crashes it again on every replay; the
  worker quarantines that message after its ``max_attempts`` (3) attempts, so
  recovering from one poison message costs about three quick restarts.
  ``max_restarts`` must stay well above that, or a single bad message would
  make a whole tenant fatal instead of being quarantined.

How the two rules combine: 11 instant exits take the first ten delays,
0 + 0.1 + 0.2 + ... + 12.8 = ~25.5 s (~31 s with full positive jitter), well
inside the 60 s window, so a worker that crashes as soon as it starts turns
fatal after about half a minute instead of retrying forever.
"""

from __future__ import annotations

import math
import random
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

__all__ = ["Decision", "RestartPolicy", "compute_backoff"]

Clock = Callable[[], float]
Rand = Callable[[], float]

# 2**63 * any sane `initial` is past any sane `maximum`; stops float overflow.
_MAX_DOUBLINGS = 63


def compute_backoff(
    failures: int,
    *,
    initial: float,
    maximum: float,
    jitter: float = 0.2,
    rand: Rand = random.random,
) -> float:
    """Seconds to wait before restarting after `failures` consecutive failures.

    0 failures -> 0. Otherwise ``min(initial * 2**(failures-1), maximum)``,
    scaled by a factor in ``[1 - jitter, 1 + jitter)`` drawn from `rand`
    (uniform in [0, 1)); never negative. ValueError on a bad argument.
    """
    _check_backoff_args(failures, initial, maximum, jitter)
    if failures == 0:
        return 0.0
    base = min(initial * 2.0 ** min(failures - 1, _MAX_DOUBLINGS), maximum)
    return max(0.0, base * (1.0 + jitter * (2.0 * rand() - 1.0)))


def _check_backoff_args(failures: int, initial: float, maximum: float, jitter: float) -> None:
    if isinstance(failures, bool) or not isinstance(failures, int) or failures < 0:
        raise ValueError(f"failures must be an integer >= 0, got {failures!r}")
    if not (math.isfinite(initial) and initial >= 0):
        raise ValueError(f"initial must be a finite number >= 0, got {initial!r}")
    if not (math.isfinite(maximum) and maximum >= initial):
        raise ValueError(f"maximum must be a finite number >= initial, got {maximum!r}")
    if not 0 <= jitter <= 1:
        raise ValueError(f"jitter must be between 0 and 1, got {jitter!r}")


@dataclass(frozen=True, slots=True)
class Decision:
    """What to do about a worker that exited: restart after `delay` s, or give up."""

    action: Literal["restart", "fatal"]
    delay: float = 0.0


class RestartPolicy:
    """Restart decisions for one tenant's worker.

    Call `on_start()` when a worker process is started and `on_exit()` when
    it exits unasked (a crash, a kill by the watchdog). Exits the supervisor
    asked for (stop, reload, shutdown) are not failures: do not report them.
    """

    def __init__(
        self,
        initial: float = 0.1,
        maximum: float = 30.0,
        healthy_after: float = 10.0,
        max_restarts: int = 10,
        window: float = 60.0,
        *,
        clock: Clock = time.monotonic,
        rand: Rand = random.random,
    ) -> None:
        self.set_limits(initial, maximum, healthy_after, max_restarts, window)
        self._clock = clock
        self._rand = rand
        self._started_at: float | None = None
        self._failures = 0
        self._exits: deque[float] = deque()  # exit times within the window, oldest first
        self._fatal = False

    def set_limits(
        self,
        initial: float,
        maximum: float,
        healthy_after: float,
        max_restarts: int,
        window: float,
    ) -> None:
        """Set (or, on a config reload, change) the limits; the history stays."""
        _check_backoff_args(0, initial, maximum, 0.0)
        if not healthy_after >= 0:
            raise ValueError(f"healthy_after must be >= 0, got {healthy_after!r}")
        if isinstance(max_restarts, bool) or not isinstance(max_restarts, int) or max_restarts < 0:
            raise ValueError(f"max_restarts must be an integer >= 0, got {max_restarts!r}")
        if not window > 0:
            raise ValueError(f"window must be > 0, got {window!r}")
        self._initial = initial
        self._maximum = maximum
        self._healthy_after = healthy_after
        self._max_restarts = max_restarts
        self._window = window

    @property
    def failures(self) -> int:
        """Consecutive failures so far (0 after a healthy run or a reset)."""
        return self._failures

    @property
    def fatal(self) -> bool:
        """Whether the policy gave up; only `reset()` clears it."""
        return self._fatal

    def on_start(self) -> None:
        """Record that a worker process was just started."""
        self._started_at = self._clock()

    def on_exit(self) -> Decision:
        """Record an unasked exit and decide: restart after a delay, or fatal."""
        now = self._clock()
        if self._fatal:
            return Decision("fatal")
        if self._started_at is not None and now - self._started_at >= self._healthy_after:
            self._failures = 0
        self._started_at = None
        self._failures += 1
        self._exits.append(now)
        while self._exits and self._exits[0] <= now - self._window:
            self._exits.popleft()
        if len(self._exits) > self._max_restarts:
            self._fatal = True
            return Decision("fatal")
        # The first failure restarts at once: a one-off crash costs only the
        # respawn. Repeats back off: initial, 2 * initial, ...
        delay = compute_backoff(
            self._failures - 1, initial=self._initial, maximum=self._maximum, rand=self._rand
        )
        return Decision("restart", delay)

    def reset(self) -> None:
        """Forget all history, e.g. when an operator restarts a fatal tenant."""
        self._started_at = None
        self._failures = 0
        self._exits.clear()
        self._fatal = False
