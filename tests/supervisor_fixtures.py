"""Helpers for tests that run a real supervisor with real workers.

`SupervisorHarness` writes configs into a test's ``tmp_path``, starts
``python -m chatq.supervisor.cli --config PATH run`` as a subprocess (its stderr,
where every log line goes, into a file), talks to it over the control socket
and the tenants' ingest sockets, and -- whatever the test did -- kills the
supervisor, its fork server and every worker it ever saw in `close()`.

Use it from a fixture in the test module::

    @pytest.fixture
    def harness(tmp_path: Path) -> Iterator[SupervisorHarness]:
        with SupervisorHarness(tmp_path) as harness:
            yield harness

Everything waits by polling against a deadline (`sandbox.wait_for`), never by a fixed
sleep, so the tests run as fast as the processes let them.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path
from types import TracebackType
from typing import Any

import psutil
from sandbox import UnixHTTPConnection, clean_env, short_run_dir, toml_value, wait_for

from chatq.shared.errors import ControlError
from chatq.supervisor.control_client import request

__all__ = [
    "FAST_DEFAULTS",
    "FAST_SUPERVISOR",
    "SupervisorHarness",
    "SupervisorRun",
    "alive",
    "gone",
    "toml_text",
]

REPO = Path(__file__).resolve().parents[1]
# Small intervals so that every process path takes a fraction of a second.
FAST_SUPERVISOR: dict[str, Any] = {
    "heartbeat_interval_ms": 100,
    "heartbeat_timeout_ms": 1500,
    "stop_grace": 1.0,
    "backoff_initial": 0.05,
    "backoff_max": 0.2,
    "healthy_after": 10.0,
    "max_restarts": 10,
    "restart_window": 30.0,
    "watchdog_interval": 0.2,
    "log_level": "INFO",
}
FAST_DEFAULTS: dict[str, Any] = {"handler": "echo", "drain_timeout": 0.2, "retry_backoff": 0.05}
LOG_TAIL_ON_FAILURE = 60


def alive(proc: psutil.Process) -> bool:
    """Whether `proc` still runs (a zombie has exited; only its parent has to collect it)."""
    try:
        return proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def gone(pid: int) -> bool:
    """Whether the process `pid` has exited (a zombie counts as exited)."""
    try:
        return not alive(psutil.Process(pid))
    except psutil.NoSuchProcess:
        return True


# -- config files ---------------------------------------------------------------


def _table(lines: list[str], header: str, values: Mapping[str, object]) -> None:
    """A table, then a sub-table for each mapping value (e.g. [tenants.whatsapp])."""
    lines.append(header)
    name = header.strip("[]")
    nested = {key: value for key, value in values.items() if isinstance(value, Mapping)}
    lines.extend(
        f"{key} = {toml_value(value)}" for key, value in values.items() if key not in nested
    )
    lines.append("")
    for key, value in nested.items():
        _table(lines, f"[{name}.{key}]", value)


def toml_text(
    supervisor: Mapping[str, object],
    defaults: Mapping[str, object],
    tenants: Mapping[str, Mapping[str, object]],
    gateway: Mapping[str, object] | None = None,
) -> str:
    """A chatq config file: ``tenants`` maps each tenant id to its own keys."""
    lines: list[str] = []
    _table(lines, "[supervisor]", supervisor)
    _table(lines, "[defaults]", defaults)
    for tenant_id, keys in tenants.items():
        _table(lines, "[[tenants]]", {"id": tenant_id, **keys})
    if gateway is not None:
        _table(lines, "[gateway]", gateway)
    return "\n".join(lines)


# -- a running supervisor -----------------------------------------------------------


class SupervisorRun:
    """One supervisor subprocess and the ways a test talks to it."""

    def __init__(
        self, proc: subprocess.Popen[bytes], config_path: Path, run_dir: Path, stderr: Path
    ) -> None:
        self.proc = proc
        self.config_path = config_path
        self.run_dir = run_dir
        self.socket = run_dir / "supervisor.sock"
        self.stderr_path = stderr
        self.seen: dict[int, psutil.Process] = {}  # every worker pid observed, for cleanup

    @property
    def pid(self) -> int:
        return self.proc.pid

    # -- control socket -----------------------------------------------------

    def request(self, cmd: str, **fields: Any) -> Any:
        """One control request; its result (errors raise as in `control_client.request`)."""
        result = request(self.socket, cmd, timeout=5.0, **fields)
        for row in result if isinstance(result, list) else [result]:
            if isinstance(row, dict):
                self._remember(row.get("pid"))
        return result

    def tenants(self) -> dict[str, dict[str, Any]]:
        """``list``, keyed by tenant id."""
        return {row["tenant"]: row for row in self.request("list")}

    def status(self, tenant: str) -> dict[str, Any]:
        result: dict[str, Any] = self.request("status", tenant=tenant)
        return result

    def pids(self) -> dict[str, int | None]:
        return {tenant: row["pid"] for tenant, row in self.tenants().items()}

    def wait_state(self, tenant: str, state: str, timeout: float = 10.0) -> dict[str, Any]:
        """The tenant's status once it is in `state`."""

        def probe() -> dict[str, Any] | None:
            row = self.status(tenant)
            return row if row["state"] == state else None

        return wait_for(f"{tenant} to be {state}", probe, timeout)

    def wait_running(
        self, tenant: str, *, not_pid: int | None = None, timeout: float = 10.0
    ) -> int:
        """The pid of the tenant's worker once it is running (and is not `not_pid`)."""

        def probe() -> int | None:
            row = self.tenants().get(tenant)
            if row is None or row["state"] != "running" or row["pid"] == not_pid:
                return None
            return int(row["pid"])

        return wait_for(f"{tenant} running with a pid other than {not_pid}", probe, timeout)

    def wait_all_running(self, timeout: float = 15.0) -> dict[str, int]:
        def probe() -> dict[str, int] | None:
            rows = self.tenants()
            if rows and all(row["state"] == "running" for row in rows.values()):
                return {tenant: int(row["pid"]) for tenant, row in rows.items()}
            return None

        return wait_for("every tenant running", probe, timeout)

    # -- ingest ---------------------------------------------------------------

    def post(self, tenant: str, text: str, *, chat_id: str = "c1", msg_id: str = "m1") -> int:
        """POST one message to the tenant's ingest socket; the HTTP status."""
        body = json.dumps({"id": msg_id, "chat_id": chat_id, "text": text})
        conn = UnixHTTPConnection(self.run_dir / f"{tenant}.sock", timeout=5.0)
        try:
            conn.request("POST", "/messages", body, {"Content-Type": "application/json"})
            response = conn.getresponse()
            response.read()
            return response.status
        finally:
            conn.close()

    # -- processes and logs ------------------------------------------------------

    def kill_worker(self, tenant: str, signum: int = signal.SIGKILL) -> int:
        """Signal the tenant's current worker; its pid."""
        pid = self.tenants()[tenant]["pid"]
        assert pid is not None, f"{tenant} has no worker"
        os.kill(pid, signum)
        return int(pid)

    def log(self) -> str:
        return self.stderr_path.read_text(encoding="utf-8", errors="replace")

    def wait_log(self, text: str, timeout: float = 10.0) -> str:
        """The log once it contains `text`."""

        def probe() -> str | None:
            log = self.log()
            return log if text in log else None

        return wait_for(f"{text!r} in the supervisor's log", probe, timeout)

    def wait_exit(self, timeout: float = 15.0) -> int:
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"supervisor still running after {timeout:g} s") from None

    def worker_processes(self) -> list[psutil.Process]:
        """Live descendants of the supervisor (workers and the fork server)."""
        with contextlib.suppress(psutil.NoSuchProcess):
            return psutil.Process(self.proc.pid).children(recursive=True)
        return []

    def _remember(self, pid: object) -> None:
        if isinstance(pid, int) and pid not in self.seen:
            with contextlib.suppress(psutil.NoSuchProcess):
                self.seen[pid] = psutil.Process(pid)

    def kill_everything(self) -> None:
        """SIGKILL the supervisor, its fork server and every worker seen; reap what we can."""
        victims = [*self.worker_processes(), *self.seen.values()]
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, signal.SIGKILL)  # the supervisor and its fork server
        for victim in victims:
            with contextlib.suppress(psutil.NoSuchProcess):
                victim.kill()  # psutil checks the pid was not reused
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(10)
        # Orphaned workers are reaped by init, maybe late: a zombie counts as gone.
        with contextlib.suppress(AssertionError):
            wait_for("killed processes to die", lambda: not any(map(alive, victims)), 5.0)


class SupervisorHarness:
    """Starts supervisors for one test and always cleans up after them."""

    def __init__(self, tmp_path: Path) -> None:
        self.tmp_path = tmp_path
        self.run_dir = short_run_dir()
        self.data_dir = tmp_path / "data"
        self.config_path = tmp_path / "tenants.toml"
        self.runs: list[SupervisorRun] = []

    def write_config(
        self,
        tenants: Mapping[str, Mapping[str, object]],
        *,
        supervisor: Mapping[str, object] | None = None,
        defaults: Mapping[str, object] | None = None,
        gateway: Mapping[str, object] | None = None,
    ) -> Path:
        """Write (or rewrite) the config file; `supervisor`/`defaults` override the fast ones."""
        settings = {
            "run_dir": self.run_dir,
            "data_dir": self.data_dir,
            **FAST_SUPERVISOR,
            **(supervisor or {}),
        }
        text = toml_text(settings, {**FAST_DEFAULTS, **(defaults or {})}, tenants, gateway)
        self.config_path.write_text(text, encoding="utf-8")
        return self.config_path

    def write_module(self, name: str, source: str) -> None:
        """A handler module next to the config file (workers import from there)."""
        (self.tmp_path / f"{name}.py").write_text(source, encoding="utf-8")

    def start(
        self, *, wait_running: bool = True, main: Path | None = None, output: int | None = None
    ) -> SupervisorRun:
        """Run the supervisor on the config written last; wait for its socket (and tenants).

        ``main``: a script to run instead of ``python -m chatq.supervisor.cli`` (same
        arguments). ``output``: a file descriptor for its stdout and stderr instead
        of the log file `log()` reads.
        """
        env = clean_env()
        stderr = self.tmp_path / f"supervisor-{len(self.runs)}.log"
        entry = [str(main)] if main is not None else ["-m", "chatq.supervisor.cli"]
        with stderr.open("wb") as sink:
            proc = subprocess.Popen(
                [sys.executable, *entry, "--config", str(self.config_path), "run"],
                cwd=self.tmp_path,  # no stray .env
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=sink if output is None else output,
                stderr=sink if output is None else output,
                start_new_session=True,  # one group: the supervisor and its fork server
            )
        run = SupervisorRun(proc, self.config_path, self.run_dir, stderr)
        self.runs.append(run)
        wait_for("the control socket", lambda: self._answers(run), timeout=15.0)
        if wait_running:
            run.wait_all_running()
        return run

    def _answers(self, run: SupervisorRun) -> bool:
        if run.proc.poll() is not None:
            raise AssertionError(f"supervisor exited {run.proc.returncode}:\n{run.log()[-3000:]}")
        try:
            run.request("list")
        except ControlError:  # incl. SupervisorNotRunning: not listening yet
            return False
        return True

    def close(self) -> None:
        for number, run in enumerate(self.runs):
            run.kill_everything()
            # pytest shows this only for a failed test: the supervisor's view of it.
            tail = "\n".join(run.log().splitlines()[-LOG_TAIL_ON_FAILURE:])
            print(f"--- supervisor {number} log (tail) ---\n{tail}")
        shutil.rmtree(self.run_dir, ignore_errors=True)

    def __enter__(self) -> SupervisorHarness:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
