"""FrameReader: frames cut from a non-blocking pipe, never blocking the parent."""

from __future__ import annotations

import multiprocessing
import struct
import threading
import tracemalloc

import pytest

from chatq.shared import protocol
from chatq.supervisor.pipes import FrameReader


def test_reads_every_complete_frame_and_keeps_a_partial_one() -> None:
    ours, theirs = multiprocessing.Pipe()
    reader = FrameReader(ours)
    assert reader.read() == []  # nothing there: returns at once
    protocol.send(theirs, protocol.Ready(pid=1))
    protocol.send(theirs, protocol.BootFailed(reason="x"))
    payload = protocol.encode(protocol.Ready(pid=2))
    raw = struct.pack("!i", len(payload)) + payload
    theirs._send(raw[:5])  # type: ignore[attr-defined]  # half a frame, as from a dying worker
    assert reader.read() == [protocol.Ready(pid=1), protocol.BootFailed(reason="x")]
    theirs._send(raw[5:])  # type: ignore[attr-defined]
    assert reader.read() == [protocol.Ready(pid=2)]
    theirs.close()
    assert reader.read() == [] and reader.eof


def test_large_frames_arrive_whole() -> None:
    ours, theirs = multiprocessing.Pipe()
    reader = FrameReader(ours)
    line = "x" * 200_000
    frames: list[protocol.Frame] = []

    writer = threading.Thread(target=protocol.send, args=(theirs, protocol.LogRecord(line, "INFO")))
    writer.start()
    while not frames:
        frames += reader.read()
    writer.join()
    assert frames == [protocol.LogRecord(line, "INFO")]


def test_an_oversized_length_is_refused() -> None:
    ours, theirs = multiprocessing.Pipe()
    reader = FrameReader(ours)
    theirs._send(struct.pack("!i", protocol.MAX_FRAME_BYTES + 1))  # type: ignore[attr-defined]
    with pytest.raises(protocol.ProtocolError):
        reader.read()


def test_a_beat_is_read_without_a_chunk_sized_allocation() -> None:
    """Regression (issue 15): each read allocated its 256 KiB chunk and shrank it to the
    ~30 bytes of a beat (27 us a read, 500 reads a second with 500 idle tenants)."""
    ours, theirs = multiprocessing.Pipe()
    reader = FrameReader(ours)
    protocol.send(theirs, protocol.Beat(seq=1))
    assert reader.read() == [protocol.Beat(seq=1)]  # the thread's buffer exists from here on
    protocol.send(theirs, protocol.Beat(seq=2))
    tracemalloc.start()
    try:
        frames = reader.read()
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert frames == [protocol.Beat(seq=2)]
    assert peak < 16 * 1024


def test_readers_sharing_the_read_buffer_keep_their_own_partial_frames() -> None:
    pipes = [multiprocessing.Pipe() for _ in range(2)]
    readers = [FrameReader(ours) for ours, _ in pipes]
    raws = []
    for pid, (_, theirs) in enumerate(pipes):
        payload = protocol.encode(protocol.Ready(pid=pid))
        raws.append(struct.pack("!i", len(payload)) + payload)
        theirs._send(raws[-1][:7])  # type: ignore[attr-defined]
    assert [reader.read() for reader in readers] == [[], []]
    for raw, (_, theirs) in zip(raws, pipes, strict=True):
        theirs._send(raw[7:])  # type: ignore[attr-defined]
    assert [reader.read() for reader in readers] == [
        [protocol.Ready(pid=0)],
        [protocol.Ready(pid=1)],
    ]


def test_a_lone_beat_is_read_without_decoding_a_frame(monkeypatch: pytest.MonkeyPatch) -> None:
    """An idle fleet's every read is one beat (500 a second at 500 tenants): its seq
    comes straight from the bytes, no frame built, no json, no reassembly buffer."""
    ours, theirs = multiprocessing.Pipe()
    reader = FrameReader(ours)
    monkeypatch.setattr(protocol, "decode", lambda _data: pytest.fail("decoded a lone beat"))
    for seq in (0, 7, 10**18):
        theirs.send_bytes(protocol.encode_beat(seq))
        assert reader.read_beat() == seq
        assert reader.frames() == []


def test_anything_but_a_lone_canonical_beat_takes_the_general_way() -> None:
    ours, theirs = multiprocessing.Pipe()
    reader = FrameReader(ours)
    theirs.send_bytes(protocol.encode_beat(1))
    theirs.send_bytes(protocol.encode_beat(2))  # two in one read
    assert reader.read_beat() is None
    assert reader.frames() == [protocol.Beat(seq=1), protocol.Beat(seq=2)]
    theirs.send_bytes(b'{"kind": "beat", "seq": 3}')  # not as encode_beat writes it
    assert reader.read_beat() is None
    assert reader.frames() == [protocol.Beat(seq=3)]
    theirs.send_bytes(b'{"kind":"beat","seq":04}')  # a leading zero: not JSON
    assert reader.read_beat() is None
    with pytest.raises(protocol.ProtocolError):
        reader.frames()
