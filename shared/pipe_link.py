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
"""

from __future__ import annotations

import json
import sys
import threading
import time
from collections import deque
from multiprocessing.connection import Connection

from chatq.shared import protocol

__all__ = ["MAX_LOG_LINE", "MAX_QUEUED_LINES", "PipeLink"]

MAX_LOG_LINE = 64 * 1024  # a huge traceback is cut, not dropped with its frame
MAX_QUEUED_LINES = 1_000  # a busy second of INFO lines; well under 1 MB


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
        line = _encodable(line)  # a lone surrogate cannot be encoded for the pipe
        self.send(protocol.LogRecord(line=line, level=_level_of(line)))

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


def _encodable(text: str) -> str:
    """`text` with lone surrogates escaped (they cannot be encoded as UTF-8)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return text.encode("utf-8", "backslashreplace").decode("utf-8")
    return text


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
