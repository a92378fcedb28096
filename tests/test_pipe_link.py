"""A child's end of the supervisor pipe (PipeLink): never blocks, control before logs."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from multiprocessing import Pipe
from multiprocessing.connection import Connection

import pytest

from chatq.shared import event_loop, protocol
from chatq.shared.pipe_link import PipeLink
from chatq.shared.pipe_link import beat as beat_forever


def beat(seq: int) -> protocol.Heartbeat:
    return protocol.Heartbeat(
        seq=seq,
        time=0.0,
        queued=0,
        in_flight=0,
        processed=0,
        failed=0,
        rejected=0,
        duplicates=0,
        rate_limited=0,
    )


@pytest.fixture
def ends() -> Iterator[tuple[Connection, Connection]]:
    supervisor_end, worker_end = Pipe()
    yield supervisor_end, worker_end
    supervisor_end.close()
    worker_end.close()


def drain(conn: Connection) -> list[protocol.Frame]:
    frames = []
    while conn.poll(0.5):
        frames.append(protocol.recv(conn))
    return frames


def test_a_log_line_with_a_lone_surrogate_is_escaped_and_the_pipe_lives_on(
    ends: tuple[Connection, Connection],
) -> None:
    supervisor_end, worker_end = ends
    link = PipeLink(worker_end)

    link.log_sink("2026-11-29 00:00:00.000 ERROR [t pid=1] cannot parse caf\udce9")
    link.send(beat(1))

    assert link.flush(5.0)
    assert not link.broken  # a broken link would silence heartbeats: "hung", killed
    frames = drain(supervisor_end)
    (record,) = [f for f in frames if isinstance(f, protocol.LogRecord)]
    assert record.line.endswith("cannot parse caf\\udce9") and record.level == "ERROR"
    assert beat(1) in frames


def test_a_stalled_reader_never_blocks_the_sender_and_drops_are_reported(
    ends: tuple[Connection, Connection],
) -> None:
    supervisor_end, worker_end = ends
    link = PipeLink(worker_end, max_lines=100)
    line = "2026-11-29 00:00:00.000 INFO  [t pid=1] " + "x" * 4_000

    for n in range(5_000):  # ~20 MB of lines: far past what the socket pair buffers
        link.log_sink(f"{line} {n}")
        if n % 1000 == 0:
            link.send(beat(n))
    link.send(protocol.Ready(pid=7))  # a control frame still gets queued, not blocked
    link.send(beat(9999))
    assert not link.flush(0.05)  # nobody reads: flush gives up in time

    frames = drain(supervisor_end)
    assert link.flush(5.0)
    frames += drain(supervisor_end)
    assert protocol.Ready(pid=7) in frames
    assert frames.index(protocol.Ready(pid=7)) < frames.index(beat(9999))  # control first
    beats = [f for f in frames if isinstance(f, protocol.Heartbeat)]
    assert beats[-1] == beat(9999)  # stale beats are replaced by the latest one
    lines = [f.line for f in frames if isinstance(f, protocol.LogRecord)]
    dropped = [text for text in lines if "log lines dropped" in text]
    kept = [text for text in lines if "log lines dropped" not in text]
    assert len(dropped) >= 1
    total_dropped = sum(int(text.split()[1]) for text in dropped)
    assert len(kept) + total_dropped == 5_000  # every line is sent or counted
    numbers = [int(text.rsplit(" ", 1)[1]) for text in kept]
    assert numbers == sorted(numbers)  # lines keep their order


def test_a_closed_supervisor_end_marks_the_link_broken(
    ends: tuple[Connection, Connection],
) -> None:
    supervisor_end, worker_end = ends
    link = PipeLink(worker_end)
    supervisor_end.close()
    link.send(beat(1))
    assert link.flush(5.0)
    assert link.broken
    link.send(beat(2))  # a no-op now, not an error


def test_a_watched_link_on_the_workers_loop_waits_out_a_full_pipe(
    ends: tuple[Connection, Connection],
) -> None:
    """uvloop's reader makes the fd non-blocking; a full pipe must still not break the link."""
    supervisor_end, worker_end = ends
    link = PipeLink(worker_end, max_lines=100)
    stops: list[str] = []

    async def main() -> None:
        link.watch(stops.append)
        for n in range(2_000):  # ~8 MB of lines: far past what the socket pair buffers
            link.log_sink(f"{'x' * 4_000} {n}")
        link.send(protocol.Ready(pid=7))
        assert not link.flush(0.2)  # nobody reads: the sender waits, it does not give up
        protocol.send(supervisor_end, protocol.Stop(reason="asked"))
        for _ in range(200):
            if stops:
                break
            await asyncio.sleep(0.01)

    event_loop.run(main())
    frames = drain(supervisor_end)
    assert link.flush(5.0)
    frames += drain(supervisor_end)
    assert not link.broken  # a broken link sends no heartbeats: the child is called hung
    assert protocol.Ready(pid=7) in frames
    assert stops == ["asked"]


def test_beats_to_a_reading_supervisor_start_no_thread(
    ends: tuple[Connection, Connection],
) -> None:
    """An idle child wakes once per beat: the frame is written at once, no sender thread wakes."""
    supervisor_end, worker_end = ends
    link = PipeLink(worker_end)
    threads = threading.active_count()
    for seq in range(1, 50):
        link.send(beat(seq) if seq % 2 else protocol.Beat(seq=seq))
        link.log_sink(f"2026-11-29 00:00:00.000 INFO  [t pid=1] line {seq}")
    assert threading.active_count() == threads
    frames = drain(supervisor_end)
    assert len(frames) == 98 and frames[-1] == protocol.LogRecord(
        line="2026-11-29 00:00:00.000 INFO  [t pid=1] line 49", level="INFO"
    )


def test_a_short_beat_queued_behind_a_full_one_keeps_its_counters(
    ends: tuple[Connection, Connection],
) -> None:
    supervisor_end, worker_end = ends
    link = PipeLink(worker_end, max_lines=10)
    stall = "2026-11-29 00:00:00.000 INFO  [t pid=1] " + "x" * 60_000
    for _ in range(30):  # ~2 MB: far past what the socket pair buffers; nobody reads yet
        link.log_sink(stall)
    link.send(protocol.Heartbeat(3, 0.0, 7, 0, 0, 0, 0, 0, 0))  # queued: counters changed
    link.send(protocol.Beat(seq=4))  # queued after it: must not lose them
    frames = drain(supervisor_end)
    assert link.flush(5.0)
    frames += drain(supervisor_end)
    beats = [f for f in frames if isinstance(f, protocol.Heartbeat | protocol.Beat)]
    assert beats == [protocol.Heartbeat(4, 0.0, 7, 0, 0, 0, 0, 0, 0)]


async def test_beats_go_short_while_the_counters_stay_the_same(
    ends: tuple[Connection, Connection],
) -> None:
    supervisor_end, worker_end = ends
    link = PipeLink(worker_end)
    queued = [0]
    ticks: list[int] = []
    fifth = asyncio.Event()

    def heartbeat(seq: int) -> protocol.Heartbeat:
        return protocol.Heartbeat(seq, 0.0, queued[0], 0, 0, 0, 0, 0, 0)

    def also() -> None:
        ticks.append(len(ticks))
        if len(ticks) == 3:
            queued[0] = 5
        if len(ticks) == 5:
            fifth.set()

    task = asyncio.create_task(beat_forever(link, 0.01, heartbeat, also=also))
    await asyncio.wait_for(fifth.wait(), 5.0)
    task.cancel()
    frames = [f for f in drain(supervisor_end) if isinstance(f, protocol.Heartbeat | protocol.Beat)]
    kinds = [(type(f).__name__, f.seq) for f in frames[:5]]
    assert kinds == [
        ("Heartbeat", 1),
        ("Beat", 2),
        ("Beat", 3),
        ("Heartbeat", 4),  # queued went 0 -> 5 after the third tick
        ("Beat", 5),
    ]


async def test_a_heartbeat_is_built_only_when_the_counters_change(
    ends: tuple[Connection, Connection],
) -> None:
    """An idle child's tick compares a tuple and writes a short beat: nothing else."""
    supervisor_end, worker_end = ends
    link = PipeLink(worker_end)
    queued = [0]
    built: list[int] = []
    sixth = asyncio.Event()

    def heartbeat(seq: int) -> protocol.Heartbeat:
        built.append(seq)
        return protocol.Heartbeat(seq, 0.0, queued[0], 0, 0, 0, 0, 0, 0)

    ticks: list[int] = []

    def also() -> None:
        ticks.append(len(ticks))
        if len(ticks) == 2:
            queued[0] = 0  # written again, the same value: not a change
        if len(ticks) == 4:
            queued[0] = 5
        if len(ticks) == 6:
            sixth.set()

    task = asyncio.create_task(
        beat_forever(link, 0.01, heartbeat, also=also, counters=lambda: (queued[0],))
    )
    await asyncio.wait_for(sixth.wait(), 5.0)
    task.cancel()
    frames = [f for f in drain(supervisor_end) if isinstance(f, protocol.Heartbeat | protocol.Beat)]
    assert [(type(f).__name__, f.seq) for f in frames[:6]] == [
        ("Heartbeat", 1),
        ("Beat", 2),
        ("Beat", 3),
        ("Beat", 4),
        ("Heartbeat", 5),  # queued went 0 -> 5 after the fourth tick
        ("Beat", 6),
    ]
    assert [seq for seq in built if seq <= 6] == [1, 5]


def test_send_beat_writes_what_send_writes_and_queues_behind_a_stall(
    ends: tuple[Connection, Connection],
) -> None:
    supervisor_end, worker_end = ends
    link = PipeLink(worker_end, max_lines=10)
    link.send_beat(7)
    assert supervisor_end.recv_bytes() == protocol.encode(protocol.Beat(seq=7))
    stall = "2026-11-29 00:00:00.000 INFO  [t pid=1] " + "x" * 60_000
    for _ in range(30):  # ~2 MB: far past what the socket pair buffers; nobody reads yet
        link.log_sink(stall)
    link.send(protocol.Heartbeat(8, 0.0, 7, 0, 0, 0, 0, 0, 0))  # queued: counters changed
    link.send_beat(9)  # queued after it: keeps its counters
    frames = drain(supervisor_end)
    assert link.flush(5.0)
    frames += drain(supervisor_end)
    beats = [f for f in frames if isinstance(f, protocol.Heartbeat | protocol.Beat)]
    assert beats == [protocol.Heartbeat(9, 0.0, 7, 0, 0, 0, 0, 0, 0)]
