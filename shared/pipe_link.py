"""A child's end of its supervisor pipe: frames go up without ever blocking the caller.

The pipe is a socket pair with a small kernel buffer. When the supervisor
stops reading (SIGSTOPped, or itself blocked on a stderr nobody reads), a
plain ``send_bytes`` from the event loop blocks that loop: the worker stops
answering ingest and stops beating. So `send` writes a frame at once only
if nothing waits before it and the socket takes it without blocking (the
usual case: an idle worker's beat costs one ``send``, no thread wakes).
Otherwise it queues, and a sender thread of its own (started on first need)
writes, blocking:

- the rest of a frame a non-blocking write cut short, first;
- control frames (Ready, BootFailed, ...), in order, never dropped;
- then the latest heartbeat only (an older one says nothing a newer one
  doesn't);
- then log lines, from a bounded queue: past `max_lines` waiting, new lines
  are dropped and counted, and the count goes up as one line of its own
  once the pipe drains ("N log lines dropped ...").

`flush` waits (bounded) for what is queued, so a process's last words (its
BootFailed, its "stopped" line) reach the supervisor before it exits.

Both supervised programs (a tenant's worker and the gateway) use it:

    link = PipeLink(conn)
    link.watch(request_stop)                      # Stop frame or EOF -> request_stop(reason)
    task = asyncio.create_task(beat(link, interval, make_heartbeat))

Heartbeats come from a timer on the child's event loop, so a blocked loop
goes silent and the supervisor calls the child hung. A beat whose counters
are those of the last heartbeat sent goes up as a short `Beat` frame.
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import struct
import sys
import threading
import time
import weakref
from collections import deque
from collections.abc import Callable
from dataclasses import replace
from multiprocessing.connection import Connection

from chatq.shared import protocol
from chatq.shared.text import storable_text

__all__ = ["EXIT_FLUSH_S", "MAX_LOG_LINE", "MAX_QUEUED_LINES", "PipeLink", "beat"]

MAX_LOG_LINE = 64 * 1024  # a huge traceback is cut, not dropped with its frame
MAX_QUEUED_LINES = 1_000  # a busy second of INFO lines; well under 1 MB
# How long an exiting child waits for its last frames to reach the supervisor
# (a supervisor that is not reading must not hold the exit up).
EXIT_FLUSH_S = 1.0
# The sender thread only ever runs a small loop: a small stack is plenty.
SENDER_STACK = 256 * 1024

BeatFrame = protocol.Heartbeat | protocol.Beat


class PipeLink:
    """The child's end of the supervisor pipe; `send` is safe from any thread."""

    def __init__(self, conn: Connection, *, max_lines: int = MAX_QUEUED_LINES) -> None:
        self.conn = conn
        self.broken = False  # the supervisor is gone (a write failed, or the reader saw EOF)
        self.dropped = 0  # log lines dropped since the count last went up
        self._max_lines = max_lines
        self._sock = _socket_of(conn)  # for writes that must not block; None: a plain pipe
        if self._sock is not None:
            weakref.finalize(self, self._sock.close)  # the copy goes with the link
        self._lock = threading.RLock()  # entered as is on the beat's path (no Python frame)
        self._wake = threading.Condition(self._lock)
        self._rest = b""  # what a non-blocking write left of its frame: it goes first
        self._control: deque[protocol.WorkerFrame] = deque()
        self._beat: BeatFrame | None = None
        self._lines: deque[protocol.LogRecord] = deque()
        self._busy = False  # the sender thread holds a frame it took
        self._thread: threading.Thread | None = None  # started on first need (after fork)

    def send(self, frame: protocol.WorkerFrame) -> None:
        """Write `frame` now if that cannot block, else queue it; never blocks on the pipe."""
        if self.broken:
            return
        with self._lock:
            if self._sock is not None and not self._pending():
                data = _framed(frame)
                if data is not None:
                    self._write_now(data)
                return
            if isinstance(frame, protocol.Heartbeat | protocol.Beat):
                self._beat = _latest(self._beat, frame)
            elif isinstance(frame, protocol.LogRecord):
                if len(self._lines) >= self._max_lines:
                    self.dropped += 1
                    return
                self._lines.append(frame)
            else:
                self._control.append(frame)
            self._start()
            self._wake.notify()

    def send_beat(self, seq: int) -> None:
        """``send(Beat(seq=seq))``; when it can be written at once, without the frame object."""
        if self._sock is not None and not self.broken:
            with self._lock:
                if not self._pending():
                    data = protocol.encode_beat(seq)
                    self._write_now(_HEADER.pack(len(data)) + data)
                    return
        self.send(protocol.Beat(seq=seq))

    def log_sink(self, line: str) -> None:
        """A log sink (shared/log.py): one formatted line as a LogRecord frame."""
        if len(line) > MAX_LOG_LINE:
            line = line[:MAX_LOG_LINE] + " …[truncated]"
        line = storable_text(line)  # a lone surrogate cannot be encoded for the pipe
        self.send(protocol.LogRecord(line=line, level=_level_of(line)))

    def watch(self, request_stop: Callable[[str], None]) -> None:
        """On the running loop: call `request_stop` on a Stop frame or when the pipe ends."""
        loop = asyncio.get_running_loop()

        def on_readable() -> None:
            try:
                frame = protocol.recv(self.conn)
            except (EOFError, OSError, protocol.ProtocolError):
                loop.remove_reader(self.conn.fileno())
                self.broken = True
                request_stop("supervisor went away")
                return
            if isinstance(frame, protocol.Stop):
                request_stop(frame.reason)

        loop.add_reader(self.conn.fileno(), on_readable)
        # uvloop's add_reader makes the fd non-blocking (libuv's poll handle);
        # the sender thread's writes must block on a full pipe, not fail with
        # EAGAIN and mark the link broken (no heartbeats: the child is "hung").
        os.set_blocking(self.conn.fileno(), True)

    def flush(self, timeout: float) -> bool:
        """Wait up to `timeout` s until everything queued is written; True if it was."""
        deadline = time.monotonic() + timeout
        with self._wake:
            while self._pending() and not self.broken:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._wake.wait(left)
        return True

    def _pending(self) -> bool:
        return bool(
            self._busy or self._rest or self._control or self._beat or self._lines or self.dropped
        )

    def _write_now(self, data: bytes) -> None:
        """Under the lock, nothing queued: send what the socket takes without
        blocking; the sender thread writes the rest."""
        assert self._sock is not None
        try:
            sent = self._sock.send(data, socket.MSG_DONTWAIT)
        except BlockingIOError:
            sent = 0
        except OSError:
            self.broken = True  # the supervisor is gone; the reader will see EOF
            return
        if sent < len(data):
            self._rest = data[sent:]
            self._start()
            self._wake.notify()

    def _start(self) -> None:
        if self._thread is None:
            self._thread = _small_stack_thread(self._run)

    def _run(self) -> None:
        while True:
            data = self._take()
            if isinstance(data, bytes):
                try:
                    self._write_all(data)
                except (OSError, ValueError):
                    self.broken = True  # the supervisor is gone; the reader will see EOF
            with self._wake:
                self._busy = False
                self._wake.notify_all()
                if self.broken:
                    return

    def _write_all(self, data: bytes) -> None:
        """Blocking, from the sender thread."""
        if self._sock is not None:
            self._sock.sendall(data)
            return
        view, fd = memoryview(data), self.conn.fileno()
        while view:
            view = view[os.write(fd, view) :]

    def _take(self) -> bytes | None:
        """The next frame's bytes, by priority (None: it could not be encoded); waits for one."""
        with self._wake:
            while not self._pending() or self._busy:
                self._wake.wait()
            self._busy = True
            frame: protocol.WorkerFrame
            if self._rest:
                rest, self._rest = self._rest, b""
                return rest
            if self._control:
                frame = self._control.popleft()
            elif self._beat is not None:
                frame, self._beat = self._beat, None
            elif self.dropped:
                frame = _dropped_line(self.dropped)
                self.dropped = 0
            else:
                frame = self._lines.popleft()
        return _framed(frame)  # outside the lock: callers of `send` need not wait for it


def _socket_of(conn: Connection) -> socket.socket | None:
    """A socket on a copy of `conn`'s descriptor (its own object: closing one
    leaves the other open), or None if `conn` is a plain pipe."""
    fd = os.dup(conn.fileno())
    try:
        return socket.socket(fileno=fd)
    except OSError:  # not a socket
        os.close(fd)
        return None


def _small_stack_thread(target: Callable[[], None]) -> threading.Thread:
    """A daemon thread with a small stack: fewer pages of its own in each child."""
    previous = threading.stack_size(SENDER_STACK)
    try:
        thread = threading.Thread(target=target, name="pipe-link", daemon=True)
        thread.start()
    finally:
        threading.stack_size(previous)
    return thread


_HEADER = struct.Struct("!i")  # multiprocessing's framing: what `recv_bytes` reads


def _framed(frame: protocol.WorkerFrame) -> bytes | None:
    """The frame as written on the pipe; None (and a word on stderr) if it cannot be encoded."""
    try:
        payload = protocol.encode(frame)
    except (protocol.ProtocolError, UnicodeEncodeError) as exc:  # ours: keep the pipe
        print(f"chatq: unsendable frame: {exc}", file=sys.stderr)
        return None
    return _HEADER.pack(len(payload)) + payload


def _latest(queued: BeatFrame | None, new: BeatFrame) -> BeatFrame:
    """The beat to keep queued: a short `Beat` after an unsent full one carries its counters."""
    if isinstance(new, protocol.Beat) and isinstance(queued, protocol.Heartbeat):
        return replace(queued, seq=new.seq)
    return new


def _dropped_line(count: int) -> protocol.LogRecord:
    line = f"chatq: {count} log lines dropped (the supervisor was not reading its pipe)"
    return protocol.LogRecord(line=line, level="WARNING")


async def beat(
    link: PipeLink,
    interval: float,
    heartbeat: Callable[[int], protocol.Heartbeat],
    also: Callable[[], None] | None = None,
    counters: Callable[[], object] | None = None,
) -> None:
    """Send ``heartbeat(seq)`` every `interval` s until cancelled; run `also` on the same timer.

    The beats are timer callbacks on the running loop (no task wakes for
    them): one wake-up per interval does all of a child's periodic work.
    After the first beat, beats fall on multiples of the interval in wall
    time: every child beats at the same instants, and the supervisor wakes
    once per interval for all of them instead of once per child.

    `counters`, if given, returns the heartbeat's counters in some cheap
    form (e.g. a tuple) that compares equal exactly when they are the same:
    while it equals its value at the last full heartbeat, a tick sends a
    short `Beat` without building a heartbeat (an idle child's whole second).
    """
    ticker = _Ticker(
        asyncio.get_running_loop(), link, interval, heartbeat, also=also, counters=counters
    )
    ticker.tick()
    try:
        await asyncio.get_running_loop().create_future()  # only ever cancelled
    finally:
        ticker.stop()


_UNSET = object()


class _Ticker:
    """The beat's timer: sends a beat, runs `also`, sets itself again."""

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        link: PipeLink,
        interval: float,
        heartbeat: Callable[[int], protocol.Heartbeat],
        *,
        also: Callable[[], None] | None,
        counters: Callable[[], object] | None,
    ) -> None:
        self._loop, self._link, self._interval = loop, link, interval
        self._heartbeat, self._also, self._counters = heartbeat, also, counters
        self._seq = 0
        self._last: protocol.Heartbeat | None = None  # the last full heartbeat sent
        self._key: object = _UNSET  # `counters()` when it was built
        self._timer: asyncio.TimerHandle | None = None

    def tick(self) -> None:
        # An exception here ends the beats, as it ended the task that sent them:
        # the supervisor then sees a silent child and restarts it.
        self._seq += 1
        counters = self._counters
        if counters is None:
            self._tick_by_heartbeat()
        elif (key := counters()) == self._key:
            self._link.send_beat(self._seq)
        else:
            self._key = key
            self._link.send(self._heartbeat(self._seq))
        if self._also is not None:
            self._also()
        interval = self._interval
        self._timer = self._loop.call_later(interval - time.time() % interval, self.tick)

    def _tick_by_heartbeat(self) -> None:
        full = self._heartbeat(self._seq)
        last = self._last
        if last is not None and protocol.same_counters(full, last):
            self._link.send_beat(self._seq)
        else:
            self._last = full
            self._link.send(full)

    def stop(self) -> None:
        if self._timer is not None:
            self._timer.cancel()


def _level_of(line: str) -> str:
    """The level name in a formatted line (text: third word; json: its field)."""
    if line.startswith("{"):
        try:
            level = json.loads(line).get("level")
        except ValueError:
            return "INFO"
        return level if isinstance(level, str) and level else "INFO"
    words = line.split(" ", 3)
    return words[2] if len(words) > 3 else "INFO"
