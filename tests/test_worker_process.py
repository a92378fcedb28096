"""Real worker processes (`python -m chatq.tenant_worker`): chats, restarts, drain, crashes.

Each test starts its workers through the `worker_factory` fixture, which
SIGKILLs and reaps whatever is still running when the test ends. Waits poll
the store (read-only, like `chatq history`) against a deadline.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path

import aiohttp
from conftest import WorkerFactory, WorkerProcess, message, post, statuses, wait_until

SLEEPY = "chatq.tenant_worker.handlers.demo:sleepy"
SHOUT = "chatq.tenant_worker.handlers.demo:shout"
CRASH = "chatq.tenant_worker.handlers.demo:crash"


def all_done(worker: WorkerProcess, count: int | None = None) -> bool:
    """Every message handled (none queued/processing) and every reply out (none pending)."""
    entries = worker.history()
    if count is not None and len(entries) < count:
        return False
    busy = {"queued", "processing"}
    return all(
        e["status"] not in busy and all(r["status"] != "pending" for r in e["replies"])
        for e in entries
    )


async def test_twenty_chats_of_100ms_handlers_finish_in_parallel(
    worker_factory: WorkerFactory,
) -> None:
    worker = worker_factory(handler=SLEEPY)
    await worker.started()

    async with worker.client() as session:
        began = time.monotonic()
        code, answer = await post(session, [message(f"m{n}", f"c{n}", "0.1") for n in range(20)])
        assert (code, answer) == (202, {"accepted": 20, "duplicates": 0, "rejected": 0})
        await wait_until(lambda: all_done(worker, 20), within=5, what="20 chats done")
        elapsed = time.monotonic() - began

    assert elapsed < 1.0, f"20 x 100 ms took {elapsed:.2f}s: chats did not run in parallel"
    assert set(statuses(worker.history()).values()) == {"processed"}
    assert await worker.stop() == 0


async def test_ingest_socket_and_a_new_data_folder_are_owner_only(
    worker_factory: WorkerFactory,
) -> None:
    worker = worker_factory()
    assert not worker.store.parent.exists()  # as after a reload to a new data_dir
    old = os.umask(0o022)  # a common umask: the worker must not rely on a strict one
    try:
        await worker.started()
    finally:
        os.umask(old)

    assert worker.socket.stat().st_mode & 0o777 == 0o600
    assert worker.store.parent.stat().st_mode & 0o777 == 0o700


async def test_duplicate_after_a_restart_is_counted_and_processed_once(
    worker_factory: WorkerFactory,
) -> None:
    worker = worker_factory(handler=SHOUT)
    await worker.started()
    async with worker.client() as session:
        assert await post(session, message("m1", "c", "hello")) == (
            202,
            {"accepted": 1, "duplicates": 0, "rejected": 0},
        )
        await wait_until(lambda: all_done(worker, 1), what="m1 done")
    assert await worker.stop() == 0

    await worker.started()  # a new process: nothing in memory, only the store remembers
    async with worker.client() as session:
        code, answer = await post(session, [message("m1", "c", "hello"), message("m2", "c", "x")])
        assert (code, answer) == (202, {"accepted": 1, "duplicates": 1, "rejected": 0})
        await wait_until(lambda: all_done(worker, 2), what="m2 done")

    first, second = worker.history()
    assert (first["id"], first["status"], first["attempts"]) == ("m1", "processed", 1)
    assert [(r["text"], r["status"]) for r in first["replies"]] == [("HELLO", "sent")]
    assert [r["text"] for r in second["replies"]] == ["X"]


async def test_sigterm_drains_in_flight_keeps_pending_queued_and_next_start_finishes(
    worker_factory: WorkerFactory,
) -> None:
    worker = worker_factory(handler=SLEEPY, drain_timeout=10.0)
    await worker.started()
    async with worker.client() as session:
        batch = [
            message("c1", "c", "0.4"),
            message("c2", "c", "0"),
            message("c3", "c", "0"),
            message("d1", "d", "0.4"),
        ]
        assert (await post(session, batch))[0] == 202
    await wait_until(
        lambda: (
            statuses(worker.history())
            == {
                "c1": "processing",
                "c2": "queued",
                "c3": "queued",
                "d1": "processing",
            }
        ),
        what="c1 and d1 in flight",
    )

    began = time.monotonic()
    assert await worker.stop(signal.SIGTERM) == 0
    assert time.monotonic() - began > 0.2  # it waited for the handlers in flight

    after = {e["id"]: e for e in worker.history()}
    assert {mid: e["status"] for mid, e in after.items()} == {
        "c1": "processed",
        "c2": "queued",
        "c3": "queued",
        "d1": "processed",
    }
    assert after["c2"]["attempts"] == after["c3"]["attempts"] == 0
    assert "draining (SIGTERM)" in worker.stderr()

    await worker.started()
    await wait_until(lambda: all_done(worker, 4), what="the queued rest")
    assert set(statuses(worker.history()).values()) == {"processed"}
    assert [len(e["replies"]) for e in worker.history()] == [1, 1, 1, 1]


LOADBOT = """
import asyncio


async def reply(message, ctx):
    await asyncio.sleep(0.002)  # keeps a few messages in flight when the kill comes
    return "re:" + message.text
"""


async def send_in_order(
    session: aiohttp.ClientSession, chat: str, acked: list[str], count: int
) -> None:
    """Post one chat's messages one at a time; stop at the first failure (the kill)."""
    for n in range(count):
        mid = f"{chat}-{n}"
        try:
            code, answer = await post(session, message(mid, chat, mid))
        except (aiohttp.ClientError, OSError):
            return
        if code != 202:
            return
        assert answer == {"accepted": 1, "duplicates": 0, "rejected": 0}
        acked.append(mid)


async def test_sigkill_under_load_loses_nothing_acknowledged_and_keeps_chat_order(
    worker_factory: WorkerFactory, tmp_path: Path
) -> None:
    # A tenant handler module next to the config file (importable by the worker).
    (tmp_path / "loadbot.py").write_text(LOADBOT)
    worker = worker_factory(
        handler="loadbot:reply", max_queue_size=500, rate_limit_per_minute=100_000
    )
    await worker.started()
    chats = [f"chat{n}" for n in range(10)]
    acked: dict[str, list[str]] = defaultdict(list)

    async with worker.client() as session:
        senders = [
            asyncio.create_task(send_in_order(session, chat, acked[chat], 400)) for chat in chats
        ]
        try:
            await wait_until(
                lambda: sum(map(len, acked.values())) >= 300, within=20, what="300 acks"
            )
            worker.kill()  # SIGKILL: no drain, no cleanup
        finally:
            async with asyncio.timeout(10):
                await asyncio.gather(*senders)
    assert worker.returncode() == -signal.SIGKILL

    await worker.started()
    await wait_until(lambda: all_done(worker), within=20, what="replay to finish")

    entries = {e["id"]: e for e in worker.history()}
    for chat in chats:
        for mid in acked[chat]:
            entry = entries[mid]
            assert entry["status"] == "processed", entry
            assert [(r["text"], r["status"]) for r in entry["replies"]] == [(f"re:{mid}", "sent")]
        # Handled in arrival order: reply ids (assigned as each message completes)
        # rise along the chat's messages, which history lists in arrival order.
        in_chat = worker.history(chat)
        assert [e["id"] for e in in_chat][: len(acked[chat])] == acked[chat]
        reply_ids = [r["id"] for e in in_chat for r in e["replies"]]
        assert reply_ids == sorted(reply_ids)
        assert len(reply_ids) == len(in_chat)  # exactly one reply per message, acked or not
    assert await worker.stop() == 0


async def test_handler_that_kills_the_process_is_given_up_after_max_attempts(
    worker_factory: WorkerFactory,
) -> None:
    worker = worker_factory(handler=CRASH, max_attempts=2)
    await worker.started()
    batch = [message("bad", "x", "crash")] + [message(f"ok{n}", f"y{n}", "hi") for n in range(3)]
    async with worker.client() as session:
        # The crash may beat the 202; the rows are committed either way.
        with contextlib.suppress(aiohttp.ClientError, OSError):
            await post(session, batch)

    crashes = 0
    while True:  # the test is the supervisor: restart until the tenant stays up
        code = await wait_for_exit_or(worker, lambda: all_done(worker, 4))
        if code is None:
            break
        assert code == 70, worker.stderr()
        crashes += 1
        assert crashes <= 2, "still crashing after max_attempts"
        worker.start()

    assert crashes == 2
    entries = {e["id"]: e for e in worker.history()}
    assert entries["bad"]["status"] == "failed"
    assert "quarantined" in entries["bad"]["last_error"]
    for n in range(3):  # the other chats' messages were not charged for the crashes
        assert entries[f"ok{n}"]["status"] == "processed"

    await worker.ready()
    async with worker.client() as session:
        assert (await post(session, message("after", "x", "hello")))[0] == 202
    await wait_until(lambda: statuses(worker.history()).get("after") == "processed")
    assert await worker.stop() == 0


async def wait_for_exit_or(
    worker: WorkerProcess, done: Callable[[], bool], within: float = 15.0
) -> int | None:
    """The exit code if the process ends first; None once `done()` holds while it runs."""
    result: list[int | None] = []

    def check() -> bool:
        code = worker.returncode()
        if code is not None:
            result.append(code)
        elif done():
            result.append(None)
        return bool(result)

    await wait_until(check, within=within, what="worker exit or settled store")
    return result[0]


async def test_bad_handler_module_fails_to_boot_with_exit_3_and_one_line(
    worker_factory: WorkerFactory,
) -> None:
    worker = worker_factory(handler="no_such_module_xyz:reply")
    worker.start()

    assert await worker.wait_exit() == 3
    lines = worker.stderr().strip().splitlines()
    assert len(lines) == 1, lines
    assert "failed to boot" in lines[0]
    assert "no module named 'no_such_module_xyz'" in lines[0]


async def test_taken_port_fails_to_boot_with_exit_3_and_one_line(
    worker_factory: WorkerFactory,
) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        worker = worker_factory(port=taken.getsockname()[1])
        worker.start()

        assert await worker.wait_exit() == 3
    lines = worker.stderr().strip().splitlines()
    assert len(lines) == 1, lines
    assert "failed to boot" in lines[0]
    assert "cannot listen on" in lines[0]


async def test_second_worker_on_the_same_store_fails_to_boot_and_the_first_serves_on(
    worker_factory: WorkerFactory,
) -> None:
    first = worker_factory(handler=SHOUT, drain_timeout=0.2)  # the second waits 2.2 s
    await first.started()
    second = worker_factory(handler=SHOUT, drain_timeout=0.2)  # same tenant, store, socket
    second.start()

    assert await second.wait_exit() == 1  # not 3: a restart may find the store free
    waiting, failed = second.stderr().strip().splitlines()
    assert first.proc is not None
    assert f"in use by another worker (pid {first.proc.pid}); waiting up to 2.2s" in waiting
    assert "failed to boot" in failed
    assert f"is in use by another worker (pid {first.proc.pid};" in failed
    async with first.client() as session:  # its socket was left alone
        assert (await post(session, message("m1", "c", "hi")))[0] == 202
    await wait_until(lambda: all_done(first, 1), what="m1 done by the first worker")
    assert await first.stop() == 0


async def test_a_worker_waiting_for_the_store_takes_over_once_the_first_exits(
    worker_factory: WorkerFactory,
) -> None:
    first = worker_factory(handler=SHOUT, drain_timeout=5.0)
    await first.started()
    second = worker_factory(handler=SHOUT, drain_timeout=5.0)
    second.start()
    await wait_until(lambda: "waiting up to" in second.stderr(), what="the second one waiting")
    async with first.client() as session:  # still the first one's socket
        assert (await post(session, message("m1", "c", "one")))[0] == 202
    await wait_until(lambda: all_done(first, 1), what="m1 done by the first worker")

    assert await first.stop() == 0
    await second.ready()
    async with second.client() as session:
        assert (await post(session, message("m2", "c", "two")))[0] == 202
    await wait_until(lambda: all_done(second, 2), what="m2 done by the second worker")
    assert [[r["text"] for r in e["replies"]] for e in second.history()] == [["ONE"], ["TWO"]]
    assert await second.stop() == 0


async def test_a_request_whose_body_never_finishes_does_not_hold_the_stop(
    worker_factory: WorkerFactory,
) -> None:
    worker = worker_factory()
    await worker.started()
    _reader, writer = await asyncio.open_unix_connection(str(worker.socket))
    try:
        writer.write(b'POST /messages HTTP/1.1\r\nHost: w\r\nContent-Length: 100\r\n\r\n{"id":')
        await writer.drain()
        await asyncio.sleep(0.1)  # the worker is now reading that body
        began = time.monotonic()
        worker.send_signal(signal.SIGTERM)
        assert await worker.wait_exit(within=30) == 0
        assert time.monotonic() - began < 5  # aiohttp's default would wait 60 s
    finally:
        writer.close()
    assert worker.history() == []  # the cut-off request wrote nothing


async def test_a_stop_while_waiting_for_the_store_ends_the_wait(
    worker_factory: WorkerFactory,
) -> None:
    first = worker_factory(drain_timeout=20.0)  # the second would wait 22 s
    await first.started()
    second = worker_factory(drain_timeout=20.0)
    second.start()
    await wait_until(lambda: "waiting up to" in second.stderr(), what="the second one waiting")

    began = time.monotonic()
    assert await second.stop() == 0
    assert time.monotonic() - began < 5
    assert "stopped while booting (SIGTERM)" in second.stderr()
    assert first.returncode() is None  # the first one serves on


async def test_a_deleted_socket_file_is_noticed_and_bound_again(
    worker_factory: WorkerFactory,
) -> None:
    worker = worker_factory()
    await worker.started()
    worker.socket.unlink()

    await wait_until(worker.socket.exists, within=5, what="the socket file back")
    async with worker.client() as session:
        code, _ = await post(session, message("m1", "c1"))
    assert code == 202
    assert oct(worker.socket.stat().st_mode & 0o777) == "0o600"
    assert "listening again" in worker.stderr()
    assert await worker.stop() == 0
