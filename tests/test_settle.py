"""The CLI's --wait: which tenants have reached their state, polled with a fake clock."""

from __future__ import annotations

from typing import Any

from chatq.supervisor import settle
from chatq.supervisor.settle import GONE, RUNNING, SETTLED, STOPPED, pending, wait_for_states


def row(tenant: str, state: str, stopping: bool = False) -> dict[str, Any]:
    return {"tenant": tenant, "state": state, "stopping": stopping}


def test_a_draining_worker_has_not_arrived_even_if_running() -> None:
    goals = {"a": RUNNING, "b": STOPPED}
    assert pending(goals, [row("a", "running", stopping=True), row("b", "stopped")]) == {
        "a": "running"
    }
    assert pending(goals, [row("a", "running"), row("b", "stopped")]) == {}


def test_settled_and_gone_goals() -> None:
    goals = {"a": SETTLED, "b": SETTLED, "gone": GONE}
    rows = [row("a", "stopped"), row("b", "backoff"), row("gone", "running", stopping=True)]
    assert pending(goals, rows) == {"b": "backoff", "gone": "running"}
    assert pending(goals, [row("a", "running"), row("b", "running")]) == {}
    assert pending({"x": RUNNING}, []) == {"x": "gone"}


def test_wait_polls_until_there_or_timeout_without_real_sleeps() -> None:
    now = [0.0]
    answers = iter([[row("a", "starting")], [row("a", "starting")], [row("a", "running")]])
    late = wait_for_states(
        {"a": RUNNING},
        lambda: next(answers),
        5.0,
        clock=lambda: now[0],
        sleep=lambda s: now.__setitem__(0, now[0] + s),
    )
    assert late == {} and now[0] == 2 * settle.POLL_INTERVAL

    late = wait_for_states(
        {"a": RUNNING},
        lambda: [row("a", "backoff")],
        1.0,
        clock=lambda: now[0],
        sleep=lambda s: now.__setitem__(0, now[0] + s),
    )
    assert late == {"a": "backoff"}
    assert settle.describe_late({"a": RUNNING}, late) == "a (backoff, wanted running)"


def test_a_fatal_tenant_ends_the_wait_at_once() -> None:
    calls = []

    def rows() -> list[dict[str, Any]]:
        calls.append(1)
        return [row("a", "fatal"), row("b", "starting")]

    late = wait_for_states({"a": RUNNING, "b": RUNNING}, rows, 60.0, sleep=lambda s: None)
    assert late == {"a": "fatal", "b": "starting"} and len(calls) == 1
