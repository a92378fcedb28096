"""MessageDeduplicator: TTL from first sight, bounded memory, forget."""

from __future__ import annotations

import pytest
from fakes import FakeClock

from chatq.tenant_worker.dedup import MessageDeduplicator


def test_first_sight_is_new_and_repeat_is_duplicate(clock: FakeClock) -> None:
    dedup = MessageDeduplicator(ttl_seconds=10, max_entries=100, clock=clock)
    assert dedup.is_duplicate("m1") is False
    assert dedup.is_duplicate("m1") is True
    assert dedup.is_duplicate("m2") is False
    assert len(dedup) == 2


def test_id_expires_after_ttl_and_is_remembered_again(clock: FakeClock) -> None:
    dedup = MessageDeduplicator(ttl_seconds=10, max_entries=100, clock=clock)
    dedup.is_duplicate("m1")
    clock.advance(9.999)
    assert dedup.is_duplicate("m1") is True
    clock.advance(0.001)  # exactly ttl after first sight
    assert dedup.is_duplicate("m1") is False
    clock.advance(5)
    assert dedup.is_duplicate("m1") is True


def test_repeat_does_not_extend_ttl(clock: FakeClock) -> None:
    dedup = MessageDeduplicator(ttl_seconds=10, max_entries=100, clock=clock)
    dedup.is_duplicate("m1")
    for _ in range(9):
        clock.advance(1)
        assert dedup.is_duplicate("m1") is True
    clock.advance(1)  # 10 s after first sight, 1 s after the last repeat
    assert dedup.is_duplicate("m1") is False


def test_expired_ids_do_not_count(clock: FakeClock) -> None:
    dedup = MessageDeduplicator(ttl_seconds=10, max_entries=100, clock=clock)
    for i in range(5):
        dedup.is_duplicate(f"m{i}")
    clock.advance(10)
    assert len(dedup) == 0


def test_memory_is_bounded_and_oldest_go_first(clock: FakeClock) -> None:
    dedup = MessageDeduplicator(ttl_seconds=3600, max_entries=5, clock=clock)
    for i in range(8):
        clock.advance(0.1)
        assert dedup.is_duplicate(f"m{i}") is False
    assert len(dedup) == 5
    # The newest five are remembered (checked first: a miss would re-insert).
    assert all(dedup.is_duplicate(f"m{i}") for i in range(3, 8))
    assert not any(dedup.is_duplicate(f"m{i}") for i in range(3))
    assert len(dedup) == 5


def test_eviction_order_is_first_sight_not_last_check(clock: FakeClock) -> None:
    dedup = MessageDeduplicator(ttl_seconds=3600, max_entries=3, clock=clock)
    for message_id in ("a", "b", "c"):
        dedup.is_duplicate(message_id)
    assert dedup.is_duplicate("a") is True  # a repeat must not make "a" young again
    dedup.is_duplicate("d")
    assert dedup.is_duplicate("b") is True
    assert dedup.is_duplicate("a") is False


def test_forget_lets_a_retry_through(clock: FakeClock) -> None:
    dedup = MessageDeduplicator(ttl_seconds=10, max_entries=100, clock=clock)
    dedup.is_duplicate("m1")
    dedup.is_duplicate("m2")
    dedup.forget("m1")
    assert len(dedup) == 1
    assert dedup.is_duplicate("m1") is False
    assert dedup.is_duplicate("m1") is True
    assert dedup.is_duplicate("m2") is True


def test_forget_unknown_or_expired_id_is_a_no_op(clock: FakeClock) -> None:
    dedup = MessageDeduplicator(ttl_seconds=10, max_entries=100, clock=clock)
    dedup.forget("never-seen")
    dedup.is_duplicate("m1")
    clock.advance(10)
    dedup.forget("m1")
    assert dedup.is_duplicate("m1") is False


@pytest.mark.parametrize(
    ("ttl", "max_entries", "match"),
    [
        (0, 10, "ttl_seconds"),
        (-1.5, 10, "ttl_seconds"),
        (float("nan"), 10, "ttl_seconds"),
        (10, 0, "max_entries"),
        (10, -3, "max_entries"),
        (10, 2.5, "max_entries"),
        (10, True, "max_entries"),
    ],
)
def test_bad_arguments_are_refused(ttl: float, max_entries: int, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        MessageDeduplicator(ttl_seconds=ttl, max_entries=max_entries)
