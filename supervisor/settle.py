"""The CLI's ``--wait``: poll ``list`` until the tenants a command touched reach their state.

    goals = {"acme": RUNNING, "globex": STOPPED}
    late = wait_for_states(goals, fetch_rows, timeout=60.0)   # {} when all arrived

A tenant has arrived when its row says so and no stop or restart is still
under way (``"stopping": false``): right after ``chatq restart`` the old
worker still reports ``running`` while it drains. ``fatal`` ends the wait for
a tenant that should run (it will not get there by itself). `pending` is the
pure part; the loop takes its clock and sleep so tests need not wait.

Kept free of heavy imports: it is on the path of every ``chatq restart``.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Mapping
from typing import Any

__all__ = ["GONE", "RUNNING", "SETTLED", "STOPPED", "describe_late", "pending", "wait_for_states"]

RUNNING = "running"
STOPPED = "stopped"
SETTLED = "running or stopped"  # after a reload: whichever the config and operator want
GONE = "removed"  # removed by a reload: its row disappears once it has exited
POLL_INTERVAL = 0.1  # seconds between two `list` requests

Rows = Callable[[], Iterable[Mapping[str, Any]]]


def _arrived(goal: str, row: Mapping[str, Any] | None) -> bool:
    if row is None:
        return goal == GONE
    if goal == GONE or row.get("stopping"):
        return False
    state = row.get("state")
    return state in (RUNNING, STOPPED) if goal == SETTLED else state == goal


def _hopeless(goal: str, row: Mapping[str, Any] | None) -> bool:
    """A tenant that should run but is fatal: no point waiting for it."""
    return (
        goal in (RUNNING, SETTLED)
        and row is not None
        and row.get("state") == "fatal"
        and not row.get("stopping")
    )


def pending(goals: Mapping[str, str], rows: Iterable[Mapping[str, Any]]) -> dict[str, str]:
    """The tenants of `goals` not there yet: id -> their state now ('gone' if no row)."""
    by_id = {str(row.get("tenant")): row for row in rows}
    late = {}
    for tenant, goal in goals.items():
        row = by_id.get(tenant)
        if not _arrived(goal, row):
            late[tenant] = "gone" if row is None else str(row.get("state"))
    return late


def wait_for_states(
    goals: Mapping[str, str],
    rows: Rows,
    timeout: float,
    *,
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], None] = time.sleep,
) -> dict[str, str]:
    """Poll `rows` until every tenant reached its goal, one is fatal, or `timeout` s passed.

    Returns the tenants that did not arrive, with their last state ({} on success).
    """
    deadline = clock() + timeout
    while True:
        current = list(rows())
        late = pending(goals, current)
        by_id = {str(row.get("tenant")): row for row in current}
        if not late or any(_hopeless(goals[t], by_id.get(t)) for t in late):
            return late
        left = deadline - clock()
        if left <= 0:
            return late
        sleep(min(POLL_INTERVAL, left))


def describe_late(goals: Mapping[str, str], late: Mapping[str, str]) -> str:
    """'acme (fatal, wanted running), globex (backoff, wanted running)'."""
    return ", ".join(f"{t} ({state}, wanted {goals[t]})" for t, state in sorted(late.items()))
