"""Shared test helpers: real worker processes, a unix-socket HTTP client, polling waits.

- `worker_factory(**tenant_keys)` writes a config TOML into ``tmp_path`` and
  returns a `WorkerProcess` for ``python -m chatq.tenant_worker``; every process it
  started is SIGKILLed (if still alive) and reaped in teardown.
- `WorkerProcess.client()`: an aiohttp session over the worker's unix socket.
- `wait_until(check, ...)`: poll with a deadline instead of sleeping a fixed time.
"""

from __future__ import annotations

import asyncio
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, TypeVar

import aiohttp
import pytest
from fakes import FakeClock
from sandbox import clean_env, short_run_dir, toml_value

from chatq.shared.errors import StoreError
from chatq.tenant_worker.history import read_history

REPO = Path(__file__).resolve().parents[1]
_WORKER_COMMAND = (sys.executable, "-m", "chatq.tenant_worker")
T = TypeVar("T")


async def wait_until(
    check: Callable[[], T],
    *,
    within: float = 10.0,
    interval: float = 0.02,
    what: str = "condition",
) -> T:
    """Poll `check` until it returns something truthy (and return that); fail after `within` s."""
    deadline = time.monotonic() + within
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {within:g}s waiting for {what}; last: {value!r}")
        await asyncio.sleep(interval)


def write_config(path: Path, run_dir: Path, data_dir: Path, tenant: dict[str, Any]) -> Path:
    """Write a one-tenant config file at `path`."""
    lines = [
        "[supervisor]",
        f"run_dir = {toml_value(run_dir)}",
        f"data_dir = {toml_value(data_dir)}",
        'log_level = "INFO"',
        "",
        "[[tenants]]",
        *(f"{key} = {toml_value(value)}" for key, value in tenant.items()),
    ]
    path.write_text("\n".join(lines) + "\n")
    return path


class WorkerProcess:
    """One tenant's worker as a real child process; can be started again after it ends."""

    def __init__(self, config: Path, tenant_id: str, socket: Path, store: Path) -> None:
        self.config = config
        self.tenant_id = tenant_id
        self.socket = socket
        self.store = store
        self.proc: subprocess.Popen[bytes] | None = None
        self.runs = 0
        self._stderr: Path | None = None

    # -- lifecycle ------------------------------------------------------------

    def start(self) -> None:
        """Launch ``python -m chatq.tenant_worker`` (the previous run must have ended)."""
        assert self.proc is None or self.proc.poll() is not None, "worker still running"
        self.runs += 1
        folder = self.config.parent
        self._stderr = folder / f"{self.tenant_id}.{id(self):x}.run{self.runs}.stderr"
        env = clean_env()
        with self._stderr.open("wb") as err:
            self.proc = subprocess.Popen(
                [*_WORKER_COMMAND, "--config", str(self.config), "--tenant", self.tenant_id],
                cwd=folder,  # no stray .env from the repo
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=err,
            )

    async def started(self, within: float = 15.0) -> None:
        """Start and wait until ingest answers ``GET /health`` with 200."""
        self.start()
        await self.ready(within)

    async def ready(self, within: float = 15.0) -> None:
        """Wait until ingest answers 200; fail early (with stderr) if the process ends."""
        deadline = time.monotonic() + within
        async with self.client() as session:
            while True:
                code = self.returncode()
                if code is not None:
                    raise AssertionError(f"worker exited with {code}:\n{self.stderr()}")
                if await _healthy(session):
                    return
                if time.monotonic() > deadline:
                    raise AssertionError(f"worker not ready after {within:g}s:\n{self.stderr()}")
                await asyncio.sleep(0.02)

    def returncode(self) -> int | None:
        return None if self.proc is None else self.proc.poll()

    def send_signal(self, signum: signal.Signals) -> None:
        assert self.proc is not None
        self.proc.send_signal(signum)

    async def wait_exit(self, within: float = 15.0) -> int:
        """The exit code, once the process has ended (polled, so the loop keeps running)."""
        proc = self.proc
        assert proc is not None
        await wait_until(lambda: proc.poll() is not None, within=within, what="worker exit")
        return proc.returncode

    async def stop(self, signum: signal.Signals = signal.SIGTERM, within: float = 15.0) -> int:
        """Send `signum` (SIGTERM: drain) and return the exit code."""
        self.send_signal(signum)
        return await self.wait_exit(within)

    def kill(self) -> None:
        """SIGKILL and reap, if still running."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)

    def stderr(self) -> str:
        """What the current (or last) run wrote to stderr."""
        if self._stderr is None or not self._stderr.exists():
            return ""
        return self._stderr.read_text(errors="replace")

    # -- talking to it -------------------------------------------------------

    def client(self) -> aiohttp.ClientSession:
        """A session over the unix socket; no keep-alive, so it survives restarts."""
        connector = aiohttp.UnixConnector(path=str(self.socket), force_close=True)
        return aiohttp.ClientSession(
            connector=connector,
            base_url="http://worker",
            timeout=aiohttp.ClientTimeout(total=10),
        )

    def history(self, chat_id: str | None = None) -> list[dict[str, Any]]:
        """Stored messages (of one chat, if given), oldest first; [] before the store exists."""
        try:
            return read_history(self.store, chat_id=chat_id, limit=1_000_000)
        except StoreError:
            if self.store.exists():
                raise
            return []

    def by_id(self) -> dict[str, dict[str, Any]]:
        return {entry["id"]: entry for entry in self.history()}


async def _healthy(session: aiohttp.ClientSession) -> bool:
    try:
        async with session.get("/health") as response:
            return response.status == 200
    except (aiohttp.ClientError, OSError):
        return False


async def post(session: aiohttp.ClientSession, body: object) -> tuple[int, dict[str, Any]]:
    """POST /messages; the status and the JSON answer."""
    async with session.post("/messages", json=body) as response:
        return response.status, await response.json()


def message(mid: str, chat_id: str, text: str = "hi") -> dict[str, str]:
    """One message as ingest takes it."""
    return {"id": mid, "chat_id": chat_id, "text": text}


def statuses(entries: Sequence[dict[str, Any]]) -> dict[str, str]:
    return {entry["id"]: entry["status"] for entry in entries}


class WorkerFactory:
    """Builds `WorkerProcess`es with their config in `folder`; `cleanup` kills them all."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.run_dir = short_run_dir()
        self.workers: list[WorkerProcess] = []

    def __call__(self, tenant_id: str = "t1", **tenant_keys: Any) -> WorkerProcess:
        data_dir = self.folder / "data"
        config = write_config(
            self.folder / f"{tenant_id}.toml",
            self.run_dir,
            data_dir,
            {"id": tenant_id, **tenant_keys},
        )
        worker = WorkerProcess(
            config, tenant_id, self.run_dir / f"{tenant_id}.sock", data_dir / f"{tenant_id}.sqlite3"
        )
        self.workers.append(worker)
        return worker

    def cleanup(self) -> None:
        for worker in self.workers:
            worker.kill()
        shutil.rmtree(self.run_dir, ignore_errors=True)


@pytest.fixture
def worker_factory(tmp_path: Path) -> Iterator[WorkerFactory]:
    """Make real worker processes; each is killed and reaped when the test ends."""
    factory = WorkerFactory(tmp_path)
    try:
        yield factory
    finally:
        factory.cleanup()


@pytest.fixture
def clock() -> FakeClock:
    """A fake monotonic clock at 1000.0 that the test advances by hand."""
    return FakeClock()
