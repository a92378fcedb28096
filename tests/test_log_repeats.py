"""Repeated log lines: a burst goes through, the rest is counted and reported once."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from fakes import FakeClock
from loguru import logger

from chatq.shared.log import setup_logging
from chatq.shared.log_repeats import RepeatLimiter, Suppressed

KEY = ("ERROR", "accept failed: too many open files")


def test_a_burst_goes_through_then_the_rest_is_counted_per_window() -> None:
    clock = FakeClock()
    limiter = RepeatLimiter(burst=3, window=10.0, clock=clock)
    assert [limiter.admit(KEY) for _ in range(5)] == [True, True, True, False, False]
    assert limiter.admit(("INFO", "other")) is True  # other messages are not held back
    assert limiter.due() == []  # the window has not ended

    clock.advance(10.0)
    assert limiter.due() == [Suppressed(KEY, 2, 10.0)]
    assert limiter.due() == []  # reported once
    assert [limiter.admit(KEY) for _ in range(4)] == [True, True, True, False]


def test_memory_stays_bounded_by_max_keys() -> None:
    limiter = RepeatLimiter(burst=1, window=10.0, clock=FakeClock(), max_keys=100)
    for n in range(10_000):
        limiter.admit(("INFO", f"reply {n}"))
    assert len(limiter._windows) == 100


@pytest.fixture
def lines() -> Iterator[list[str]]:
    got: list[str] = []
    yield got
    logger.remove()


def test_a_storm_of_one_error_writes_a_burst_only(lines: list[str]) -> None:
    setup_logging("INFO", tenant_id="acme", sink=lines.append)
    for _ in range(1_000):
        logger.error("accept failed: too many open files")
    logger.info("served again")
    assert sum("too many open files" in line for line in lines) == 10
    assert lines[-1].endswith("served again")


def test_the_count_goes_out_as_a_line_once_the_window_ends(lines: list[str]) -> None:
    from chatq.shared.log import _line_writer, _no_format, format_text

    clock = FakeClock()
    logger.remove()
    sink = _line_writer(lines.append, format_text, RepeatLimiter(2, 10.0, clock))
    logger.add(sink, format=_no_format)
    for _ in range(5):
        logger.error("disk full")
    clock.advance(10.0)
    logger.info("recovered")
    assert [line.split("] ", 1)[1] for line in lines] == [
        "disk full",
        "disk full",
        "(repeated 3 more times in 10 s) disk full",
        "recovered",
    ]
