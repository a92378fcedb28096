"""Logging for chatq, on loguru.

`setup_logging()` gives the process exactly one sink. Every record carries the
process's `tenant_id` ("-" in the supervisor) and its pid; inside
`bind_message()` it also carries `chat_id` and `message_id`, across awaits in
the same task (a contextvar, copied into a record by a patcher only when one
is written: the worker binds every message, and most log nothing). Records that
libraries write through stdlib `logging` (aiohttp, asyncio) are
routed into loguru, so one process has one format.

Two line formats, built by plain functions of a loguru record so that other
code (e.g. forwarding a child's records to the parent) can reuse them:

- `format_text`: one line per record for people, e.g.
  ``2026-11-28 04:50:01.123 +0000 INFO  [acme pid=123] chat=c1 msg=m9 enqueued``;
  newlines in the message are escaped, a traceback follows on its own lines.
- `format_json`: one JSON object per line with `ts`, `level`, `message`,
  `tenant_id`, `pid`, `logger`, `chat_id`/`message_id` when known,
  `exception` when there is one, and any other bound extra.

A storm of one message (the same level and text) is cut to `BURST` lines per
`WINDOW_S` seconds, then one line saying how many more there were
(shared/log_repeats.py).

Neither goes through loguru's `{...}` format strings, so braces in a message
are printed as they are.

Cheap when disabled: loguru drops a record below the level before formatting,
but the call's arguments are still built. For costly arguments use
``logger.opt(lazy=True).debug("state {}", lambda: dump())`` or guard the call
with ``if debug_enabled():`` (a cached bool, set by `setup_logging`).
"""

from __future__ import annotations

import importlib
import inspect
import json
import logging
import sys
import traceback
from collections.abc import Callable
from contextvars import ContextVar, Token
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal, TextIO, cast

from loguru import logger

from chatq.shared.errors import ConfigError
from chatq.shared.escape import printable, printable_lines
from chatq.shared.local_time import stamp_of
from chatq.shared.log_repeats import RepeatLimiter, Suppressed

if TYPE_CHECKING:
    from loguru import Message, Record

__all__ = [
    "bind_message",
    "debug_enabled",
    "format_json",
    "format_text",
    "preset_logging",
    "setup_logging",
]

LogFormat = Literal["text", "json"]
LineSink = TextIO | Callable[[str], object]

_NO_TENANT = "-"


@dataclass
class _Setup:
    """What the current setup decided, cached for hot paths."""

    debug: bool = False
    preset: tuple[int, str] | None = None  # (level, format) of `preset_logging`'s sink, if current
    relay_to: Callable[[str], object] | None = None  # where that sink sends lines now


_current = _Setup()


def setup_logging(
    level: str = "INFO",
    fmt: LogFormat = "text",
    *,
    tenant_id: str | None = None,
    sink: LineSink | None = None,
) -> None:
    """Make loguru write `fmt` lines at `level` or above to one sink (default stderr).

    Calling it again replaces the previous setup. A TextIO sink gets each line
    with a trailing newline; a callable gets it without. Raises ConfigError on
    an unknown level or format, before changing anything.
    """
    levelno = _level_number(level)
    if fmt not in _FORMATTERS:
        raise ConfigError(f"LOG_FORMAT must be 'text' or 'json', got {fmt!r}")
    if _current.preset == (levelno, fmt) and callable(sink):
        _current.relay_to = sink  # the preset sink, inherited from the fork server
        logger.configure(extra={"tenant_id": tenant_id or _NO_TENANT})
        return
    _current.preset = _current.relay_to = None
    logger.remove()
    logger.configure(extra={"tenant_id": tenant_id or _NO_TENANT}, patcher=_add_message_ids)
    logger.add(
        _line_writer(sink if sink is not None else sys.stderr, _FORMATTERS[fmt], RepeatLimiter()),
        level=levelno,
        format=_no_format,
        # Our formatters render the traceback; diagnose would leak variable values.
        backtrace=False,
        diagnose=False,
    )
    _current.debug = levelno <= logger.level("DEBUG").no
    _install_intercept(levelno)


def preset_logging(level: str, fmt: LogFormat) -> None:
    """In a fork server: set up, once, the sink its children will log through.

    A child's `setup_logging` with the same level and format and a callable
    sink then only points this sink at it and sets its tenant id. Run in
    each freshly forked worker, the whole set-up (loguru's handler, the
    stdlib intercept) cost ~1.3 ms and ~1 MB of copied inherited pages.
    Until a child does, lines go to stderr.
    """
    setup_logging(level, fmt, sink=_relay)
    _current.preset = (_level_number(level), fmt)


def _relay(line: str) -> None:
    sink = _current.relay_to
    if sink is None:
        sys.stderr.write(line + "\n")
    else:
        sink(line)


def debug_enabled() -> bool:
    """Whether DEBUG records are emitted under the current setup (False before setup)."""
    return _current.debug


_message_ids: ContextVar[tuple[str, str] | None] = ContextVar("chatq_message_ids", default=None)


class _MessageScope:
    __slots__ = ("_ids", "_token")

    def __init__(self, ids: tuple[str, str]) -> None:
        self._ids = ids

    def __enter__(self) -> None:
        self._token: Token[tuple[str, str] | None] = _message_ids.set(self._ids)

    def __exit__(self, *exc_info: object) -> None:
        _message_ids.reset(self._token)


def bind_message(chat_id: str, message_id: str) -> _MessageScope:
    """Tag every record written inside (in this task or thread) with the message's ids."""
    return _MessageScope((chat_id, message_id))


def _add_message_ids(record: Record) -> None:
    ids = _message_ids.get()
    if ids is not None:
        record["extra"]["chat_id"], record["extra"]["message_id"] = ids


def format_text(record: Record) -> str:
    """One human-readable line (plus traceback lines, if any), without a trailing newline."""
    extra = record["extra"]
    time = record["time"]
    parts = [
        stamp_of(time, millis=True),  # local, with its offset: one clock (shared/local_time.py)
        record["level"].name.ljust(5),
        f"[{_one_line(str(extra.get('tenant_id', _NO_TENANT)))} pid={record['process'].id}]",
    ]
    if "chat_id" in extra:
        parts.append(f"chat={_one_line(str(extra['chat_id']))}")
    if "message_id" in extra:
        parts.append(f"msg={_one_line(str(extra['message_id']))}")
    parts.append(_one_line(record["message"]))
    line = " ".join(parts)
    exc = _exception_text(record)
    return f"{line}\n{exc}" if exc else line


def format_json(record: Record) -> str:
    """One JSON object on one line, without a trailing newline."""
    extra = record["extra"]
    obj: dict[str, Any] = {
        "ts": record["time"].isoformat(timespec="milliseconds"),
        "level": record["level"].name,
        "message": record["message"],
        "tenant_id": extra.get("tenant_id", _NO_TENANT),
        "pid": record["process"].id,
        "logger": record["name"],
    }
    for key, value in extra.items():  # chat_id, message_id, bound values; never the fixed keys
        obj.setdefault(str(key), value)
    exc = _exception_text(record)
    if exc:
        obj["exception"] = exc
    return json.dumps(obj, default=str, ensure_ascii=False)


_FORMATTERS: dict[str, Callable[[Record], str]] = {"text": format_text, "json": format_json}


class _InterceptHandler(logging.Handler):
    """Hands stdlib logging records to loguru (the recipe from loguru's README)."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            level: str | int = logger.level(record.levelname).name
        except ValueError:
            level = record.levelno
        try:
            logger.opt(depth=_caller_depth(), exception=record.exc_info).log(
                level, record.getMessage()
            )
        except Exception:
            self.handleError(record)


def _caller_depth() -> int:
    """Stack depth from loguru's call to the code that called stdlib logging."""
    frame, depth = inspect.currentframe(), 0
    while frame is not None:
        filename = frame.f_code.co_filename
        in_logging = filename == logging.__file__
        frozen = "importlib" in filename and "_bootstrap" in filename
        # depth 0 is this function; count one more for _InterceptHandler.emit.
        if depth > 1 and not (in_logging or frozen):
            break
        frame = frame.f_back
        depth += 1
    return depth - 1


def _install_intercept(levelno: int) -> None:
    """Put one intercept handler on the root logger, replacing an earlier one."""
    root = logging.getLogger()
    for handler in root.handlers[:]:
        if isinstance(handler, _InterceptHandler):
            root.removeHandler(handler)
    root.addHandler(_InterceptHandler())
    # Stdlib drops records below this before building them: libraries' debug
    # chatter costs nothing unless we asked for it.
    root.setLevel(levelno)


def _line_writer(
    sink: LineSink, formatter: Callable[[Record], str], repeats: RepeatLimiter
) -> Callable[[Message], None]:
    """A loguru sink that formats the record itself and hands the line to `sink`.

    Repeats of one message past `repeats`' burst are held back and counted;
    the count goes out as a line of its own when their window ends.
    """
    write = _line_sink(sink)

    def hand_over(message: Message) -> None:
        record = message.record
        for report in repeats.due():
            write(formatter(_repeated(cast("Record", report.last), report)))
        key = (record["level"].name, record["message"])
        if repeats.admit(key, record):
            write(formatter(record))

    return hand_over


def _line_sink(sink: LineSink) -> Callable[[str], object]:
    if callable(sink):
        return sink
    stream = sink

    def write(line: str) -> None:
        stream.write(line + "\n")
        stream.flush()

    return write


def _repeated(record: Record, report: Suppressed) -> Record:
    """`record` as the line that reports how often it was held back."""
    text = f"(repeated {report.count} more times in {report.window:g} s) {record['message']}"
    return cast("Record", {**record, "message": text, "exception": None})


def _no_format(_record: Record) -> str:
    # The sink formats from the record; loguru's own format output is unused.
    return ""


def _remember_loguru_lib_dirs() -> None:
    """Have loguru work out its library folders once per process tree, not per sink.

    Every `logger.add` builds an exception formatter that expands 36
    sysconfig paths to find them: ~5 ms, and ~20 ms in a worker just forked
    (each expansion walks ~1,000 inherited config values, copying the pages
    their reference counts live on), a third of a worker's boot. Our sinks
    format tracebacks themselves and never use the folders. Done at import,
    so the fork server does it once and every worker inherits the answer.
    Another loguru without this helper just pays the cost.
    """
    try:
        formatter: Any = importlib.import_module("loguru._better_exceptions").ExceptionFormatter
        folders = list(formatter._get_lib_dirs())
    except (ImportError, AttributeError):
        return
    formatter._get_lib_dirs = staticmethod(lambda: list(folders))


_remember_loguru_lib_dirs()


def _level_number(level: str) -> int:
    try:
        return logger.level(level.upper()).no
    except ValueError:
        raise ConfigError(f"LOG_LEVEL: unknown level {level!r}") from None


def _one_line(text: str) -> str:
    return printable(text)  # chat content: no escape sequence reaches a terminal


def _exception_text(record: Record) -> str:
    exc = record["exception"]
    if exc is None or exc.value is None:
        return ""
    text = "".join(traceback.format_exception(exc.type, exc.value, exc.traceback))
    return printable_lines(text.rstrip("\n"))
