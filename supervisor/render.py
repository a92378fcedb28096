"""Human output of the ``chatq`` CLI: the tenant table, the status block, units, colours.

Pure functions of the supervisor's answers (see `TenantHandle.summary` and
`details`), so they are tested without a supervisor. Colour is decided once
by the caller with `use_colour` and passed in: ANSI codes only when stdout is
a terminal and ``NO_COLOR`` is unset (https://no-color.org).

Kept free of heavy imports: it is on the path of every ``chatq list``.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Mapping, Sequence
from datetime import datetime
from functools import partial
from typing import Any, TextIO

from chatq.shared.escape import printable, printable_lines
from chatq.shared.local_time import local_stamp, stamp_of

__all__ = [
    "TABLE_WIDTH",
    "colour_state",
    "human_age",
    "human_bytes",
    "human_duration",
    "log_line",
    "status_block",
    "tenant_table",
    "use_colour",
]

TABLE_WIDTH = 80
_MIN_TENANT_WIDTH = 8
_KEEP_TENANT_WIDTH = 24  # columns go before ids are cut shorter than this

_RESET = "\033[0m"
_STATE_COLOURS = {
    "running": "\033[32m",  # green
    "starting": "\033[33m",  # yellow
    "backoff": "\033[33m",
    "hung": "\033[31m",  # red (stacks dumped, SIGKILL on its way)
    "fatal": "\033[31m",
    "stopped": "\033[2m",  # dim
}

# (header, summary key, how to show it, right-aligned)
_COLUMNS: tuple[tuple[str, str, str, bool], ...] = (
    ("TENANT", "tenant", "text", False),
    ("STATE", "state", "text", False),
    ("PID", "pid", "int", True),
    ("UPTIME", "uptime_s", "duration", True),
    ("RESTARTS", "restarts", "int", True),
    ("BEAT", "last_heartbeat_age_s", "age", True),
    ("QUEUED", "queued", "int", True),
    ("PENDING", "replies_pending", "int", True),
    ("PROCESSED", "processed", "int", True),
    ("FAILED", "failed", "int", True),
    ("RSS", "rss_bytes", "bytes", True),
)
# Columns a narrow terminal loses first (TENANT, STATE, BEAT and the backlog stay).
_DROP_ORDER = ("rss_bytes", "uptime_s", "failed", "processed", "pid", "restarts")


# -- units ---------------------------------------------------------------------


def human_duration(seconds: float | None) -> str:
    """'45s', '3m12s', '2h05m', '3d04h'; '-' for None."""
    if seconds is None:
        return "-"
    whole = max(0, int(seconds))
    if whole < 60:
        return f"{whole}s"
    minutes, secs = divmod(whole, 60)
    if minutes < 60:
        return f"{minutes}m{secs:02d}s"
    hours, minutes = divmod(minutes, 60)
    if hours < 24:
        return f"{hours}h{minutes:02d}m"
    days, hours = divmod(hours, 24)
    return f"{days}d{hours:02d}h"


def human_age(seconds: float | None) -> str:
    """A heartbeat age: '0.1s' below ten seconds, then as `human_duration`; '-' for None."""
    if seconds is None:
        return "-"
    if seconds < 10:
        return f"{max(0.0, seconds):.1f}s"
    return human_duration(seconds)


def human_bytes(count: int | None) -> str:
    """Binary units as ps and top show them: '512B', '12K', '41M', '9.5M', '1.2G'; '-' for None."""
    if count is None:
        return "-"
    value = float(count)
    for unit in ("B", "K", "M", "G"):
        if value < 1024 or unit == "G":
            if unit == "B" or value >= 10:
                return f"{value:.0f}{unit}"
            return f"{value:.1f}{unit}"
        value /= 1024
    raise AssertionError("unreachable")


# -- colour --------------------------------------------------------------------


def use_colour(stream: TextIO, environ: Mapping[str, str] | None = None) -> bool:
    """Whether to colour output to `stream`: a terminal, and NO_COLOR unset (or empty)."""
    env = os.environ if environ is None else environ
    if env.get("NO_COLOR"):
        return False
    isatty = getattr(stream, "isatty", None)
    return bool(isatty and isatty())


def colour_state(text: str, state: str, colour: bool) -> str:
    """`text` in the colour of `state` (green running, yellow starting/backoff, ...)."""
    code = _STATE_COLOURS.get(state)
    if not colour or code is None:
        return text
    return f"{code}{text}{_RESET}"


# -- the tenant table ------------------------------------------------------------


def _cell(value: Any, kind: str) -> str:
    if kind == "duration":
        return human_duration(value)
    if kind == "age":
        return human_age(value)
    if kind == "bytes":
        return human_bytes(value)
    return "-" if value is None else str(value)


def _fit(text: str, width: int) -> str:
    """`text` cut to `width` characters, ending in '…' when cut."""
    return text if len(text) <= width else text[: width - 1] + "…"


def tenant_table(
    rows: Sequence[Mapping[str, Any]], colour: bool = False, width: int = TABLE_WIDTH
) -> str:
    """The ``chatq list`` table: aligned columns within `width` characters (the terminal's).

    The TENANT column is as wide as the longest id. Columns are two spaces
    apart, one when two would not fit; when even that is too wide, the least
    telling columns go (RSS first, see `_DROP_ORDER`) before ids are cut below
    _KEEP_TENANT_WIDTH, then ids are shortened with '…' (``--json`` has all).
    """
    columns = list(_COLUMNS)
    cells = {key: [_cell(row.get(key), kind) for row in rows] for _, key, kind, _ in columns}
    widths = {
        key: max([len(header), *(len(text) for text in cells[key])]) for header, key, *_ in columns
    }
    for key in _DROP_ORDER:
        if _least_width(columns, widths) <= width:
            break
        columns = [column for column in columns if column[1] != key]
    shown = [widths[key] for _, key, *_ in columns]
    gap = 2 if sum(shown) + 2 * (len(shown) - 1) <= width else 1
    spare = width - sum(shown) - gap * (len(shown) - 1)
    if spare < 0:
        shown[0] = max(_MIN_TENANT_WIDTH, shown[0] + spare)
    lines = [_table_line([header for header, *_ in columns], columns, shown, gap)]
    for n, row in enumerate(rows):
        paint = partial(colour_state, state=str(row.get("state")), colour=colour)
        values = [cells[key][n] for _, key, *_ in columns]
        lines.append(_table_line(values, columns, shown, gap, paint))
    return "\n".join(lines)


def _least_width(columns: Sequence[tuple[str, str, str, bool]], widths: Mapping[str, int]) -> int:
    """Their width one space apart, tenant ids cut to _KEEP_TENANT_WIDTH at most."""
    total = sum(widths[key] for _, key, *_ in columns) + len(columns) - 1
    return total - max(0, widths["tenant"] - _KEEP_TENANT_WIDTH)


def _table_line(
    values: Sequence[str],
    columns: Sequence[tuple[str, str, str, bool]],
    widths: Sequence[int],
    gap: int,
    paint_state: Callable[[str], str] = str,
) -> str:
    """One aligned line; `paint_state` colours the padded STATE cell (codes take no columns)."""
    parts = []
    for value, width, (_, key, _, right) in zip(values, widths, columns, strict=True):
        cell = _fit(value, width)
        cell = cell.rjust(width) if right else cell.ljust(width)
        parts.append(paint_state(cell) if key == "state" else cell)
    return (" " * gap).join(parts).rstrip()


# -- log lines -------------------------------------------------------------------

_JSON_LOG_KEYS = frozenset({"ts", "level", "message"})


def log_line(line: str) -> str:
    """A log line for people: a JSON one (LOG_FORMAT=json) as the text format writes it.

    Mirrors shared/log.py `format_text` (which needs loguru, too slow to
    import here); a test keeps the two equal. Other lines are returned as
    they are.
    """
    if not line.startswith("{"):
        return line
    try:
        record = json.loads(line)
    except ValueError:
        return line
    if not isinstance(record, dict) or not record.keys() >= _JSON_LOG_KEYS:
        return line
    parts = [
        _log_time(str(record["ts"])),
        str(record["level"]).ljust(5),
        f"[{printable(str(record.get('tenant_id', '-')))} pid={record.get('pid', '-')}]",
    ]
    for key, label in (("chat_id", "chat"), ("message_id", "msg")):
        if key in record:
            parts.append(f"{label}={printable(str(record[key]))}")
    parts.append(printable(str(record["message"])))
    text = " ".join(parts)
    exc = record.get("exception")
    return f"{text}\n{printable_lines(str(exc))}" if exc else text


def _log_time(stamp: str) -> str:
    try:
        return stamp_of(datetime.fromisoformat(stamp), millis=True)
    except ValueError:
        return stamp


# -- the status block ------------------------------------------------------------


def _clock_time(epoch: float) -> str:
    return local_stamp(epoch)


def _since(details: Mapping[str, Any], now: float) -> str:
    """When the tenant entered its state, as far as the answer tells."""
    uptime = details.get("uptime_s")
    if details.get("pid") is not None and uptime is not None:
        return f"since {_clock_time(now - uptime)}; {human_duration(uptime)} ago"
    last_exit = details.get("last_exit")
    if last_exit:
        ago = human_duration(now - last_exit["at"])
        return f"since {_clock_time(last_exit['at'])}; {ago} ago"
    return "never started" if details.get("state") == "stopped" else ""


def _last_exit(details: Mapping[str, Any]) -> str:
    last_exit = details.get("last_exit")
    if not last_exit:
        return "-"
    code, reason = last_exit.get("code"), str(last_exit["reason"])
    code_text = "unknown" if code is None else str(code)
    said = reason == f"exit code {code}"  # no "exit code 3 (code 3)"
    return f"{reason}{'' if said else f' (code {code_text})'} at {_clock_time(last_exit['at'])}"


def _restarts(details: Mapping[str, Any]) -> str:
    failures, asked = details.get("restarts", 0), details.get("manual_restarts", 0)
    return f"{failures} after failures, {asked} asked for"


def _counts(details: Mapping[str, Any], names: Sequence[str]) -> str:
    return ", ".join(f"{name.replace('_', ' ')} {details.get(name, 0)}" for name in names)


def _resources(details: Mapping[str, Any]) -> str:
    cpu = details.get("cpu_percent")
    fds = details.get("num_fds")
    cpu_text = "-" if cpu is None else f"{cpu:.1f}%"
    fds_text = "-" if fds is None else str(fds)
    return f"cpu {cpu_text}, fds {fds_text}, rss {human_bytes(details.get('rss_bytes'))}"


def _replies(details: Mapping[str, Any]) -> str:
    counts = {
        "pending": details.get("replies_pending", 0),
        "sent": details.get("replies_sent", 0),
        "failed": details.get("replies_failed", 0),
        "retried": details.get("replies_retried", 0),
        "rate limited": details.get("rate_limited", 0),
    }
    return ", ".join(f"{name} {count}" for name, count in counts.items())


def _paused(details: Mapping[str, Any]) -> str:
    """'paused: 190: ... (since 2026-11-30 02:00:00)': why the provider refuses all sending."""
    since = details.get("paused_since")
    when = f" (since {_clock_time(since)})" if since else ""
    return f"paused: {details['paused']}{when}; restart or reload the tenant to resume"


def _store(details: Mapping[str, Any]) -> str:
    """'41M, oldest message 2026-10-30 13:00:01 +0100 (kept 30 days)'."""
    oldest = details.get("oldest_message_at")
    days = details.get("retention_days")
    kept = "kept forever" if days == 0 else f"kept {days} days"
    when = f"oldest message {local_stamp(oldest)}" if oldest is not None else "no messages"
    return f"{human_bytes(details.get('store_bytes'))}, {when} ({kept})"


def _busiest(details: Mapping[str, Any]) -> str:
    pairs = details.get("busiest") or []
    return ", ".join(f"{chat} ({depth})" for chat, depth in pairs) or "-"


def status_block(details: Mapping[str, Any], colour: bool = False, now: float | None = None) -> str:
    """The ``chatq status`` block, after ``systemctl status``: fields, then the log tail."""
    now = time.time() if now is None else now
    state = str(details.get("state"))
    dot = colour_state("●", state, colour)
    backoff = details.get("backoff_left_s")
    fields = [
        ("State", _state_line(details, state, colour, now)),
        ("PID", _cell(details.get("pid"), "int")),
        ("Enabled", "yes" if details.get("enabled", True) else "no (in the config)"),
        ("Restarts", _restarts(details)),
        ("Last exit", _last_exit(details)),
        ("Backoff", "-" if backoff is None else f"{backoff:.1f}s left"),
        ("Heartbeat", _heartbeat(details.get("last_heartbeat_age_s"))),
        ("Resources", _resources(details)),
        *(_gateway_fields if details.get("kind") == "gateway" else _tenant_fields)(details),
    ]
    if details.get("boot_error"):
        fields.insert(5, ("Boot error", str(details["boot_error"])))
    width = max(len(label) for label, _ in fields)
    lines = [f"{dot} {details.get('tenant')}"]
    lines += [f"  {label.rjust(width)}: {value}" for label, value in fields]
    tail = details.get("log_tail") or []
    if tail:
        lines += ["", f"Log (last {len(tail)} line{'s' if len(tail) > 1 else ''}):"]
        lines += [log_line(line) for line in tail]
    return "\n".join(lines)


def _tenant_fields(details: Mapping[str, Any]) -> list[tuple[str, str]]:
    return [
        ("Queue", _counts(details, ("queued", "in_flight"))),
        ("Messages", _counts(details, ("processed", "failed", "rejected", "duplicates"))),
        *([("Sending", _paused(details))] if details.get("paused") else []),
        ("Replies", _replies(details)),
        ("Busiest", _busiest(details)),
        *([("Store", _store(details))] if "store_bytes" in details else []),
    ]


def _gateway_fields(details: Mapping[str, Any]) -> list[tuple[str, str]]:
    """The gateway's counters under its own names (its heartbeat reuses a worker's fields)."""
    get = details.get
    webhooks = f"in flight {get('in_flight', 0)}, answered 503 {get('failed', 0)}"
    webhooks += f", refused (4xx) {get('rejected', 0)}"
    forwarded = f"{get('processed', 0)}, of them duplicates {get('duplicates', 0)}"
    return [("Webhooks", webhooks), ("Forwarded", f"messages {forwarded}")]


def _state_line(details: Mapping[str, Any], state: str, colour: bool, now: float) -> str:
    since = _since(details, now)
    shown = colour_state(state, state, colour)
    return f"{shown} ({since})" if since else shown


def _heartbeat(age: float | None) -> str:
    return "none yet" if age is None else f"{human_age(age)} ago"
