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
"""

from __future__ import annotations

import contextlib
import sys
from pathlib import Path
from typing import TextIO

ROTATE_BYTES = 10 * 1024 * 1024
ROTATE_KEEP = 5


class LogStream:
    """Writes lines to stderr and, if configured, to a size-rotated file."""

    def __init__(
        self,
        file: Path | None = None,
        *,
        stream: TextIO | None = None,
        rotate_bytes: int = ROTATE_BYTES,
        keep: int = ROTATE_KEEP,
    ) -> None:
        self._stream = stream if stream is not None else sys.stderr
        self._path = file
        self._rotate_bytes = rotate_bytes
        self._keep = keep
        self._failing = False
        self._file: TextIO | None = None
        if file is not None:
            file.parent.mkdir(parents=True, exist_ok=True)
            self._file = file.open("a", encoding="utf-8")

    def write_line(self, line: str) -> None:
        """Write one whole line (a trailing newline is added)."""
        text = line if line.endswith("\n") else line + "\n"
        self._write_stream(text)
        if self._path is None:
            return
        try:
            self._write_file(text)
        except (OSError, ValueError) as exc:  # e.g. a full disk: log on, to stderr
            self._file_failed(exc)
        else:
            self._failing = False

    def close(self) -> None:
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
            self._file = self._path.open("a", encoding="utf-8")
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
        self.close()  # what it buffered is lost; the next line reopens it

    def _rotate(self) -> None:
        assert self._path is not None and self._file is not None
        self._file.close()
        for n in range(self._keep - 1, 0, -1):
            older = self._path.with_name(f"{self._path.name}.{n}")
            if older.exists():
                older.replace(self._path.with_name(f"{self._path.name}.{n + 1}"))
        self._path.replace(self._path.with_name(f"{self._path.name}.1"))
        self._file = self._path.open("a", encoding="utf-8")
