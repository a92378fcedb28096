"""One worker per store: the lock file beside the SQLite file."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from pathlib import Path

import pytest
from fakes import FakeClock

from chatq.shared.errors import StoreError
from chatq.tenant_worker.store_lock import POLL_SECONDS, StoreLock, lock_path


async def test_a_held_store_is_refused_with_the_holders_pid_until_released(tmp_path: Path) -> None:
    store = tmp_path / "data" / "acme.sqlite3"
    first = await StoreLock.acquire(store)
    assert lock_path(store).read_text() == f"{os.getpid()}\n"

    with pytest.raises(StoreError, match=rf"in use by another worker \(pid {os.getpid()};"):
        await StoreLock.acquire(store)

    first.release()
    first.release()  # idempotent
    (await StoreLock.acquire(store)).release()


@pytest.mark.parametrize("left", ["9" * 12 + "\n", "1\n", "same-length\n"])
async def test_the_lock_file_holds_exactly_our_pid_and_is_cut_only_if_longer(
    tmp_path: Path, left: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The last holder's line is replaced; truncating (the journal: ~130 us) only when needed."""
    store = tmp_path / "acme.sqlite3"
    ours = f"{os.getpid()}\n"
    if left == "same-length\n":
        left = "7" * (len(ours) - 1) + "\n"
    lock_path(store).write_text(left)
    cuts: list[int] = []
    truncate = os.ftruncate
    monkeypatch.setattr(os, "ftruncate", lambda fd, size: (cuts.append(size), truncate(fd, size)))
    (await StoreLock.acquire(store)).release()
    assert lock_path(store).read_text() == ours
    assert cuts == ([len(ours)] if len(left) > len(ours) else [])


async def test_other_stores_are_not_affected(tmp_path: Path) -> None:
    held = await StoreLock.acquire(tmp_path / "acme.sqlite3")
    (await StoreLock.acquire(tmp_path / "globex.sqlite3")).release()
    held.release()


HOLD = """
import asyncio, sys, time
from pathlib import Path
from chatq.tenant_worker.store_lock import StoreLock
asyncio.run(StoreLock.acquire(Path(sys.argv[1])))
print("held", flush=True)
time.sleep(60)
"""


def test_a_sigkilled_holder_leaves_no_stale_lock(tmp_path: Path) -> None:
    store = tmp_path / "acme.sqlite3"
    argv = [sys.executable, "-c", HOLD, str(store)]
    repo = Path(__file__).resolve().parent.parent
    with subprocess.Popen(argv, cwd=repo, stdout=subprocess.PIPE, text=True) as holder:
        try:
            assert holder.stdout is not None
            assert holder.stdout.readline() == "held\n"
            with pytest.raises(StoreError, match=rf"pid {holder.pid};"):
                asyncio.run(StoreLock.acquire(store))
        finally:
            holder.kill()
            holder.wait(10)
    asyncio.run(StoreLock.acquire(store)).release()  # the kernel dropped it with the process


async def test_an_unusable_folder_is_one_line_naming_the_lock(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(StoreError, match=r"^store lock .*file/acme\.sqlite3\.lock: ") as caught:
        await StoreLock.acquire(blocker / "acme.sqlite3")
    assert "\n" not in str(caught.value)


async def test_waits_for_the_holder_to_let_go(tmp_path: Path) -> None:
    store = tmp_path / "acme.sqlite3"
    holder = await StoreLock.acquire(store)
    clock = FakeClock()
    naps: list[float] = []

    async def sleep(seconds: float) -> None:  # the holder exits during the second nap
        naps.append(seconds)
        clock.advance(seconds)
        if len(naps) == 2:
            holder.release()

    lock = await StoreLock.acquire(store, wait=5.0, sleep=sleep, monotonic=clock)
    assert naps == [POLL_SECONDS, POLL_SECONDS]
    assert lock_path(store).read_text() == f"{os.getpid()}\n"
    lock.release()


async def test_gives_up_after_wait(tmp_path: Path) -> None:
    store = tmp_path / "acme.sqlite3"
    holder = await StoreLock.acquire(store)
    clock = FakeClock()

    async def sleep(seconds: float) -> None:
        clock.advance(seconds)

    with pytest.raises(StoreError, match="in use by another worker"):
        await StoreLock.acquire(store, wait=1.0, sleep=sleep, monotonic=clock)
    assert clock() == pytest.approx(1001.0)  # waited the full second, then gave up
    holder.release()


async def test_a_stop_ends_the_wait_without_the_lock(tmp_path: Path) -> None:
    store = tmp_path / "acme.sqlite3"
    holder = await StoreLock.acquire(store)
    clock = FakeClock()
    stopping = False

    async def sleep(seconds: float) -> None:
        nonlocal stopping
        clock.advance(seconds)
        stopping = True  # a SIGTERM during the first nap

    lock = await StoreLock.acquire(
        store, wait=30.0, give_up=lambda: stopping, sleep=sleep, monotonic=clock
    )
    assert lock is None
    assert clock() == pytest.approx(1000.0 + POLL_SECONDS)
    holder.release()
    (await StoreLock.acquire(store)).release()  # nothing of the abandoned wait is held
