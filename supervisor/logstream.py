"""The one log stream: the supervisor's records and every worker's, as whole lines.

Workers format their own records (text or JSON, tagged with tenant_id and
pid; see shared/log.py) and send each line as a ``LogRecord`` frame over
their own pipe. The supervisor writes them here, between its own lines, from
its single loop thread, so lines never interleave.

Why not multiprocessing-logging's shared queue: a ``multiprocessing.Queue``
has one write lock shared by every writer process. A worker SIGKILLed while
holding it leaves it held, and every other worker then blocks on its next log
call. One pipe per worker has no shared lock: a dead worker's pipe just
reaches EOF. (The stdlib ``logging`` records of libraries are routed into
loguru in each process by shared/log.py, so nothing needs the queue.)

The last lines of each source (the supervisor, each tenant, the gateway) are
also kept in `book` (supervisor/logbook.py), for ``chatq logs``.

Writing never blocks the supervisor's loop: `write_line` only queues, and a
writer thread of its own writes to stderr and the file. A stderr nobody reads
(a stalled journald, ``| less``) would otherwise block the loop, and with it
every heartbeat, every worker's pipe and the control socket. Past
`MAX_QUEUED_LINES` waiting, lines are dropped and counted, and the count is
written as a line of its own once the writer catches up.
"""

from __future__ import annotations

import contextlib
import os
import sys
import threading
import time
from collections import deque
from pathlib import Path
from typing import TextIO

from chatq.supervisor.logbook import LogBook

ROTATE_BYTES = 10 * 1024 * 1024
ROTATE_KEEP = 5
MAX_QUEUED_LINES = 20_000  # a few seconds of a busy fleet; ~10 MB at most
CLOSE_FLUSH_S = 2.0  # on exit, what a stalled stderr may still hold us up
_STALLED = "stderr or the log file was not taking them"


class LogStream:
    """Writes lines to stderr and, if configured, to a size-rotated file."""

    def __init__(
        self,
        file: Path | None = None,
        *,
        stream: TextIO | None = None,
        rotate_bytes: int = ROTATE_BYTES,
        keep: int = ROTATE_KEEP,
        max_lines: int = MAX_QUEUED_LINES,
    ) -> None:
        self._stream = stream if stream is not None else sys.stderr
        self._path = file
        self._rotate_bytes = rotate_bytes
        self._keep = keep
        self._failing = False
        self._file: TextIO | None = None
        if file is not None:
            file.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            self._file = _open_log(file)
        self._max_lines = max_lines
        self._lines: deque[str] = deque()
        self._dropped = 0
        self._busy = False  # the writer holds lines it took
        self._wake = threading.Condition()
        self._writer: threading.Thread | None = None
        self._switch: tuple[Path | None] | None = None  # a new file, applied by the writer
        self.book = LogBook()

    def write_line(self, line: str, source: str = "supervisor") -> None:
        """Queue one whole line (a trailing newline is added); never blocks.

        `source` names who wrote it (a tenant id, "gateway"): `book` keeps it.
        """
        self.book.add(source, line)
        with self._wake:
            if len(self._lines) >= self._max_lines:
                self._dropped += 1
                return
            self._lines.append(line if line.endswith("\n") else line + "\n")
            if self._writer is None:
                self._writer = threading.Thread(target=self._run, name="log-writer", daemon=True)
                self._writer.start()
            self._wake.notify()

    def use_file(self, file: Path | None) -> None:
        """Write to `file` (or to no file) from the next line on (a reloaded log_file)."""
        if file is not None:
            file.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        with self._wake:
            self._switch = (file,)

    def flush(self, timeout: float) -> bool:
        """Wait up to `timeout` s for every queued line to be written; True if it was."""
        deadline = time.monotonic() + timeout
        with self._wake:
            while self._lines or self._dropped or self._busy:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._wake.wait(left)
        return True

    def close(self) -> None:
        """Write what is queued (within CLOSE_FLUSH_S), then close the file."""
        if not self.flush(CLOSE_FLUSH_S):
            return  # the writer is stuck on stderr; it owns the file until exit
        if self._file is not None:
            with contextlib.suppress(OSError, ValueError):
                self._file.close()
            self._file = None

    def _run(self) -> None:
        while True:
            with self._wake:
                while not (self._lines or self._dropped):
                    self._wake.wait()
                lines = list(self._lines)
                self._lines.clear()
                dropped, self._dropped = self._dropped, 0
                self._busy = True
            if dropped:
                lines.insert(0, f"chatq: {dropped} log lines dropped ({_STALLED})\n")
            self._write(lines)
            with self._wake:
                self._busy = False
                self._wake.notify_all()

    def _write(self, lines: list[str]) -> None:
        self._write_stream("".join(lines))
        with self._wake:
            switch, self._switch = self._switch, None
        if switch is not None:  # on this thread: it owns the file
            self._close_file()
            self._path, self._failing = switch[0], False
        if self._path is None:
            return
        try:
            for text in lines:  # line by line: rotation happens at a line's end
                self._write_file(text)
        except (OSError, ValueError) as exc:  # e.g. a full disk: log on, to stderr
            self._file_failed(exc)
        else:
            self._failing = False

    def _close_file(self) -> None:
        if self._file is not None:
            with contextlib.suppress(OSError, ValueError):
                self._file.close()
            self._file = None

    def _write_stream(self, text: str) -> None:
        try:
            self._stream.write(text)
            self._stream.flush()
        except (OSError, ValueError):
            pass  # a closed terminal must not take the supervisor down

    def _write_file(self, text: str) -> None:
        assert self._path is not None
        if self._file is None:  # after a failure: try again
            self._file = _open_log(self._path)
        self._file.write(text)
        self._file.flush()
        if self._file.tell() >= self._rotate_bytes:
            self._rotate()

    def _file_failed(self, exc: Exception) -> None:
        if not self._failing:  # once per episode, not once per line
            self._failing = True
            self._write_stream(
                f"chatq: cannot write the log file {self._path} ({exc}); lines go to"
                " stderr only until it works again\n"
            )
        self._close_file()  # what it buffered is lost; the next line reopens it

    def _rotate(self) -> None:
        assert self._path is not None and self._file is not None
        self._file.close()
        for n in range(self._keep - 1, 0, -1):
            older = self._path.with_name(f"{self._path.name}.{n}")
            if older.exists():
                older.replace(self._path.with_name(f"{self._path.name}.{n + 1}"))
        self._path.replace(self._path.with_name(f"{self._path.name}.1"))
        self._file = _open_log(self._path)


def _open_log(path: Path) -> TextIO:
    """Append to the log file: mode 0600 if new, never through a planted symlink."""
    return open(path, "a", encoding="utf-8", opener=_private_opener)


def _private_opener(path: str, flags: int) -> int:
    return os.open(path, flags | os.O_NOFOLLOW, 0o600)
