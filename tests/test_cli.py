"""The ``chatq`` CLI against a real supervisor with two tenants, and on its own.

One supervisor (module scope) serves the read-only, send and restart/stop/kill
tests; each test first waits until both tenants are running again. `reload`
gets its own supervisor because it rewrites the config. The CLI runs
in-process through `main([...])` (fast, output via capsys), and once as the
installed console script. Every supervisor is shut down, and its whole process
tree killed if it lingers, whatever the test did.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest
import sandbox
from fakes import FakeClock

from chatq.config import DEFAULT_CONFIG_PATH, load_config
from chatq.config.settings import TENANT_ID_PATTERN
from chatq.shared.errors import ChatqError
from chatq.supervisor import cli, render
from chatq.supervisor.cli import main
from chatq.supervisor.control_client import request
from chatq.supervisor.tenant import ExitInfo, State, TenantHandle
from chatq.tenant_worker.messages import Message
from chatq.tenant_worker.store import Store

TWO_TENANTS = """\
[supervisor]
run_dir = "run"
data_dir = "data"
heartbeat_interval_ms = 50
stop_grace = 5.0
backoff_initial = 0.05
watchdog_interval = 0.2

[defaults]
drain_timeout = 1.0

[[tenants]]
id = "acme"

[[tenants]]
id = "globex"
"""
STARTUP_TIMEOUT = 20.0
SETTLE_TIMEOUT = 10.0


def run_cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    """main(argv) in-process: exit code, stdout, stderr."""
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def wait_for(what: str, check: Callable[[], Any], timeout: float = SETTLE_TIMEOUT) -> Any:
    """Poll `check` until it returns something truthy (a ChatqError counts as not yet)."""

    def probe() -> Any:
        with contextlib.suppress(ChatqError):
            return check() or None
        return None

    return sandbox.wait_for(what, probe, timeout)


class Supervisor:
    """`chatq run` as a subprocess in its own session, with its config in `folder`."""

    def __init__(self, folder: Path, text: str = TWO_TENANTS) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        self.folder = folder
        self.config = folder / "tenants.toml"
        self.config.write_text(text)
        self.socket = folder / "run" / "supervisor.sock"
        self.log_path = folder / "supervisor.log"
        with self.log_path.open("wb") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "chatq.supervisor.cli", "run", "--config", str(self.config)],
                cwd=folder,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                start_new_session=True,
                env=_clean_env(),
            )

    def rows(self) -> dict[str, dict[str, Any]]:
        return {row["tenant"]: row for row in request(self.socket, "list", timeout=5.0)}

    def all_running(self) -> dict[str, dict[str, Any]] | None:
        rows = self.rows()
        ok = all(
            r["state"] == "running" and r["last_heartbeat_age_s"] is not None for r in rows.values()
        )
        return rows if ok else None

    def settle(self, timeout: float = SETTLE_TIMEOUT) -> dict[str, dict[str, Any]]:
        """Start what is stopped, then wait until every tenant is running and beating."""
        if self.proc.poll() is not None:
            pytest.fail(f"supervisor exited:\n{self.log_path.read_text()}")
        for tenant, row in wait_for("the control socket", self.rows, timeout).items():
            if row["state"] in ("stopped", "fatal"):
                request(self.socket, "start", tenant=tenant)
        return wait_for("every tenant running", self.all_running, timeout)  # type: ignore[no-any-return]

    def close(self) -> None:
        """Shut down politely; kill the whole tree (workers have their own groups) if slow."""
        try:
            tree = psutil.Process(self.proc.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            tree = []
        with contextlib.suppress(ProcessLookupError):
            self.proc.send_signal(signal.SIGTERM)  # drains the workers, then exits
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=10)
        for child in tree:
            with contextlib.suppress(psutil.NoSuchProcess):
                child.kill()


@contextlib.contextmanager
def _ctrl_c_reaches_children() -> Iterator[None]:
    """Children started inside get SIGINT's default disposition, as a terminal's do.

    A suite run from a background job (`make test &`) inherits SIGINT ignored,
    and an ignored signal stays ignored across exec: the child's Python would
    never raise KeyboardInterrupt. A handled one is reset to the default.
    """
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def _clean_env() -> dict[str, str]:
    """The environment without chatq's overrides, so the config file alone decides."""
    env = sandbox.clean_env()
    env["NO_COLOR"] = "1"
    return env


@pytest.fixture(scope="module")
def shared_sup(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Supervisor]:
    sup = Supervisor(tmp_path_factory.mktemp("sup"))
    try:
        sup.settle(STARTUP_TIMEOUT)
        yield sup
    finally:
        sup.close()


@pytest.fixture
def sup(shared_sup: Supervisor) -> Supervisor:
    """The shared supervisor, with both tenants running (earlier tests may have stopped one)."""
    shared_sup.settle()
    return shared_sup


# -- list and status ------------------------------------------------------------------

SUMMARY_KEYS = {
    "tenant",
    "state",
    "pid",
    "uptime_s",
    "restarts",
    "last_heartbeat_age_s",
    "queued",
    "in_flight",
    "processed",
    "failed",
    "rejected",
    "duplicates",
    "rate_limited",
    "replies_sent",
    "replies_failed",
    "replies_retried",
    "replies_pending",
    "paused",
    "rss_bytes",
    "manual_restarts",
    "stopping",
}
HEADERS = ["TENANT", "STATE", "PID", "UPTIME", "RESTARTS"]
HEADERS += ["BEAT", "QUEUED", "PENDING", "PROCESSED", "FAILED", "RSS"]
DETAIL_KEYS = SUMMARY_KEYS | {
    "enabled",
    "cpu_percent",
    "num_fds",
    "backoff_left_s",
    "last_exit",
    "boot_error",
    "paused_since",
    "busiest",
    "log_tail",
}


def test_list_json_shape(sup: Supervisor, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run_cli(capsys, "--config", str(sup.config), "list", "--json")
    assert (code, err) == (0, "")
    rows = json.loads(out)
    assert [row["tenant"] for row in rows] == ["acme", "globex"]
    for row in rows:
        assert set(row) >= SUMMARY_KEYS
        assert row["state"] == "running"
        assert isinstance(row["pid"], int)


def test_list_table(sup: Supervisor, capsys: pytest.CaptureFixture[str]) -> None:
    # --config after the command works too.
    code, out, err = run_cli(capsys, "list", "--config", str(sup.config))
    assert (code, err) == (0, "")
    header, *lines = out.splitlines()
    assert header.split() == HEADERS
    assert [line.split()[:2] for line in lines] == [["acme", "running"], ["globex", "running"]]
    assert all(len(line) <= 80 for line in out.splitlines())
    assert "\033[" not in out  # not a terminal: no colour
    pids = {str(row["pid"]) for row in sup.rows().values()}
    assert {line.split()[2] for line in lines} == pids


def test_status_json_and_block(sup: Supervisor, capsys: pytest.CaptureFixture[str]) -> None:
    def sized() -> dict[str, Any] | None:  # the first beats may come before the store opens
        code, out, _ = run_cli(capsys, "--config", str(sup.config), "status", "acme", "--json")
        found: dict[str, Any] = json.loads(out)
        return found if code == 0 and found["store_bytes"] > 0 else None

    details = wait_for("a beat with the store's size", sized)
    code = 0
    assert code == 0
    assert set(details) >= DETAIL_KEYS
    assert details["tenant"] == "acme"
    assert any("ready on" in line for line in details["log_tail"])

    code, out, err = run_cli(capsys, "--config", str(sup.config), "status", "acme")
    assert (code, err) == (0, "")
    assert out.startswith("● acme\n")
    assert re.search(r"State: running \(since .*ago\)", out)
    assert f"PID: {details['pid']}" in out
    for label in ("Restarts:", "Last exit:", "Backoff:", "Resources: cpu", "Busiest:"):
        assert label in out
    assert details["store_bytes"] > 0 and details["retention_days"] == 30
    assert re.search(r"Store: [\d.]+[KM], (no messages|oldest message .*) \(kept 30 days\)", out)
    assert "Log (last" in out and "ready on" in out


# -- errors -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "argv",
    [
        ["status", "nope"],
        ["stop", "nope"],
        ["start", "nope"],
        ["restart", "nope"],
        ["send", "nope", "c1", "hi"],
        ["history", "nope"],
    ],
)
def test_unknown_tenant(
    sup: Supervisor, capsys: pytest.CaptureFixture[str], argv: list[str]
) -> None:
    code, out, err = run_cli(capsys, "--config", str(sup.config), *argv)
    assert (code, out, err) == (1, "", "chatq: no such tenant: nope (known: acme, globex)\n")


def test_unknown_tenant_close_to_a_known_one_is_guessed(
    sup: Supervisor, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, err = run_cli(capsys, "--config", str(sup.config), "restart", "acmee")
    assert (code, out, err) == (1, "", "chatq: no such tenant: acmee (did you mean acme?)\n")


def test_no_supervisor(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = tmp_path / "tenants.toml"
    config.write_text(TWO_TENANTS)
    sock = tmp_path / "run" / "supervisor.sock"
    for argv in (["list"], ["status", "acme"], ["restart", "--all"], ["send", "acme", "c", "t"]):
        code, out, err = run_cli(capsys, "--config", str(config), *argv)
        assert (code, out) == (1, "")
        assert err == f"chatq: supervisor is not running (no socket at {sock})\n"


def test_stale_socket_is_told_apart(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = tmp_path / "tenants.toml"
    config.write_text(TWO_TENANTS)
    sock = tmp_path / "run" / "supervisor.sock"
    sock.parent.mkdir()
    dead = socket.socket(socket.AF_UNIX)
    dead.bind(str(sock))  # a socket file nobody listens on: a supervisor SIGKILLed
    dead.close()
    code, out, err = run_cli(capsys, "--config", str(config), "list")
    assert (code, out) == (1, "")
    assert err.startswith(f"chatq: supervisor is not running (stale socket at {sock}: nothing")


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        ([], "chatq: missing command (one of: run, list, status, logs, restart, stop, start,"),
        (["frobnicate"], "chatq: unknown command 'frobnicate' (one of: run, list,"),
        (["lst"], "chatq: unknown command 'lst' (did you mean 'list'?) (see 'chatq -h')"),
        (["status"], "chatq status: the following arguments are required: tenant"),
        (["restart"], "chatq restart: one of the arguments tenant --all is required"),
        (["restart", "acme", "--all"], "chatq restart: argument --all: not allowed with"),
        (["send", "acme", "c1"], "chatq send: the following arguments are required: text"),
        (["send", "acme", "c1", "hello", "world"], "chatq send: unexpected argument 'world'"),
        (["send", "acme", "c1", "hi", "--id", ""], "chatq send: argument --id: must not be empty"),
        (["history", "acme", "--limit", "0"], "chatq history: argument --limit: must be >= 1"),
        (["history", "acme", "--limit", "many"], "chatq history: argument --limit: not a whole"),
        (["list", "--bogus"], "chatq list: unexpected argument '--bogus'"),
        (["stop"], "chatq stop: one of the arguments tenant --all is required"),
        (["start", "acme", "--timeout", "soon"], "chatq start: argument --timeout: not a number"),
        (["reload", "--wait", "--no-wait"], "chatq reload: argument --no-wait: not allowed with"),
        (["logs", "-n", "-1"], "chatq logs: argument -n/--lines: must be 0 to 10000, got -1"),
        (["retry", "acme"], "chatq retry: one of the arguments --message --failed is required"),
        (["resend", "acme", "--reply", "x"], "chatq resend: argument --reply: invalid int value"),
    ],
)
def test_bad_arguments_are_one_line_naming_the_command(
    capsys: pytest.CaptureFixture[str], argv: list[str], expected: str
) -> None:
    code, out, err = run_cli(capsys, *argv)
    assert (code, out) == (2, "")
    assert err.count("\n") == 1 and err.startswith(expected), err


def test_send_with_unquoted_text_says_to_quote_it(capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run_cli(capsys, "send", "acme", "c1", "hello", "world")
    assert (code, err) == (2, "chatq send: unexpected argument 'world' (quote the text)\n")


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run_cli(capsys, "--version")
    assert code == 0 and re.fullmatch(r"chatq \d+\.\d+\.\d+\n", out), out


def test_bad_config(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    broken = tmp_path / "broken.toml"
    broken.write_text("[supervisor\n")
    invalid = tmp_path / "invalid.toml"
    invalid.write_text('[[tenants]]\nid = "acme"\nmax_queue_size = 0\n')
    missing = tmp_path / "missing.toml"
    cases = [
        (broken, ["list"]),  # the short read falls back to the loader's message
        (missing, ["status", "acme"]),
        (invalid, ["reload"]),  # reload checks the whole file before asking
        (invalid, ["history", "acme"]),
    ]
    for path, argv in cases:
        with pytest.raises(ChatqError) as expected:
            load_config(path)
        code, out, err = run_cli(capsys, "--config", str(path), *argv)
        assert (code, out) == (2, "")
        assert err == f"chatq: {expected.value}\n"
        assert err.count("\n") == 1


# -- send and history --------------------------------------------------------------------


def test_send_then_history(sup: Supervisor, capsys: pytest.CaptureFixture[str]) -> None:
    config = str(sup.config)
    code, out, err = run_cli(capsys, "--config", config, "send", "acme", "c-send", "hello there")
    assert (code, err) == (0, "")
    generated = re.fullmatch(r"accepted: message ([0-9a-f]{32}) for acme, chat c-send\n", out)
    assert generated, out

    code, out, _ = run_cli(
        capsys, "--config", config, "send", "acme", "c-send", "2nd", "--id", "m2"
    )
    assert (code, out) == (0, "accepted: message m2 for acme, chat c-send\n")
    code, out, _ = run_cli(
        capsys, "--config", config, "send", "acme", "c-send", "2nd", "--id", "m2", "--json"
    )
    assert code == 0
    assert json.loads(out) == {"id": "m2", "accepted": 0, "duplicates": 1, "rejected": 0}

    def processed() -> list[dict[str, Any]] | None:
        code, out, _ = run_cli(
            capsys, "--config", config, "history", "acme", "--chat", "c-send", "--json"
        )
        entries: list[dict[str, Any]] = json.loads(out)
        done = all(e["status"] == "processed" and e["replies"] for e in entries)
        return entries if code == 0 and len(entries) == 2 and done else None

    entries = wait_for("both messages processed", processed)
    assert [e["id"] for e in entries] == [generated[1], "m2"]
    first = entries[0]
    assert {"id", "chat_id", "text", "status", "received_at", "replies"} <= set(first)
    assert first["replies"][0]["text"] == "hello there"  # the echo handler
    assert first["replies"][0]["status"] in ("pending", "sent")

    code, out, _ = run_cli(capsys, "--config", config, "history", "acme", "--chat", "c-send")
    assert code == 0
    assert "c-send  <- [processed] hello there" in out
    assert "-> [" in out and "] hello there" in out

    code, out, _ = run_cli(capsys, "--config", config, "history", "acme", "--limit", "1", "--json")
    assert [e["id"] for e in json.loads(out)] == ["m2"]


def test_send_duplicate_is_reported(sup: Supervisor, capsys: pytest.CaptureFixture[str]) -> None:
    config = str(sup.config)
    run_cli(capsys, "--config", config, "send", "globex", "c9", "once", "--id", "dup-1")
    code, out, err = run_cli(
        capsys, "--config", config, "send", "globex", "c9", "once", "--id", "dup-1"
    )
    assert (code, err) == (0, "")
    assert out == "duplicate (already accepted): message dup-1 for globex, chat c9\n"


def test_send_refused_by_ingest_is_usage_error(
    sup: Supervisor, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, err = run_cli(capsys, "--config", str(sup.config), "send", "acme", "", "hi")
    assert (code, out) == (2, "")
    assert err == "chatq: tenant acme refused the message: message.chat_id: must not be empty\n"
    long_text = "x" * 5000
    code, _, err = run_cli(capsys, "--config", str(sup.config), "send", "acme", "c1", long_text)
    assert code == 2
    assert "message.text: longer than 4096 characters" in err


async def test_history_with_the_supervisor_down(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = tmp_path / "tenants.toml"
    config.write_text(TWO_TENANTS)
    store = await Store.open(load_config(config).store_path("acme"), "acme")
    try:
        await store.add_messages(
            [Message("m1", "c1", "hi", "acme"), Message("m2", "c2", "yo", "acme")]
        )
        await store.begin_attempt("m1")
        await store.complete("m1", ["hi back"])
    finally:
        await store.close()
    assert not (tmp_path / "run" / "supervisor.sock").exists()

    code, out, err = run_cli(capsys, "--config", str(config), "history", "acme", "--json")
    assert (code, err) == (0, "")
    entries = json.loads(out)
    assert [(e["id"], e["status"]) for e in entries] == [("m1", "processed"), ("m2", "queued")]
    assert entries[0]["replies"][0]["text"] == "hi back"

    code, out, _ = run_cli(capsys, "--config", str(config), "history", "acme", "--chat", "c2")
    assert code == 0
    assert out.endswith("c2  <- [queued] yo\n")

    # A configured tenant that never ran has no store: that is a failure, not a crash.
    code, out, err = run_cli(capsys, "--config", str(config), "history", "globex")
    assert (code, out) == (1, "")
    assert err.startswith("chatq: no store at ") and err.count("\n") == 1


# -- operations ---------------------------------------------------------------------------


def test_restart_changes_only_that_tenants_pid(
    sup: Supervisor, capsys: pytest.CaptureFixture[str]
) -> None:
    before = sup.settle()
    code, out, err = run_cli(capsys, "--config", str(sup.config), "restart", "acme")
    assert (code, out, err) == (0, "restarting acme\ndone: acme running\n", "")
    after = sup.rows()  # waited by default: the new worker is up when the command returns
    assert after["acme"]["state"] == "running" and after["acme"]["stopping"] is False
    assert after["acme"]["pid"] != before["acme"]["pid"]
    assert after["globex"]["pid"] == before["globex"]["pid"]
    assert after["acme"]["restarts"] == before["acme"]["restarts"]  # failures only
    assert after["acme"]["manual_restarts"] == before["acme"]["manual_restarts"] + 1


def test_restart_all(sup: Supervisor, capsys: pytest.CaptureFixture[str]) -> None:
    before = sup.settle()
    code, out, _ = run_cli(capsys, "--config", str(sup.config), "restart", "--all")
    assert (code, out) == (0, "restarting acme, globex\ndone: acme running, globex running\n")
    rows = sup.all_running()
    assert rows and all(rows[t]["pid"] != before[t]["pid"] for t in rows)


def test_restart_all_leaves_a_stopped_tenant_stopped(
    sup: Supervisor, capsys: pytest.CaptureFixture[str]
) -> None:
    config = str(sup.config)
    assert run_cli(capsys, "--config", config, "stop", "globex")[0] == 0
    code, out, _ = run_cli(capsys, "--config", config, "restart", "--all")
    assert (code, out) == (
        0,
        "restarting acme\n"
        "note: globex is stopped, not restarted (`chatq start globex` starts it)\n"
        "done: acme running\n",
    )
    assert sup.rows()["globex"]["state"] == "stopped"


def test_stop_all_and_start_all(sup: Supervisor, capsys: pytest.CaptureFixture[str]) -> None:
    config = str(sup.config)
    code, out, _ = run_cli(capsys, "--config", config, "stop", "--all")
    assert (code, out) == (0, "stopping acme, globex\ndone: acme stopped, globex stopped\n")
    assert {row["state"] for row in sup.rows().values()} == {"stopped"}
    code, out, _ = run_cli(capsys, "--config", config, "start", "--all")
    assert (code, out) == (0, "starting acme, globex\ndone: acme running, globex running\n")
    assert sup.all_running()


def test_no_wait_returns_at_once_and_timeout_names_the_late(
    sup: Supervisor, capsys: pytest.CaptureFixture[str]
) -> None:
    config = str(sup.config)
    before = sup.rows()["acme"]
    code, out, err = run_cli(capsys, "--config", config, "restart", "acme", "--no-wait")
    assert (code, out, err) == (0, "restarting acme\n", "")
    assert sup.rows()["acme"]["stopping"] or sup.rows()["acme"]["pid"] != before["pid"]
    sup.settle()
    code, out, err = run_cli(capsys, "--config", config, "restart", "acme", "--timeout", "0.001")
    assert (code, out) == (1, "restarting acme\n")
    assert re.fullmatch(
        r"chatq: restart: not every tenant got there within 0.001s: acme \(\w+, wanted running\)\n",
        err,
    )
    code, _, err = run_cli(capsys, "--config", config, "stop", "acme", "--timeout", "0")
    assert code == 2 and "--timeout: must be > 0 seconds, got 0" in err
    assert sup.rows()["acme"]["state"] != "stopped"  # a usage error changes nothing


def test_stop_and_start(sup: Supervisor, capsys: pytest.CaptureFixture[str]) -> None:
    config = str(sup.config)
    code, out, _ = run_cli(capsys, "--config", config, "stop", "globex")
    assert (code, out) == (0, "stopping globex\ndone: globex stopped\n")
    rows = sup.rows()
    assert rows["globex"]["last_heartbeat_age_s"] is None  # stopped on purpose: no age to alert on
    assert rows["globex"]["pid"] is None and rows["acme"]["state"] == "running"

    code, out, err = run_cli(capsys, "--config", config, "send", "globex", "c1", "hi")
    assert (code, out) == (1, "")
    assert err.startswith("chatq: tenant globex is stopped, not taking messages (no server at ")

    code, out, _ = run_cli(capsys, "--config", config, "status", "globex")
    assert "State: stopped" in out and "stop requested" in out

    code, out, _ = run_cli(capsys, "--config", config, "stop", "globex")
    assert (code, out) == (0, "note: globex is already stopped\n")

    code, out, _ = run_cli(capsys, "--config", config, "start", "globex")
    assert (code, out) == (0, "starting globex\ndone: globex running\n")
    assert sup.rows()["globex"]["state"] == "running"
    code, out, err = run_cli(capsys, "--config", config, "start", "globex")
    assert (code, out, err) == (0, "note: globex is already running\n", "")


def test_killed_worker_comes_back_with_a_restart_counted(
    sup: Supervisor, capsys: pytest.CaptureFixture[str]
) -> None:
    before = sup.settle()["acme"]
    os.kill(before["pid"], signal.SIGKILL)

    def back() -> Any:
        row = (sup.all_running() or {}).get("acme")
        return row if row and row["pid"] != before["pid"] else None

    after = wait_for("acme back", back)
    assert after["restarts"] == before["restarts"] + 1
    _, out, _ = run_cli(capsys, "--config", str(sup.config), "status", "acme")
    assert "Last exit: killed by SIGKILL (code -9)" in out


def test_reload(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    sup = Supervisor(tmp_path / "reload")
    try:
        before = sup.settle(STARTUP_TIMEOUT)
        config = str(sup.config)
        code, out, _ = run_cli(capsys, "--config", config, "reload")
        assert (code, out) == (
            0,
            "added:     -\nremoved:   -\nchanged:   -\nunchanged: acme, globex\n",
        )

        sup.config.write_text(
            TWO_TENANTS.replace('id = "globex"', 'id = "initech"').replace(
                '[[tenants]]\nid = "acme"', '[[tenants]]\nid = "acme"\nmax_queue_size = 7'
            )
        )
        code, out, _ = run_cli(capsys, "--config", config, "reload", "--json")
        assert code == 0
        assert json.loads(out) == {
            "added": ["initech"],
            "removed": ["globex"],
            "changed": ["acme"],
            "unchanged": [],
        }
        after = wait_for(
            "initech running, acme restarted",
            lambda: (
                (rows := sup.all_running())
                and set(rows) == {"acme", "initech"}
                and rows["acme"]["pid"] != before["acme"]["pid"]
                and rows
            ),
        )
        assert after["initech"]["state"] == "running"

        sup.config.write_text(sup.config.read_text().replace("max_queue_size = 7", ""))
        code, out, _ = run_cli(capsys, "--config", config, "reload")
        assert (code, out) == (  # waited: says which of running or stopped it became
            0,
            "added:     -\nremoved:   -\nchanged:   acme\nunchanged: initech\ndone: acme running\n",
        )
    finally:
        sup.close()


def test_console_script(sup: Supervisor) -> None:
    script = Path(sys.executable).parent / "chatq"
    done = subprocess.run(
        [str(script), "list", "--json", "--config", str(sup.config)],
        capture_output=True,
        text=True,
        timeout=30,
        env=_clean_env(),
        check=False,
    )
    assert (done.returncode, done.stderr) == (0, "")
    assert [row["tenant"] for row in json.loads(done.stdout)] == ["acme", "globex"]
    done = subprocess.run(
        [str(script), "--config", str(sup.config), "status", "nope"],
        capture_output=True,
        text=True,
        timeout=30,
        env=_clean_env(),
        check=False,
    )
    assert (done.returncode, done.stdout) == (1, "")
    assert done.stderr == "chatq: no such tenant: nope (known: acme, globex)\n"


# -- finding the control socket without the full loader -----------------------------------


def test_pydantic_free_copies_match_the_config_package() -> None:
    assert cli.TENANT_ID.pattern == TENANT_ID_PATTERN
    assert cli.DEFAULT_CONFIG_PATH == DEFAULT_CONFIG_PATH


@pytest.mark.parametrize(
    "supervisor_table",
    [
        "",
        "[supervisor]\n",
        '[supervisor]\nrun_dir = "../elsewhere/run"\n',
        '[supervisor]\nrun_dir = "~/r"\n',
    ],
)
def test_short_read_agrees_with_the_loader(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, supervisor_table: str
) -> None:
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    folder = tmp_path / "conf"
    folder.mkdir()
    config = folder / "t.toml"
    config.write_text(supervisor_table + '[[tenants]]\nid = "acme"\n')
    assert cli.control_socket(config) == load_config(config).control_socket
    monkeypatch.chdir(folder)  # a relative --config is relative to the current directory
    assert cli.control_socket(Path("t.toml")) == load_config("t.toml").control_socket


def test_absolute_run_dir(tmp_path: Path) -> None:
    config = tmp_path / "t.toml"
    config.write_text(f'[supervisor]\nrun_dir = "{tmp_path / "abs"}"\n[[tenants]]\nid = "a"\n')
    assert cli.control_socket(config) == tmp_path / "abs" / "supervisor.sock"


def test_config_file_choice(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("CHATQ_CONFIG", raising=False)
    assert cli.config_file(None) == DEFAULT_CONFIG_PATH
    (tmp_path / ".env").write_text("# comment\nCHATQ_CONFIG='from-dotenv.toml'\n")
    assert cli.config_file(None) == Path("from-dotenv.toml")
    monkeypatch.setenv("CHATQ_CONFIG", "from-env.toml")
    assert cli.config_file(None) == Path("from-env.toml")
    assert cli.config_file(Path("given.toml")) == Path("given.toml")


# -- human output (pure functions of the supervisor's answers) ------------------------------

ANSI = re.compile(r"\033\[[0-9;]*m")
NOW = 1_800_000_000.0


class Tty:
    """A stream that says it is a terminal."""

    def isatty(self) -> bool:
        return True


def handle(tmp_path: Path, tenant: str = "acme") -> TenantHandle:
    """A real TenantHandle (never started), so the rendered dicts have the real shape."""
    config_path = tmp_path / "tenants.toml"
    config_path.write_text(TWO_TENANTS)
    config = load_config(config_path)
    return TenantHandle(config, config.tenant(tenant), clock=FakeClock(100.0), wall=lambda: NOW)


@pytest.mark.parametrize(
    ("seconds", "shown"),
    [(None, "-"), (0, "0s"), (59.9, "59s"), (192, "3m12s"), (3900, "1h05m"), (273_600, "3d04h")],
)
def test_human_duration(seconds: float | None, shown: str) -> None:
    assert render.human_duration(seconds) == shown


@pytest.mark.parametrize(
    ("count", "shown"),
    [
        (None, "-"),
        (512, "512B"),
        (12 * 1024, "12K"),
        (41 * 2**20 + 1000, "41M"),
        (int(9.5 * 2**20), "9.5M"),
        (int(1.2 * 2**30), "1.2G"),
        (2000 * 2**30, "2000G"),
    ],
)
def test_human_bytes(count: int | None, shown: str) -> None:
    assert render.human_bytes(count) == shown


def test_human_age() -> None:
    assert [render.human_age(s) for s in (None, 0.123, 9.9, 12.0, 75)] == [
        "-", "0.1s", "9.9s", "12s", "1m15s"
    ]  # fmt: skip


def test_colour_only_on_a_terminal_without_no_color() -> None:
    assert render.use_colour(Tty(), {}) is True  # type: ignore[arg-type]
    assert render.use_colour(Tty(), {"NO_COLOR": ""}) is True  # type: ignore[arg-type]
    assert render.use_colour(Tty(), {"NO_COLOR": "1"}) is False  # type: ignore[arg-type]
    assert render.use_colour(object(), {}) is False  # type: ignore[arg-type]


def test_table_colours_states_and_fits_80_columns(tmp_path: Path) -> None:
    rows = []
    for n, state in enumerate(["running", "starting", "backoff", "stopped", "fatal"]):
        row = handle(tmp_path).summary()
        row.update(tenant=f"tenant-{n}-" + "x" * 40, state=state, pid=4_000_000 + n)
        row.update(uptime_s=86_400 * 12.0, restarts=1234, last_heartbeat_age_s=0.05)
        row.update(queued=99_999, processed=12_345_678, failed=99_999, rss_bytes=41 * 2**20)
        rows.append(row)
    plain = render.tenant_table(rows, colour=False)
    coloured = render.tenant_table(rows, colour=True)
    assert ANSI.sub("", coloured) == plain
    assert all(len(line) <= render.TABLE_WIDTH for line in plain.splitlines())
    assert "…" in plain  # the long ids were shortened to fit
    assert "\033[32mrunning" in coloured and "\033[31mfatal" in coloured
    assert "\033[33mbackoff" in coloured and "\033[2mstopped" in coloured
    line = plain.splitlines()[1]
    assert "4000000" in line and "12345678" in line
    assert plain.splitlines()[0].split() == [
        h for h in HEADERS if h not in ("UPTIME", "FAILED", "RSS")
    ]

    wide = render.tenant_table(rows, width=200)  # a wide terminal: ids whole, every column
    assert wide.splitlines()[0].split() == HEADERS
    assert wide.splitlines()[1].split()[0] == rows[0]["tenant"] and "41M" in wide
    narrow = render.tenant_table(rows, width=60)
    assert all(len(line) <= 60 for line in narrow.splitlines())
    assert {"TENANT", "STATE", "BEAT", "QUEUED", "PENDING"} <= set(narrow.split("\n")[0].split())


def test_table_sizes_the_tenant_column_to_the_longest_id(tmp_path: Path) -> None:
    rows = [handle(tmp_path).summary() for _ in range(2)]
    rows[1]["tenant"] = "globex-international"
    header, first, second = render.tenant_table(rows).splitlines()
    assert second.startswith("globex-international ")  # whole: RSS and UPTIME made room
    assert first.index("stopped") == second.index("stopped") == header.index("STATE") > 20


def test_table_of_a_never_started_tenant(tmp_path: Path) -> None:
    table = render.tenant_table([handle(tmp_path).summary()])
    assert table.splitlines()[1].split() == [
        "acme",
        "stopped",
        "-",
        "-",
        "0",
        "-",
        "0",
        "0",
        "0",
        "0",
        "-",
    ]


def test_status_block_of_a_tenant_in_backoff(tmp_path: Path) -> None:
    tenant = handle(tmp_path)
    tenant.state, tenant.start_at, tenant.restarts = State.BACKOFF, 102.5, 3
    tenant.last_exit = ExitInfo(code=-9, reason="killed by SIGKILL", at=NOW - 75)
    tenant.log_tail.extend(["line one", "line two"])
    block = render.status_block(tenant.details(), colour=False, now=NOW)
    lines = block.splitlines()
    assert lines[0] == "● acme"
    when = time.strftime("%Y-%m-%d %H:%M:%S %z", time.localtime(NOW - 75))
    assert f"State: backoff (since {when}; 1m15s ago)" in block
    assert "Restarts: 3" in block
    assert f"Last exit: killed by SIGKILL (code -9) at {when}" in block
    assert "Backoff: 2.5s left" in block
    assert "Heartbeat: none yet" in block
    assert "Resources: cpu -, fds -, rss -" in block
    assert lines[-3:] == ["Log (last 2 lines):", "line one", "line two"]


def test_status_block_of_a_running_tenant(tmp_path: Path) -> None:
    details = handle(tmp_path).details()
    details.update(state="running", pid=4242, uptime_s=192.0, last_heartbeat_age_s=0.2)
    details.update(cpu_percent=3.25, num_fds=9, rss_bytes=41 * 2**20, queued=4, processed=7)
    details.update(busiest=[["c1", 3], ["c2", 1]], boot_error=None, enabled=False)
    block = render.status_block(details, colour=True, now=NOW)
    assert "\033[32m●\033[0m acme" in block
    assert "State: \033[32mrunning\033[0m (since" in block and "3m12s ago" in block
    assert "PID: 4242" in block
    assert "Enabled: no (in the config)" in block
    assert "Resources: cpu 3.2%, fds 9, rss 41M" in block
    assert "Queue: queued 4, in flight 0" in block
    assert "Messages: processed 7, failed 0" in block
    assert "Busiest: c1 (3), c2 (1)" in block
    assert "Log (" not in block


def test_status_block_says_why_sending_is_paused(tmp_path: Path) -> None:
    details = handle(tmp_path).details()
    details.update(state="running", pid=4242, uptime_s=60.0, replies_sent=12)
    details.update(replies_failed=1, replies_retried=3, rate_limited=2, replies_pending=5)
    assert "Sending:" not in render.status_block(details, now=NOW)
    details.update(paused="190: Error validating access token", paused_since=NOW - 30)
    block = render.status_block(details, now=NOW)
    when = time.strftime("%Y-%m-%d %H:%M:%S %z", time.localtime(NOW - 30))
    assert f"Sending: paused: 190: Error validating access token (since {when});" in block
    assert "Replies: pending 5, sent 12, failed 1, retried 3, rate limited 2" in block


def test_status_block_of_the_gateway_names_its_own_counters(tmp_path: Path) -> None:
    details = handle(tmp_path).details()
    details.update(tenant="gateway", kind="gateway", state="running", pid=4243, in_flight=2)
    details.update(processed=40, duplicates=3, failed=1, rejected=5)
    block = render.status_block(details, now=NOW)
    assert "Webhooks: in flight 2, answered 503 1, refused (4xx) 5" in block
    assert "Forwarded: messages 40, of them duplicates 3" in block
    assert "Replies:" not in block and "Queue:" not in block


def test_history_and_reload_need_no_secret_from_this_shell(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """An operator's shell lacks the service's WA token: reading a store must still work."""
    monkeypatch.delenv("ACME_WA_TOKEN", raising=False)
    config = tmp_path / "tenants.toml"
    config.write_text(
        '[supervisor]\nrun_dir = "run"\ndata_dir = "data"\n'
        '[[tenants]]\nid = "acme"\ntransport = "whatsapp"\n'
        '[tenants.whatsapp]\nphone_number_id = "1"\naccess_token = "env:ACME_WA_TOKEN"\n'
    )
    code, _, err = run_cli(capsys, "--config", str(config), "history", "acme")
    assert (code, err) == (
        1,
        f"chatq: no store at {tmp_path / 'data' / 'acme.sqlite3'} (has tenant acme run yet?)\n",
    )
    code, _, err = run_cli(capsys, "--config", str(config), "reload")
    assert code == 1 and "supervisor is not running" in err  # the file itself passed
    code, _, err = run_cli(capsys, "--config", str(config), "retry", "acme", "--failed")
    assert "ACME_WA_TOKEN" not in err, err


# -- logs ---------------------------------------------------------------------------------


def test_logs_of_one_tenant_and_of_all(sup: Supervisor, capsys: pytest.CaptureFixture[str]) -> None:
    config = str(sup.config)
    code, out, err = run_cli(capsys, "--config", config, "logs", "acme", "-n", "3")
    assert (code, err) == (0, "")
    lines = out.splitlines()
    assert 0 < len(lines) <= 3 and all("[acme pid=" in line for line in lines)

    code, out, _ = run_cli(capsys, "--config", config, "logs", "-n", "200")
    assert code == 0 and "[supervisor pid=" in out and "[globex pid=" in out
    code, out, _ = run_cli(capsys, "--config", config, "logs", "supervisor", "-n", "1")
    assert code == 0 and out.count("\n") == 1 and "[supervisor pid=" in out

    code, out, err = run_cli(capsys, "--config", config, "logs", "acmee")
    assert (code, out, err) == (1, "", "chatq: no such tenant: acmee (did you mean acme?)\n")
    code, _, err = run_cli(capsys, "--config", config, "logs", "-n", "x")
    assert code == 2 and err.startswith("chatq logs: argument -n/--lines: not a whole number")


CLI = (sys.executable, "-m", "chatq.supervisor.cli")


def cli_output(config: str, *argv: str) -> str:
    """The CLI's stdout, run as its own process (exit 0 expected)."""
    done = subprocess.run(
        [*CLI, "--config", config, *argv],
        capture_output=True,
        text=True,
        timeout=30,
        env=_clean_env(),
        check=True,
    )
    return done.stdout


def test_logs_follow_with_json_lines_until_ctrl_c(tmp_path: Path) -> None:
    """A JSON-format supervisor: `logs` renders text, `--json` keeps JSON, -f ends on SIGINT."""
    sup = Supervisor(
        tmp_path / "json", TWO_TENANTS.replace("[defaults]", 'log_format = "json"\n\n[defaults]')
    )
    try:
        sup.settle(STARTUP_TIMEOUT)
        config = str(sup.config)
        as_json = cli_output(config, "logs", "acme", "--json").splitlines()
        assert as_json and all(json.loads(line)["tenant_id"] == "acme" for line in as_json)

        with _ctrl_c_reaches_children():
            follow = subprocess.Popen(
                [*CLI, "--config", config, "logs", "globex", "-f", "-n", "1"],
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
                env=_clean_env(),
            )
        try:
            assert follow.stdout is not None
            first = follow.stdout.readline()  # the last line kept, as text
            assert re.match(
                r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d{3} [+-]\d{4} \w+ +\[globex pid=\d+\] ",
                first,
            )
            request(sup.socket, "restart", tenant="globex")  # new lines: the drain, the start
            later = follow.stdout.readline()
            assert "[globex pid=" in later  # e.g. its worker draining: followed live
            follow.send_signal(signal.SIGINT)
            _, err = follow.communicate(timeout=10)
        finally:
            if follow.poll() is None:
                follow.kill()
                follow.wait()
            for pipe in (follow.stdout, follow.stderr):
                if pipe is not None:
                    pipe.close()
        assert (follow.returncode, err) == (0, "")

        status = cli_output(config, "status", "acme")
        tail = status.split("Log (last", 1)[1].splitlines()[1:]
        assert tail and not any(line.startswith("{") for line in tail)
    finally:
        sup.close()


# -- tidy output --------------------------------------------------------------------------


def test_worker_process_titles_name_their_tenant(sup: Supervisor) -> None:
    """ps and top tell the workers apart (setproctitle)."""
    for tenant, row in sup.rows().items():
        title = " ".join(psutil.Process(row["pid"]).cmdline()).strip()
        assert title == f"chatq worker {tenant}"


def test_last_exit_says_its_code_once(tmp_path: Path) -> None:
    details = handle(tmp_path).details()
    details["last_exit"] = {"code": 3, "reason": "exit code 3", "at": NOW}
    assert "Last exit: exit code 3 at " in render.status_block(details, now=NOW)
    details["last_exit"] = {"code": 0, "reason": "restart requested", "at": NOW}
    assert "Last exit: restart requested (code 0) at " in render.status_block(details, now=NOW)


def test_log_lines_carry_no_python_reprs() -> None:
    from chatq.supervisor.control import describe_request
    from chatq.supervisor.supervisor import changes_text

    changes = {"added": ["initech"], "removed": [], "changed": ["acme"], "unchanged": ["globex"]}
    assert changes_text(changes) == "added initech; changed acme; unchanged globex"
    assert describe_request({"cmd": "restart", "tenant": "acme"}) == 'restart tenant="acme"'
    assert describe_request({"cmd": "list"}) == "list"
