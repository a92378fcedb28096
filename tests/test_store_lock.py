"""One worker per store: the lock file beside the SQLite file."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from shared.errors import StoreError
from tenant_worker.store_lock import StoreLock, lock_path


def test_a_held_store_is_refused_with_the_holders_pid_until_released(tmp_path: Path) -> None:
    store = tmp_path / "data" / "acme.sqlite3"
    first = StoreLock.acquire(store)
    assert lock_path(store).read_text() == f"{os.getpid()}\n"

    with pytest.raises(StoreError, match=rf"in use by another worker \(pid {os.getpid()};"):
        StoreLock.acquire(store)

    first.release()
    first.release()  # idempotent
    StoreLock.acquire(store).release()


def test_other_stores_are_not_affected(tmp_path: Path) -> None:
    held = StoreLock.acquire(tmp_path / "acme.sqlite3")
    StoreLock.acquire(tmp_path / "globex.sqlite3").release()
    held.release()


def test_a_sigkilled_holder_leaves_no_stale_lock(tmp_path: Path) -> None:
    store = tmp_path / "acme.sqlite3"
    code = (
        "import time; from pathlib import Path; from tenant_worker.store_lock import StoreLock;"
        f" StoreLock.acquire(Path({str(store)!r})); print('held', flush=True); time.sleep(60)"
    )
    with subprocess.Popen(
        [sys.executable, "-c", code], stdout=subprocess.PIPE, text=True
    ) as holder:
        try:
            assert holder.stdout is not None
            assert holder.stdout.readline() == "held\n"
            with pytest.raises(StoreError, match=rf"pid {holder.pid};"):
                StoreLock.acquire(store)
        finally:
            holder.kill()
            holder.wait(10)
    StoreLock.acquire(store).release()  # the kernel dropped it with the process


def test_an_unusable_folder_is_one_line_naming_the_lock(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(StoreError, match=r"^store lock .*file/acme\.sqlite3\.lock: ") as caught:
        StoreLock.acquire(blocker / "acme.sqlite3")
    assert "\n" not in str(caught.value)
