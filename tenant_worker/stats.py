"""Counters a worker reports in its heartbeats."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(slots=True)
class WorkerStats:
    """Totals since the store was created (seeded from it at boot) or since start.

    processed/failed/rejected are seeded from the store, so they survive
    restarts; duplicates/rate_limited/sent/send_failed/retried count since this
    process started (retried: reply attempts that failed and were rescheduled).
    """

    processed: int = 0
    failed: int = 0
    rejected: int = 0
    duplicates: int = 0
    rate_limited: int = 0
    sent: int = 0
    send_failed: int = 0
    retried: int = 0
