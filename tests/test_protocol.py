"""The worker <-> supervisor pipe protocol: JSON frames, checked, size-capped."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from multiprocessing import Pipe
from multiprocessing.connection import Connection

import pytest

from chatq.shared.errors import ChatqError
from chatq.shared.protocol import (
    MAX_FRAME_BYTES,
    Beat,
    BootFailed,
    Frame,
    Heartbeat,
    LogRecord,
    ProtocolError,
    Ready,
    Stop,
    decode,
    encode,
    encode_beat,
    heartbeat_of,
    recv,
    same_counters,
    send,
)

HEARTBEAT = Heartbeat(
    seq=7,
    time=1700000000.25,
    queued=3,
    in_flight=1,
    processed=120,
    failed=2,
    rejected=1,
    duplicates=4,
    rate_limited=5,
    busiest=[("chat-a", 2), ("chat-b", 1)],
)

FRAMES: list[Frame] = [
    Ready(pid=4242),
    HEARTBEAT,
    Heartbeat(0, 0.0, 0, 0, 0, 0, 0, 0, 0, []),
    Heartbeat(1, 1.0, 0, 0, 0, 0, 0, 0, 0, [], 5, 1, 2, "190: access token expired", 1.5),
    Heartbeat(2, 2.0, 0, 0, 0, 0, 0, 0, 0, [], ingest_refused=3, ingest_timeouts=1),
    Heartbeat(3, 3.0, 0, 0, 0, 0, 0, 0, 0, [], store_unavailable="database or disk is full"),
    BootFailed(reason="cannot import mybot.handlers:reply"),
    LogRecord(line="2026-01-01 00:00:00.000 INFO  [acme pid=1] hé {braces}", level="INFO"),
    Stop(reason="reload"),
    Beat(seq=0),
    Beat(seq=12345),
]


@pytest.fixture
def pipe() -> Iterator[tuple[Connection, Connection]]:
    a, b = Pipe(duplex=True)
    yield a, b
    a.close()
    b.close()


@pytest.mark.parametrize("frame", FRAMES, ids=lambda f: type(f).__name__)
def test_round_trip(frame: Frame) -> None:
    data = encode(frame)
    assert isinstance(data, bytes)
    assert decode(data) == frame


def test_wire_form_is_json_with_kind() -> None:
    assert json.loads(encode(Ready(pid=12))) == {"kind": "ready", "pid": 12}
    obj = json.loads(encode(HEARTBEAT))
    assert obj["kind"] == "heartbeat"
    assert obj["busiest"] == [["chat-a", 2], ["chat-b", 1]]


def test_busiest_comes_back_as_tuples() -> None:
    frame = decode(encode(HEARTBEAT))
    assert isinstance(frame, Heartbeat)
    assert frame.busiest == [("chat-a", 2), ("chat-b", 1)]
    assert all(isinstance(pair, tuple) for pair in frame.busiest)


def test_integer_time_is_read_as_float() -> None:
    raw = json.loads(encode(HEARTBEAT))
    raw["time"] = 5
    frame = decode(json.dumps(raw).encode())
    assert isinstance(frame, Heartbeat)
    assert frame.time == 5.0
    assert isinstance(frame.time, float)


def test_protocol_error_is_a_chatq_error() -> None:
    assert issubclass(ProtocolError, ChatqError)


@pytest.mark.parametrize(
    ("data", "needle"),
    [
        (b"not json", "not JSON"),
        (b"\xff\xfe\x00", "not JSON"),
        (b"[1, 2]", "JSON object"),
        (b'{"pid": 1}', "unknown frame kind None"),
        (b'{"kind": "explode"}', "unknown frame kind 'explode'"),
        (b'{"kind": 3}', "unknown frame kind 3"),
        (b'{"kind": "ready"}', "missing field 'pid'"),
        (b'{"kind": "ready", "pid": 1, "extra": 2}', "unknown field 'extra'"),
        (b'{"kind": "ready", "pid": "1"}', "'pid' must be a non-negative integer"),
        (b'{"kind": "ready", "pid": true}', "'pid' must be a non-negative integer"),
        (b'{"kind": "ready", "pid": -1}', "'pid' must be a non-negative integer"),
        (b'{"kind": "ready", "pid": 1.5}', "'pid' must be a non-negative integer"),
        (b'{"kind": "stop", "reason": null}', "'reason' must be a string"),
        (b'{"kind": "log", "line": "x", "level": ""}', "'level' must be a non-empty string"),
        (b'{"kind": "boot_failed", "reason": ["a"]}', "'reason' must be a string"),
        (b"[" * 100_000, "not JSON"),
    ],
)
def test_bad_frames_are_refused_with_a_reason(data: bytes, needle: str) -> None:
    with pytest.raises(ProtocolError) as info:
        decode(data)
    assert needle in str(info.value)


def _heartbeat_with(**changes: object) -> bytes:
    raw = json.loads(encode(HEARTBEAT))
    raw.update(changes)
    return json.dumps(raw).encode()


@pytest.mark.parametrize(
    ("changes", "needle"),
    [
        ({"time": "now"}, "'time' must be a finite number"),
        ({"time": True}, "'time' must be a finite number"),
        ({"queued": -1}, "'queued' must be a non-negative integer"),
        ({"rate_limited": None}, "'rate_limited'"),
        ({"busiest": {"a": 1}}, "'busiest' must be a list"),
        ({"busiest": [["c", 1]] * 6}, "at most 5"),
        ({"busiest": [["c", 1, 2]]}, "'busiest' must be a list"),
        ({"busiest": [[1, 1]]}, "'busiest[].chat_id' must be a string"),
        ({"busiest": [["c", -1]]}, "'busiest[].depth' must be a non-negative integer"),
        ({"replies_sent": -1}, "'replies_sent' must be a non-negative integer"),
        ({"paused": 190}, "'paused' must be a string"),
        ({"paused_since": "now"}, "'paused_since' must be a finite number"),
    ],
)
def test_bad_heartbeat_fields_are_named(changes: dict[str, object], needle: str) -> None:
    with pytest.raises(ProtocolError) as info:
        decode(_heartbeat_with(**changes))
    assert needle in str(info.value)
    assert str(info.value).startswith("heartbeat frame:")


@pytest.mark.parametrize("constant", [b"NaN", b"Infinity", b"-Infinity"])
def test_non_json_numbers_are_refused(constant: bytes) -> None:
    data = encode(HEARTBEAT).replace(b'"time":1700000000.25', b'"time":' + constant)
    assert constant in data
    with pytest.raises(ProtocolError, match="not JSON"):
        decode(data)


def test_encode_checks_fields_too() -> None:
    with pytest.raises(ProtocolError, match="at most 5"):
        encode(Heartbeat(1, 1.0, 0, 0, 0, 0, 0, 0, 0, [("c", 1)] * 6))
    with pytest.raises(ProtocolError, match="finite number"):
        encode(Heartbeat(1, float("nan"), 0, 0, 0, 0, 0, 0, 0, []))
    with pytest.raises(ProtocolError, match="not a frame: dict"):
        encode({"kind": "ready", "pid": 1})  # type: ignore[arg-type]


def test_size_cap_on_encode_and_decode() -> None:
    overhead = len(encode(LogRecord(line="", level="INFO")))
    fits = LogRecord(line="x" * (MAX_FRAME_BYTES - overhead), level="INFO")
    assert len(encode(fits)) == MAX_FRAME_BYTES
    with pytest.raises(ProtocolError, match="over 1048576"):
        encode(LogRecord(line="x" * (MAX_FRAME_BYTES - overhead + 1), level="INFO"))
    with pytest.raises(ProtocolError, match="over 1048576"):
        decode(b" " * (MAX_FRAME_BYTES + 1))


def test_send_and_recv_over_a_pipe(pipe: tuple[Connection, Connection]) -> None:
    worker_end, supervisor_end = pipe
    for frame in FRAMES:
        send(worker_end, frame)
        assert recv(supervisor_end) == frame
    send(supervisor_end, Stop(reason="shutdown"))
    assert recv(worker_end) == Stop(reason="shutdown")


def test_recv_refuses_bad_bytes(pipe: tuple[Connection, Connection]) -> None:
    worker_end, supervisor_end = pipe
    worker_end.send_bytes(b'{"kind": "ready", "pid": "nope"}')
    with pytest.raises(ProtocolError, match="'pid'"):
        recv(supervisor_end)


def test_recv_refuses_an_oversized_frame_from_its_header(
    pipe: tuple[Connection, Connection],
) -> None:
    worker_end, supervisor_end = pipe
    errors: list[BaseException] = []

    def flood() -> None:
        try:
            worker_end.send_bytes(b"x" * (MAX_FRAME_BYTES + 1))
        except OSError as exc:  # the reader gives up and closes its end
            errors.append(exc)

    sender = threading.Thread(target=flood)
    sender.start()
    with pytest.raises(ProtocolError, match="over 1048576"):
        recv(supervisor_end)
    supervisor_end.close()
    sender.join(timeout=10)
    assert not sender.is_alive()


def test_recv_lets_eof_through(pipe: tuple[Connection, Connection]) -> None:
    worker_end, supervisor_end = pipe
    worker_end.close()
    with pytest.raises(EOFError):
        recv(supervisor_end)


def test_a_heartbeat_from_an_older_worker_decodes_with_defaults() -> None:
    raw = json.loads(encode(HEARTBEAT))
    for name in ("replies_sent", "replies_failed", "replies_retried", "paused", "paused_since"):
        del raw[name]
    frame = decode(json.dumps(raw).encode())
    assert frame == HEARTBEAT
    assert isinstance(frame, Heartbeat) and frame.paused is None and frame.replies_sent == 0
    del raw["queued"]  # the original fields stay required
    with pytest.raises(ProtocolError, match="missing field 'queued'"):
        decode(json.dumps(raw).encode())


def test_a_beat_is_a_few_bytes_of_json() -> None:
    data = encode(Beat(seq=42))
    assert json.loads(data) == {"kind": "beat", "seq": 42}
    assert len(data) < 32  # a full heartbeat is ~400


@pytest.mark.parametrize(
    ("data", "needle"),
    [
        (b'{"kind":"beat","seq":-1}', "non-negative integer"),
        (b'{"kind":"beat","seq":1.5}', "non-negative integer"),
        (b'{"kind":"beat","seq":01}', "not JSON"),
        (b'{"kind":"beat","seq":1,"x":2}', "unknown field"),
    ],
)
def test_bad_beats_are_refused_like_any_frame(data: bytes, needle: str) -> None:
    with pytest.raises(ProtocolError, match=needle):
        decode(data)


def test_same_counters_ignores_only_seq_and_time() -> None:
    base = Heartbeat(1, 1.0, 3, 1, 0, 0, 0, 0, 0)
    assert same_counters(Heartbeat(9, 9.0, 3, 1, 0, 0, 0, 0, 0), base)
    assert not same_counters(Heartbeat(9, 9.0, 3, 1, 1, 0, 0, 0, 0), base)
    assert not same_counters(Heartbeat(1, 1.0, 3, 1, 0, 0, 0, 0, 0, paused="190"), base)


def test_encode_beat_is_encode_of_a_beat() -> None:
    assert encode_beat(42) == encode(Beat(seq=42))
    with pytest.raises(ProtocolError, match="non-negative"):
        encode_beat(-1)


def test_heartbeat_of_takes_every_counter_in_declaration_order() -> None:
    counters = (3, 1, 10, 2, 1, 4, 5, [("c1", 3)], 7, 1, 2, "190", 5.0, 6, 8, "disk full", 9)
    beat = heartbeat_of(4, 2.0, (*counters, 4096, 1.5))
    assert beat == Heartbeat(
        seq=4,
        time=2.0,
        queued=3,
        in_flight=1,
        processed=10,
        failed=2,
        rejected=1,
        duplicates=4,
        rate_limited=5,
        busiest=[("c1", 3)],
        replies_sent=7,
        replies_failed=1,
        replies_retried=2,
        paused="190",
        paused_since=5.0,
        ingest_refused=6,
        ingest_timeouts=8,
        store_unavailable="disk full",
        replies_pending=9,
        store_bytes=4096,
        oldest_at=1.5,
    )
    with pytest.raises(ValueError, match="19 counters, got 17"):
        heartbeat_of(4, 2.0, counters)
