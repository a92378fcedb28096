"""One tenant as the supervisor sees it: a `ProgramHandle` that runs the tenant's worker."""

from __future__ import annotations

import time
from collections.abc import Callable
from multiprocessing.connection import Connection
from multiprocessing.context import ForkServerContext
from multiprocessing.process import BaseProcess
from typing import Any

from chatq.config import ChatqConfig, TenantConfig
from chatq.supervisor.program import ExitInfo, ProgramHandle, State, describe_exit
from chatq.supervisor.spawn import spawn_worker

__all__ = ["ExitInfo", "State", "TenantHandle", "describe_exit"]


# A tenant's `summary` fields before its first heartbeat.
_NO_BEAT_ROW: dict[str, Any] = {
    "replies_sent": 0,
    "replies_failed": 0,
    "replies_retried": 0,
    "replies_pending": 0,
    "paused": None,
    "ingest_refused": 0,
    "ingest_timeouts": 0,
    "store_unavailable": None,
}


class TenantHandle(ProgramHandle):
    """One tenant's worker, restarted per its policy."""

    kind = "tenant"
    noun = "worker"

    def __init__(
        self,
        config: ChatqConfig,
        tenant: TenantConfig,
        *,
        clock: Callable[[], float] = time.monotonic,
        wall: Callable[[], float] = time.time,
    ) -> None:
        super().__init__(config, clock=clock, wall=wall)
        self.tenant = tenant

    @property
    def id(self) -> str:
        return self.tenant.id

    @property
    def enabled(self) -> bool:
        return self.tenant.enabled

    @property
    def memory_limit_mb(self) -> int | None:
        return self.tenant.memory_limit_mb

    def spawn(self, ctx: ForkServerContext) -> tuple[BaseProcess, Connection]:
        return spawn_worker(ctx, self.config, self.tenant)

    def summary(self) -> dict[str, Any]:
        """The program's row, with the outbox's counters and a paused sending's reason."""
        row = super().summary()  # filled in place: `list` builds one per tenant
        beat = self.heartbeat
        if beat is None:
            row.update(_NO_BEAT_ROW)
            return row
        row["replies_sent"] = beat.replies_sent
        row["replies_failed"] = beat.replies_failed
        row["replies_retried"] = beat.replies_retried
        row["replies_pending"] = beat.replies_pending
        row["paused"] = beat.paused
        row["ingest_refused"] = beat.ingest_refused
        row["ingest_timeouts"] = beat.ingest_timeouts
        row["store_unavailable"] = beat.store_unavailable
        return row

    def details(self) -> dict[str, Any]:
        """`summary`'s details, with when sending was paused."""
        beat = self.heartbeat
        return {
            **super().details(),
            "paused_since": beat.paused_since if beat else None,
            "store_bytes": beat.store_bytes if beat else None,
            "oldest_message_at": beat.oldest_at if beat else None,
            "retention_days": self.tenant.retention_days,
        }
