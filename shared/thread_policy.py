"""How a helper thread is scheduled: as a batch thread, so waking it never preempts its waker.

    threading.Thread(target=work, ...)   # and first thing in `work`:
    run_as_batch()

A store's writer is woken by the event loop's thread, which holds the GIL
when it hands a job over. Woken as a normal thread, the writer often
preempted it at once, found the GIL taken and went back to sleep, and the
loop's thread then waited for a CPU again, still holding the GIL, while the
other processes on the box took their turn: handing a job over took ~135 us
of wall time under the gateway bench, ~18 us for a batch thread
(BENCHMARKS.md, gateway fifth pass). Linux's ``SCHED_BATCH`` is that
policy: the thread runs at its usual share of the CPU, but its wake-up does
not preempt the running thread; it starts when the loop's thread next
sleeps or gives up the GIL.
"""

from __future__ import annotations

import contextlib
import os

__all__ = ["run_as_batch"]


def run_as_batch() -> None:
    """Schedule the calling thread as ``SCHED_BATCH``; nothing where that is not offered."""
    with contextlib.suppress(AttributeError, OSError):  # not Linux, or refused (seccomp)
        os.sched_setscheduler(0, os.SCHED_BATCH, os.sched_param(0))
