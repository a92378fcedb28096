"""The worker's end of the supervisor pipe (PipeLink)."""

from __future__ import annotations

from multiprocessing import Pipe

from chatq.shared import protocol
from chatq.shared.pipe_link import PipeLink


def test_a_log_line_with_a_lone_surrogate_is_escaped_and_the_pipe_lives_on() -> None:
    supervisor_end, worker_end = Pipe()
    link = PipeLink(worker_end)

    link.log_sink("2026-11-29 00:00:00.000 ERROR [t pid=1] cannot parse caf\udce9")
    beat = protocol.Heartbeat(
        seq=1,
        time=0.0,
        queued=0,
        in_flight=0,
        processed=0,
        failed=0,
        rejected=0,
        duplicates=0,
        rate_limited=0,
    )
    link.send(beat)

    assert not link.broken  # a broken link would silence heartbeats: "hung", killed
    record = protocol.recv(supervisor_end)
    assert isinstance(record, protocol.LogRecord)
    assert record.line.endswith("cannot parse caf\\udce9") and record.level == "ERROR"
    assert protocol.recv(supervisor_end) == beat
    supervisor_end.close()
    worker_end.close()
