"""One clock for people: local time with its UTC offset, in every human output.

``chatq history``, ``chatq status`` and log lines (text format, and JSON ones
rendered by ``chatq logs``) all show ``2026-11-28 13:00:01 +0100``: the
operator's own clock, and no doubt which one it is. JSON output stays UTC
ISO-8601 (``2026-11-28T12:00:01.123Z``); JSON log lines keep their ``ts``
with its offset.

Standard library only: the CLI imports it on every ``chatq status``.
"""

from __future__ import annotations

from datetime import datetime

__all__ = ["local_stamp", "stamp_of"]


def stamp_of(moment: datetime, *, millis: bool = False) -> str:
    """'2026-11-28 13:00:01 +0100' (with '.123' before the offset if `millis`).

    A naive `moment` is taken as local time.
    """
    aware = moment if moment.tzinfo is not None else moment.astimezone()
    fraction = f".{aware.microsecond // 1000:03d}" if millis else ""
    return f"{aware:%Y-%m-%d %H:%M:%S}{fraction} {aware:%z}"


def local_stamp(epoch: float, *, millis: bool = False) -> str:
    """Epoch seconds as `stamp_of` shows them, in this machine's local time zone."""
    return stamp_of(datetime.fromtimestamp(epoch).astimezone(), millis=millis)
