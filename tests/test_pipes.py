"""FrameReader: frames cut from a non-blocking pipe, never blocking the parent."""

from __future__ import annotations

import multiprocessing
import struct
import threading

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
