"""Store faults: transient ones are waited out (503 meanwhile), permanent ones fail.

A lock held by another connection stands in for "busy/locked"; a real tmpfs
filled to the last byte for "disk full" (skipped where mounting is not
allowed); a file that is not a database and a newer schema for permanent
causes.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import sqlite3
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import WorkerFactory, message, post, statuses, wait_until
from sandbox import fill_file_system
from sandbox import wait_for as sandbox_wait
from supervisor_fixtures import SupervisorHarness

from chatq.shared.errors import StoreError, StoreUnavailable
from chatq.tenant_worker.messages import Message
from chatq.tenant_worker.store import Store
from chatq.tenant_worker.store_errors import is_transient


def msg(mid: str) -> Message:
    return Message(id=mid, chat_id="c1", text="hi", tenant_id="acme")


def sqlite_error(code: int) -> sqlite3.OperationalError:
    exc = sqlite3.OperationalError("boom")
    exc.sqlite_errorcode = code  # type: ignore[attr-defined]
    return exc


@pytest.mark.parametrize(
    ("exc", "transient"),
    [
        (sqlite_error(sqlite3.SQLITE_FULL), True),
        (sqlite_error(sqlite3.SQLITE_BUSY), True),
        (sqlite_error(sqlite3.SQLITE_IOERR_WRITE), True),  # an extended I/O code
        (sqlite_error(sqlite3.SQLITE_NOTADB), False),
        (sqlite_error(sqlite3.SQLITE_READONLY), False),
        (sqlite_error(sqlite3.SQLITE_CANTOPEN), False),
        (OSError(28, "No space left on device"), True),
        (PermissionError(13, "Permission denied"), False),
        (ValueError("not a store error"), False),
    ],
)
def test_store_failures_are_sorted_by_what_fixes_them(exc: Exception, transient: bool) -> None:
    assert is_transient(exc) is transient


async def test_a_locked_store_refuses_new_messages_and_waits_out_owed_writes(
    tmp_path: Path,
) -> None:
    path = tmp_path / "acme.sqlite3"
    store = await Store.open(path, "acme", busy_timeout=0.05)
    try:
        await store.add_messages([msg("m1")])
        other = sqlite3.connect(path, isolation_level=None)
        other.execute("BEGIN IMMEDIATE")  # another process holds the write lock
        owed = asyncio.ensure_future(store.begin_attempt("m1"))
        with pytest.raises(StoreUnavailable, match="locked"):
            await store.add_messages([msg("m2")])
        await asyncio.sleep(0.2)
        assert not owed.done()  # retried with backoff, not failed
        assert store.unavailable is not None

        other.rollback()
        other.close()
        assert await asyncio.wait_for(owed, 5.0) == 1
        assert await store.add_messages([msg("m2")]) == [True]
        assert store.unavailable is None
    finally:
        await store.close()


async def test_close_does_not_wait_for_a_store_that_stays_locked(tmp_path: Path) -> None:
    path = tmp_path / "acme.sqlite3"
    store = await Store.open(path, "acme", busy_timeout=0.05)
    await store.add_messages([msg("m1")])
    other = sqlite3.connect(path, isolation_level=None)
    other.execute("BEGIN IMMEDIATE")
    try:
        owed = asyncio.ensure_future(store.begin_attempt("m1"))
        await asyncio.sleep(0.1)
        await asyncio.wait_for(store.close(), 5.0)
        with pytest.raises(StoreUnavailable):
            await owed  # not written: the row stays queued for the next start
    finally:
        other.rollback()
        other.close()


async def test_permanent_causes_are_not_transient(tmp_path: Path) -> None:
    junk = tmp_path / "junk.sqlite3"
    junk.write_bytes(b"this is not a database, just a file" * 100)
    with pytest.raises(StoreError) as not_a_db:
        await Store.open(junk, "acme")
    assert not isinstance(not_a_db.value, StoreUnavailable)

    newer = tmp_path / "newer.sqlite3"
    with contextlib.closing(sqlite3.connect(newer)) as conn:
        conn.execute("PRAGMA user_version = 999")
    with pytest.raises(StoreError, match="newer") as schema:
        await Store.open(newer, "acme")
    assert not isinstance(schema.value, StoreUnavailable)


# -- disk full, with a real worker --------------------------------------------------


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 4 MiB tmpfs as the workers' data folder (skips where mounting is not allowed)."""
    folder = tmp_path / "data"
    folder.mkdir(mode=0o700)
    mount = ["mount", "-t", "tmpfs", "-o", "size=4m,mode=0700", "tmpfs", str(folder)]
    mounted = os.geteuid() == 0 and subprocess.run(mount, check=False, capture_output=True)
    if not mounted or mounted.returncode != 0:
        pytest.skip("cannot mount a tmpfs here")
    try:
        yield folder
    finally:
        subprocess.run(["umount", "-l", str(folder)], check=False, capture_output=True)


async def test_a_full_disk_gets_503_then_serves_again_by_itself_losing_nothing(
    worker_factory: WorkerFactory, small_disk: Path
) -> None:
    worker = worker_factory()
    await worker.started()
    pid = worker.proc.pid if worker.proc else None
    acknowledged: list[str] = []
    async with worker.client() as session:
        assert (await post(session, message("before", "c1")))[0] == 202
        acknowledged.append("before")
        filler = fill_file_system(small_disk)

        answers: list[int] = []
        for n in range(40):  # the WAL may hold a few more pages: write until refused
            code, _ = await post(session, message(f"full{n}", f"c{n % 3}", "x" * 2000))
            answers.append(code)
            if code == 202:
                acknowledged.append(f"full{n}")
            if code == 503:
                break
        assert answers[-1] == 503, answers
        assert worker.returncode() is None  # still up, not exited into the restart policy

        filler.unlink()

        async def serves() -> bool:
            code, _ = await post(session, message("after", "c1"))
            return code == 202

        for _ in range(100):
            if await serves():
                break
            await asyncio.sleep(0.05)
        else:
            raise AssertionError("not serving 5 s after the disk was freed")
        acknowledged.append("after")

    def all_processed() -> dict[str, Any] | None:
        found = statuses(worker.history())
        done = all(found.get(mid) == "processed" for mid in acknowledged)
        return found if done else None

    await wait_until(all_processed, within=10, what="every acknowledged message processed")
    assert worker.proc is not None and worker.proc.pid == pid
    assert "store unavailable" in worker.stderr()
    assert "store available again" in worker.stderr()
    assert await worker.stop() == 0


async def test_a_worker_started_on_a_full_disk_waits_then_serves(
    worker_factory: WorkerFactory, small_disk: Path
) -> None:
    filler = fill_file_system(small_disk)
    worker = worker_factory()
    worker.start()
    await wait_until(
        lambda: (
            "cannot open the store for now" in worker.stderr() or worker.returncode() is not None
        ),
        within=10,
        what="the retry (or an exit)",
    )
    # Not a boot failure, and no exit into the restart policy.
    assert worker.returncode() is None, worker.stderr()
    async with worker.client() as session:  # 503 meanwhile, not "connection refused"
        assert (await post(session, message("m0", "c1")))[0] == 503

    filler.unlink()
    await worker.ready(within=5.0)
    async with worker.client() as session:
        assert (await post(session, message("m1", "c1")))[0] == 202
    assert await worker.stop() == 0


def test_a_full_disk_shows_in_status_keeps_the_worker_and_clears(
    tmp_path: Path, small_disk: Path
) -> None:
    with SupervisorHarness(tmp_path) as harness:
        harness.write_config({"a": {}})
        run = harness.start()
        pid = run.wait_running("a")
        filler = fill_file_system(small_disk)
        ids = (f"m{n}" for n in range(1000))
        sandbox_wait("a 503", lambda: run.post("a", "x" * 2000, msg_id=next(ids)) == 503)

        status = sandbox_wait("the reason in status", lambda: run.status("a")["store_unavailable"])
        assert "full" in status
        assert (run.status("a")["state"], run.status("a")["pid"]) == ("running", pid)

        filler.unlink()
        sandbox_wait("serving", lambda: run.post("a", "back", msg_id=next(ids)) == 202)
        sandbox_wait("cleared", lambda: run.status("a")["store_unavailable"] is None)
        assert run.status("a")["pid"] == pid and run.status("a")["restarts"] == 0
