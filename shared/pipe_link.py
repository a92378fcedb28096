"""A child's end of the supervisor pipe: frames up, ``Stop`` down, heartbeats.

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
import sys
import threading
import time
from collections.abc import Callable
from multiprocessing.connection import Connection

from chatq.shared import protocol
from chatq.shared.text import storable_text

__all__ = ["MAX_LOG_LINE", "PipeLink", "beat"]

MAX_LOG_LINE = 64 * 1024  # a huge traceback is cut, not dropped with its frame


class PipeLink:
    """The child's end of the supervisor pipe; safe to write from any thread."""

    def __init__(self, conn: Connection) -> None:
        self.conn = conn
        self._lock = threading.Lock()
        self.broken = False

    def send(self, frame: protocol.WorkerFrame) -> None:
        if self.broken:
            return
        try:
            with self._lock:
                protocol.send(self.conn, frame)
        except (protocol.ProtocolError, UnicodeEncodeError) as exc:  # ours: keep the pipe
            print(f"chatq: unsendable frame: {exc}", file=sys.stderr)
        except (OSError, ValueError):
            self.broken = True  # the supervisor is gone; the reader will see EOF

    def log_sink(self, line: str) -> None:
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
