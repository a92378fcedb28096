"""The pipe protocol between a tenant worker and the supervisor.

Each frame is one JSON object sent with `Connection.send_bytes` and read with
`Connection.recv_bytes`. JSON rather than pickle: the supervisor must never
unpickle what a (possibly broken or compromised) worker hands it, and a frame
must be checkable field by field.

    worker -> supervisor   Ready, Heartbeat, Beat, BootFailed, LogRecord
    supervisor -> worker   Stop

On the wire a frame is its fields plus ``"kind"``, e.g.
``{"kind": "ready", "pid": 4242}``. `decode` checks every field (type, sign,
no missing or unknown ones) and raises `ProtocolError` naming what was wrong;
`encode` runs the same checks, so a bug shows up in the sender. Fields added
after a frame kind first shipped are optional on the wire (`_OPTIONAL`): a
frame from an older worker, without them, decodes with their defaults. A
frame is at most `MAX_FRAME_BYTES`; `recv` refuses a longer one without reading it into
memory. After a `ProtocolError` from `recv` the connection can no longer be
read: treat the peer as broken.

`recv` lets `EOFError` (peer closed its end) and `OSError` through unchanged;
the supervisor treats both as the worker going away.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from multiprocessing.connection import Connection
from typing import Any, ClassVar, Literal, TypeAlias

from chatq.shared.errors import ChatqError

__all__ = [
    "MAX_BUSIEST",
    "MAX_FRAME_BYTES",
    "Beat",
    "BootFailed",
    "Frame",
    "Heartbeat",
    "LogRecord",
    "ProtocolError",
    "Ready",
    "Stop",
    "SupervisorFrame",
    "WorkerFrame",
    "decode",
    "encode",
    "encode_beat",
    "heartbeat_of",
    "recv",
    "same_counters",
    "send",
]

MAX_FRAME_BYTES = 1 << 20  # 1 MiB: far above any real frame, far below harm
MAX_BUSIEST = 5  # chats listed in a heartbeat's `busiest`


class ProtocolError(ChatqError):
    """A pipe frame is malformed, of an unknown kind, or over MAX_FRAME_BYTES."""


@dataclass(frozen=True, slots=True)
class Ready:
    """Worker -> supervisor: booted, replayed its backlog, now taking input."""

    kind: ClassVar[Literal["ready"]] = "ready"
    pid: int


@dataclass(frozen=True, slots=True)
class Heartbeat:
    """Worker -> supervisor, from the worker's event loop: alive, with counters.

    `busiest` lists up to MAX_BUSIEST ``(chat_id, depth)`` pairs, deepest first.
    `replies_*` count since the worker started, except `replies_pending`: the
    replies waiting to be sent now (rate limiter, retry, pause); `paused` is why the provider
    refuses the tenant's sending (None while sending), `paused_since` when
    that began (epoch seconds). `store_bytes` is the store's size on disk,
    `oldest_at` when its oldest message arrived (None: no messages).
    """

    kind: ClassVar[Literal["heartbeat"]] = "heartbeat"
    seq: int
    time: float
    queued: int
    in_flight: int
    processed: int
    failed: int
    rejected: int
    duplicates: int
    rate_limited: int
    busiest: list[tuple[str, int]] = field(default_factory=list)
    replies_sent: int = 0
    replies_failed: int = 0
    replies_retried: int = 0
    paused: str | None = None
    paused_since: float | None = None
    ingest_refused: int = 0  # connections past ingest's cap (answered 503)
    ingest_timeouts: int = 0  # request bodies too slow to arrive (answered 408)
    store_unavailable: str | None = None  # why store writes fail for now (disk full, ...)
    replies_pending: int = 0
    store_bytes: int = 0
    oldest_at: float | None = None


@dataclass(frozen=True, slots=True)
class Beat:
    """Worker -> supervisor: a heartbeat whose counters are those of the last
    `Heartbeat` sent (an idle worker's beats: a few bytes instead of a few
    hundred, and nothing to check field by field)."""

    kind: ClassVar[Literal["beat"]] = "beat"
    seq: int


@dataclass(frozen=True, slots=True)
class BootFailed:
    """Worker -> supervisor: could not start (bad handler, store); do not restart."""

    kind: ClassVar[Literal["boot_failed"]] = "boot_failed"
    reason: str


@dataclass(frozen=True, slots=True)
class LogRecord:
    """Worker -> supervisor: one already formatted log line and its level name.

    The sender should cut very long lines (a huge traceback) well below
    MAX_FRAME_BYTES; `encode` refuses a frame over it rather than cutting.
    """

    kind: ClassVar[Literal["log"]] = "log"
    line: str
    level: str


@dataclass(frozen=True, slots=True)
class Stop:
    """Supervisor -> worker: drain and exit."""

    kind: ClassVar[Literal["stop"]] = "stop"
    reason: str


WorkerFrame: TypeAlias = Ready | Heartbeat | Beat | BootFailed | LogRecord
SupervisorFrame: TypeAlias = Stop
Frame: TypeAlias = WorkerFrame | SupervisorFrame

# A field check gets (frame kind, field name, raw value) and returns the typed value.
_Check = Callable[[str, str, object], Any]


def _fail(kind: str, name: str, expected: str, value: object) -> ProtocolError:
    return ProtocolError(f"{kind} frame: field {name!r} must be {expected}, got {value!r:.80}")


def _count(kind: str, name: str, value: object) -> int:
    # bool is an int subclass; True is not a count.
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise _fail(kind, name, "a non-negative integer", value)
    return value


def _number(kind: str, name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise _fail(kind, name, "a finite number", value)
    return float(value)


def _text(kind: str, name: str, value: object) -> str:
    if not isinstance(value, str):
        raise _fail(kind, name, "a string", value)
    return value


def _name(kind: str, name: str, value: object) -> str:
    if not isinstance(value, str) or not value:
        raise _fail(kind, name, "a non-empty string", value)
    return value


def _optional_text(kind: str, name: str, value: object) -> str | None:
    return None if value is None else _text(kind, name, value)


def _optional_number(kind: str, name: str, value: object) -> float | None:
    return None if value is None else _number(kind, name, value)


def _busiest(kind: str, name: str, value: object) -> list[tuple[str, int]]:
    expected = f"a list of at most {MAX_BUSIEST} [chat_id, depth] pairs"
    if not isinstance(value, list | tuple) or len(value) > MAX_BUSIEST:
        raise _fail(kind, name, expected, value)
    pairs: list[tuple[str, int]] = []
    for item in value:
        if not isinstance(item, list | tuple) or len(item) != 2:
            raise _fail(kind, name, expected, value)
        chat_id = _text(kind, f"{name}[].chat_id", item[0])
        pairs.append((chat_id, _count(kind, f"{name}[].depth", item[1])))
    return pairs


_COUNTERS = ("queued", "in_flight", "processed", "failed", "rejected", "duplicates", "rate_limited")
_REPLY_COUNTERS = ("replies_sent", "replies_failed", "replies_retried", "replies_pending")
_INGEST_COUNTERS = ("ingest_refused", "ingest_timeouts")

_SCHEMAS: dict[str, tuple[type[Frame], dict[str, _Check]]] = {
    Ready.kind: (Ready, {"pid": _count}),
    Heartbeat.kind: (
        Heartbeat,
        {
            "seq": _count,
            "time": _number,
            **dict.fromkeys(_COUNTERS, _count),
            "busiest": _busiest,
            **dict.fromkeys(_REPLY_COUNTERS, _count),
            "paused": _optional_text,
            "paused_since": _optional_number,
            **dict.fromkeys(_INGEST_COUNTERS, _count),
            "store_unavailable": _optional_text,
            "store_bytes": _count,
            "oldest_at": _optional_number,
        },
    ),
    Beat.kind: (Beat, {"seq": _count}),
    BootFailed.kind: (BootFailed, {"reason": _text}),
    LogRecord.kind: (LogRecord, {"line": _text, "level": _name}),
    Stop.kind: (Stop, {"reason": _text}),
}


_KEYS = {kind: frozenset(checks) | {"kind"} for kind, (_, checks) in _SCHEMAS.items()}
# Fields a frame may lack (added later; the dataclass default stands in).
_OPTIONAL: dict[str, frozenset[str]] = {
    Heartbeat.kind: frozenset(
        {
            *_REPLY_COUNTERS,
            "paused",
            "paused_since",
            *_INGEST_COUNTERS,
            "store_unavailable",
            "store_bytes",
            "oldest_at",
        }
    ),
}


def _build(obj: dict[str, Any]) -> Frame:
    """Check a wire object field by field and build its frame."""
    kind = obj.get("kind")
    if not isinstance(kind, str) or kind not in _SCHEMAS:
        raise ProtocolError(f"unknown frame kind {kind!r:.80}")
    cls, checks = _SCHEMAS[kind]
    if obj.keys() != _KEYS[kind]:  # one set comparison on the hot path (heartbeats)
        unknown = sorted(obj.keys() - _KEYS[kind])
        if unknown:
            raise ProtocolError(f"{kind} frame: unknown field {unknown[0]!r:.80}")
        optional = _OPTIONAL.get(kind, frozenset())
        missing = [name for name in checks if name not in obj and name not in optional]
        if missing:
            raise ProtocolError(f"{kind} frame: missing field {missing[0]!r}")
    return cls(
        **{name: check(kind, name, obj[name]) for name, check in checks.items() if name in obj}
    )


def _refuse_constant(constant: str) -> None:
    # json.loads would otherwise accept NaN and Infinity, which are not JSON.
    raise ProtocolError(f"frame holds {constant}, which is not JSON")


_FIELDS = {cls: tuple(f.name for f in fields(cls)) for cls, _ in _SCHEMAS.values()}
# What a `Beat` repeats from the last full heartbeat: all but its seq and time.
_COUNTER_FIELDS = tuple(name for name in _FIELDS[Heartbeat] if name not in ("seq", "time"))


assert _FIELDS[Heartbeat][:2] == ("seq", "time")  # `heartbeat_of` relies on it


def same_counters(one: Heartbeat, other: Heartbeat) -> bool:
    """Whether two heartbeats differ only in seq and time (the second can go as a `Beat`)."""
    return all(getattr(one, name) == getattr(other, name) for name in _COUNTER_FIELDS)


def heartbeat_of(seq: int, time: float, counters: tuple[Any, ...]) -> Heartbeat:
    """A heartbeat from its counters: every field but seq and time, in declaration
    order (queued, in_flight, ..., oldest_at)."""
    if len(counters) != len(_COUNTER_FIELDS):
        raise ValueError(f"a heartbeat has {len(_COUNTER_FIELDS)} counters, got {len(counters)}")
    return Heartbeat(seq, time, *counters)


# One decoder for all frames: json.loads with options builds a new one per call.
_DECODER = json.JSONDecoder(parse_constant=_refuse_constant)


# A Beat on the wire, written and read without json: an idle worker sends one a second.
_BEAT_HEAD, _BEAT_TAIL = b'{"kind":"beat","seq":', b"}"


def encode_beat(seq: int) -> bytes:
    """``encode(Beat(seq=seq))`` without the frame object (an idle child's every second)."""
    if type(seq) is not int or seq < 0:
        return encode(Beat(seq=seq))  # raises, naming what is wrong
    return b"%s%d%s" % (_BEAT_HEAD, seq, _BEAT_TAIL)


def encode(frame: Frame) -> bytes:
    """The frame as UTF-8 JSON; ProtocolError if a field is bad or the result is too big."""
    if type(frame) is Beat and type(frame.seq) is int and frame.seq >= 0:
        return b"%s%d%s" % (_BEAT_HEAD, frame.seq, _BEAT_TAIL)
    if type(frame) not in _FIELDS:
        raise ProtocolError(f"not a frame: {type(frame).__name__}")
    obj: dict[str, Any] = {"kind": frame.kind}
    for name in _FIELDS[type(frame)]:  # not asdict: it deep-copies every value
        obj[name] = getattr(frame, name)
    _build(obj)  # the receiver's checks, run here so a bug fails in the sender
    data = json.dumps(obj, ensure_ascii=False, allow_nan=False, separators=(",", ":"))
    encoded = data.encode()
    if len(encoded) > MAX_FRAME_BYTES:
        raise ProtocolError(f"{frame.kind} frame is {len(encoded)} bytes, over {MAX_FRAME_BYTES}")
    return encoded


def decode(data: bytes) -> Frame:
    """The frame in `data`; ProtocolError naming what is wrong with it."""
    if len(data) > MAX_FRAME_BYTES:
        raise ProtocolError(f"frame is {len(data)} bytes, over {MAX_FRAME_BYTES}")
    if data.startswith(_BEAT_HEAD) and data.endswith(_BEAT_TAIL):
        digits = data[len(_BEAT_HEAD) : -len(_BEAT_TAIL)]
        if digits.isdigit() and len(digits) < 20 and (digits[0] != 0x30 or len(digits) == 1):
            return Beat(seq=int(digits))  # else json says what is wrong with it
    try:
        obj = _DECODER.decode(data.decode("utf-8"))
    except (ValueError, RecursionError) as exc:  # JSONDecodeError, UnicodeDecodeError
        raise ProtocolError(f"frame is not JSON: {exc}") from None
    if not isinstance(obj, dict):
        raise ProtocolError(f"frame must be a JSON object, got {type(obj).__name__}")
    return _build(obj)


def send(conn: Connection, frame: Frame) -> None:
    """Encode `frame` and send it as one message on `conn`."""
    conn.send_bytes(encode(frame))


def recv(conn: Connection) -> Frame:
    """Read and decode one frame from `conn` (blocks until one arrives).

    ProtocolError if it is malformed or over MAX_FRAME_BYTES (an oversized one
    is refused from its length header, and leaves `conn` unreadable).
    """
    try:
        data = conn.recv_bytes(MAX_FRAME_BYTES)
    except OSError as exc:
        # multiprocessing's own wording for a length over maxlength.
        if str(exc) == "bad message length":
            raise ProtocolError(f"frame is over {MAX_FRAME_BYTES} bytes") from None
        raise
    return decode(data)
