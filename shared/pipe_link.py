"""A child's end of its supervisor pipe: frames go up without ever blocking the caller.

The pipe is a blocking one with a 64 KiB kernel buffer. When the supervisor
stops reading (SIGSTOPped, or itself blocked on a stderr nobody reads), a
plain ``send_bytes`` from the event loop blocks that loop: the worker stops
answering ingest and stops beating. So `send` only queues, and a sender
thread of its own writes:

- control frames (Ready, BootFailed, ...) first, in order, never dropped;
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

Heartbeats come from the child's event loop, so a blocked loop goes silent
and the supervisor calls the child hung.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import threading
import time
from collections import deque
from collections.abc import Callable
from multiprocessing.connection import Connection

from chatq.shared import protocol
from chatq.shared.text import storable_text

__all__ = ["EXIT_FLUSH_S", "MAX_LOG_LINE", "MAX_QUEUED_LINES", "PipeLink", "beat"]

MAX_LOG_LINE = 64 * 1024  # a huge traceback is cut, not dropped with its frame
MAX_QUEUED_LINES = 1_000  # a busy second of INFO lines; well under 1 MB
# How long an exiting child waits for its last frames to reach the supervisor
# (a supervisor that is not reading must not hold the exit up).
EXIT_FLUSH_S = 1.0


class PipeLink:
    """The child's end of the supervisor pipe; `send` is safe from any thread."""

    def __init__(self, conn: Connection, *, max_lines: int = MAX_QUEUED_LINES) -> None:
        self.conn = conn
        self.broken = False  # the supervisor is gone (a write failed, or the reader saw EOF)
        self.dropped = 0  # log lines dropped since the count last went up
        self._max_lines = max_lines
        self._wake = threading.Condition()
        self._control: deque[protocol.WorkerFrame] = deque()
        self._beat: protocol.Heartbeat | None = None
        self._lines: deque[protocol.LogRecord] = deque()
        self._busy = False  # the sender thread holds a frame it took
        self._thread: threading.Thread | None = None  # started on first use (after fork)

    def send(self, frame: protocol.WorkerFrame) -> None:
        """Queue `frame` for the sender thread; never blocks on the pipe."""
        if self.broken:
            return
        with self._wake:
            if isinstance(frame, protocol.Heartbeat):
                self._beat = frame
            elif isinstance(frame, protocol.LogRecord):
                if len(self._lines) >= self._max_lines:
                    self.dropped += 1
                    return
                self._lines.append(frame)
            else:
                self._control.append(frame)
            self._start()
            self._wake.notify()

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
        return bool(self._busy or self._control or self._beat or self._lines or self.dropped)

    def _start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="pipe-link", daemon=True)
            self._thread.start()

    def _run(self) -> None:
        while True:
            frame = self._take()
            try:
                protocol.send(self.conn, frame)
            except (protocol.ProtocolError, UnicodeEncodeError) as exc:  # ours: keep the pipe
                print(f"chatq: unsendable frame: {exc}", file=sys.stderr)
            except (OSError, ValueError):
                self.broken = True  # the supervisor is gone; the reader will see EOF
            with self._wake:
                self._busy = False
                self._wake.notify_all()
                if self.broken:
                    return

    def _take(self) -> protocol.WorkerFrame:
        """The next frame to write, by priority; waits for one."""
        with self._wake:
            while not self._pending() or self._busy:
                self._wake.wait()
            self._busy = True
            if self._control:
                return self._control.popleft()
            if self._beat is not None:
                beat, self._beat = self._beat, None
                return beat
            if self.dropped:
                count, self.dropped = self.dropped, 0
                return _dropped_line(count)
            return self._lines.popleft()


def _dropped_line(count: int) -> protocol.LogRecord:
    line = f"chatq: {count} log lines dropped (the supervisor was not reading its pipe)"
    return protocol.LogRecord(line=line, level="WARNING")


async def beat(
    link: PipeLink, interval: float, heartbeat: Callable[[int], protocol.Heartbeat]
) -> None:
    """Send ``heartbeat(seq)`` forever, from the event loop.

    After the first beat, beats fall on multiples of the interval in wall
    time: every child beats at the same instants, and the supervisor wakes
    once per interval for all of them instead of once per child.
    """
    seq = 0
    while True:
        seq += 1
        link.send(heartbeat(seq))
        await asyncio.sleep(interval - time.time() % interval)


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
