"""The supervisor's one log stream: stderr plus an optional size-rotated file."""

from __future__ import annotations

import io
import os
import signal
from pathlib import Path

from chatq.supervisor.logstream import LogStream
from chatq.supervisor.tenant import describe_exit


def test_the_file_rotates_keeping_the_newest_files(tmp_path: Path) -> None:
    path = tmp_path / "logs" / "chatq.log"
    stream = io.StringIO()
    log = LogStream(path, stream=stream, rotate_bytes=100, keep=3)
    for n in range(12):
        log.write_line(f"line {n:02d} " + "x" * 40)  # 49 bytes: a rotation every 3 lines
    log.close()

    assert stream.getvalue().count("\n") == 12  # stderr gets every line
    names = sorted(p.name for p in path.parent.iterdir())
    assert names == ["chatq.log", "chatq.log.1", "chatq.log.2", "chatq.log.3"]
    assert path.with_name("chatq.log.1").read_text().startswith("line 09 ")
    assert path.read_text() == ""  # the 12th line filled the file, which then rotated


def test_a_failing_log_file_is_reported_once_and_stderr_goes_on() -> None:
    stream = io.StringIO()
    log = LogStream(Path("/dev/full"), stream=stream)  # every write: ENOSPC

    for n in range(3):
        log.write_line(f"line {n}")  # must not raise: a full disk must not stop the supervisor
    log.close()

    lines = stream.getvalue().splitlines()
    assert [line for line in lines if line.startswith("line")] == ["line 0", "line 1", "line 2"]
    warnings = [line for line in lines if "cannot write the log file /dev/full" in line]
    assert len(warnings) == 1


def test_exits_by_signals_without_a_name_are_described() -> None:
    assert describe_exit(-signal.SIGKILL) == "killed by SIGKILL"
    assert describe_exit(-35) == "killed by signal 35"  # SIGRTMIN+n: no name in the enum
    assert describe_exit(3) == "exit code 3"


def test_a_stderr_nobody_reads_never_blocks_the_writer_and_drops_are_reported() -> None:
    read_fd, write_fd = os.pipe()
    with os.fdopen(read_fd, "rb") as reader, os.fdopen(write_fd, "w") as stalled:
        log = LogStream(stream=stalled, max_lines=1_000)
        for n in range(20_000):  # ~2 MB: far past the pipe's 64 KiB buffer
            log.write_line(f"line {n:05d} " + "x" * 90)  # returns at once: it only queues
        assert not log.flush(0.05)  # the writer is stuck on the full pipe

        got = bytearray()
        while b"log lines dropped" not in got or not log.flush(0.2):
            got += os.read(reader.fileno(), 1 << 16)
        log.close()
        stalled.close()
        got += reader.read()  # what the pipe still holds
    lines = got.decode().splitlines()
    kept = [line for line in lines if line.startswith("line ")]
    notes = [line for line in lines if "log lines dropped" in line]
    assert len(kept) + sum(int(note.split()[1]) for note in notes) == 20_000
    assert kept == sorted(kept)  # what is written keeps its order
