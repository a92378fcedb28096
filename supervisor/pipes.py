"""Reading worker pipes without ever blocking the supervisor.

``Connection.recv_bytes`` blocks until a whole frame is there: a worker
stopped (SIGSTOP, a debugger) or dying half-way through a frame would stall
the parent, and ``Connection.poll`` builds a new selector on every call. So
the supervisor puts the pipe in non-blocking mode, takes whatever bytes are
there in one read, and cuts complete frames out of a buffer itself.

The framing is multiprocessing's own (what ``send_bytes`` writes): a 4-byte
big-endian signed length, or -1 followed by an 8-byte length for huge frames.
"""

from __future__ import annotations

import os
import struct
import threading
from multiprocessing.connection import Connection

from chatq.shared import protocol

READ_CHUNK = 256 * 1024
_SHORT = 4
_LONG = 12
_HEADER = struct.Struct("!i")
# A beat on the wire: `_BEAT_HEAD`, the seq's digits, `_BEAT_TAIL` (one byte).
_BEAT_SAMPLE = protocol.encode_beat(0)
_BEAT_HEAD, _BEAT_TAIL = _BEAT_SAMPLE[:-2], _BEAT_SAMPLE[-1]
_BEAT_DIGITS = _SHORT + len(_BEAT_HEAD)  # where the digits start in a frame read whole
_BEAT_MIN = _BEAT_DIGITS + 1  # a frame that long holds no digit
# Reads land in one buffer per thread, kept: `os.read(fd, 256 KiB)` allocates
# (mmap, page faults, munmap) 256 KiB per call and shrinks it to the ~30 bytes
# of a beat: 27 us against 4 for the read itself, 500 times a second at idle.
_scratch = threading.local()


def _scratch_buffer() -> memoryview:
    view: memoryview | None = getattr(_scratch, "view", None)
    if view is None:
        view = _scratch.view = memoryview(bytearray(READ_CHUNK))
    return view


class FrameReader:
    """Complete frames from one worker's pipe, as they arrive."""

    def __init__(self, conn: Connection) -> None:
        self._fd = conn.fileno()
        os.set_blocking(self._fd, False)
        self._buffer = bytearray()
        self.eof = False

    def read(self) -> list[protocol.Frame]:
        """Frames complete so far; sets ``eof`` when the worker closed its end.

        Raises ``ProtocolError`` on a malformed or oversized frame: the pipe
        cannot be trusted after that.
        """
        seq = self.read_beat()
        if seq is not None:
            return [protocol.Beat(seq=seq)]
        return self.frames()

    def read_beat(self) -> int | None:
        """Read what the pipe holds: the seq of a lone beat if that was all, else None,
        and the frames read wait for `frames` (``eof`` set if the worker closed its end).

        An idle fleet's every read (500 a second at 500 tenants) is one beat, in
        the canonical form `protocol.encode_beat` writes: no frame object, no
        decoding, no copy into the reassembly buffer. Anything else takes the
        general way.
        """
        scratch = _scratch_buffer()
        try:
            size = os.readv(self._fd, [scratch])
        except BlockingIOError:
            return None
        except OSError:
            size = 0
        if not size:
            self.eof = True
            return None
        if (
            not self._buffer
            and size > _BEAT_MIN
            and scratch[size - 1] == _BEAT_TAIL
            and _HEADER.unpack_from(scratch)[0] == size - _SHORT
            and scratch[_SHORT:_BEAT_DIGITS] == _BEAT_HEAD
        ):
            digits = bytes(scratch[_BEAT_DIGITS : size - 1])
            # As `protocol.decode` takes them: ASCII digits, no leading zero.
            if digits.isdigit() and len(digits) < 20 and (digits[0] != 0x30 or len(digits) == 1):
                return int(digits)
        self._buffer += scratch[:size]
        return None

    def frames(self) -> list[protocol.Frame]:
        """The complete frames read so far (`read_beat`), taken out of the buffer."""
        return self._frames() if self._buffer else []

    def _frames(self) -> list[protocol.Frame]:
        frames = []
        buffer = self._buffer
        while len(buffer) >= _SHORT:
            size = int.from_bytes(buffer[:_SHORT], "big", signed=True)
            header = _SHORT
            if size == -1:
                if len(buffer) < _LONG:
                    break
                size, header = int.from_bytes(buffer[_SHORT:_LONG], "big"), _LONG
            if size < 0 or size > protocol.MAX_FRAME_BYTES:
                raise protocol.ProtocolError(
                    f"frame of {size} bytes (limit {protocol.MAX_FRAME_BYTES})"
                )
            if len(buffer) < header + size:
                break
            frames.append(protocol.decode(bytes(buffer[header : header + size])))
            del buffer[: header + size]
        return frames
