"""One clock in human output: local time with its offset."""

from __future__ import annotations

import time
from collections.abc import Iterator
from datetime import UTC, datetime

import pytest

from chatq.shared.local_time import local_stamp, stamp_of
from chatq.supervisor.render import log_line

NOON = datetime(2026, 11, 28, 12, 0, 0, 123_000, tzinfo=UTC).timestamp()


@pytest.fixture(autouse=True)
def new_york(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.setenv("TZ", "America/New_York")
    time.tzset()
    yield
    monkeypatch.undo()
    time.tzset()


def test_local_time_with_its_offset() -> None:
    assert local_stamp(NOON) == "2026-11-28 07:00:00 -0500"
    assert local_stamp(NOON, millis=True) == "2026-11-28 07:00:00.123 -0500"
    assert stamp_of(datetime.fromtimestamp(NOON, tz=UTC), millis=True) == (
        "2026-11-28 12:00:00.123 +0000"  # an aware time keeps its own zone
    )


def test_a_json_log_line_keeps_the_writers_offset() -> None:
    line = '{"ts": "2026-11-28T13:00:00.123+01:00", "level": "INFO", "message": "hi"}'
    assert log_line(line) == "2026-11-28 13:00:00.123 +0100 INFO  [- pid=-] hi"
