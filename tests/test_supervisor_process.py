"""The supervisor with real processes: crashes, hangs, limits, reloads, shutdown.

Each test starts ``chatq run`` as a subprocess on a config with small
intervals (see tests/supervisor_fixtures.py), acts on it through the control
socket, signals and the tenants' ingest sockets, and polls for the outcome
against a deadline. The harness kills every process it started, whatever
happens.
"""

from __future__ import annotations

import itertools
import json
import os
import resource
import signal
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest
from sandbox import clean_env, wait_for
from supervisor_fixtures import SupervisorHarness, SupervisorRun, alive, gone

from chatq.shared.errors import ConfigError, NoSuchTenant


@pytest.fixture
def harness(tmp_path: Path) -> Iterator[SupervisorHarness]:
    with SupervisorHarness(tmp_path) as harness:
        yield harness


ECHO3: dict[str, dict[str, object]] = {"a": {}, "b": {}, "c": {}}


def test_crashed_worker_is_restarted_quickly(harness: SupervisorHarness) -> None:
    harness.write_config(ECHO3)
    run = harness.start()
    before = run.wait_all_running()

    killed_at = time.monotonic()
    os.kill(before["a"], signal.SIGKILL)
    new_pid = run.wait_running("a", not_pid=before["a"], timeout=5.0)
    took = time.monotonic() - killed_at

    print(f"\nSIGKILL -> new worker running: {took:.3f} s")
    assert took < 2.0
    after = run.pids()
    assert after == {**before, "a": new_pid}
    status = run.status("a")
    assert status["restarts"] == 1
    assert status["last_exit"]["code"] == -signal.SIGKILL
    assert "SIGKILL" in status["last_exit"]["reason"]


def test_crash_loop_backs_off_then_turns_fatal_and_restart_revives(
    harness: SupervisorHarness,
) -> None:
    harness.write_config(
        ECHO3,
        supervisor={
            "backoff_initial": 0.05,
            "backoff_max": 0.2,
            "max_restarts": 3,
            "restart_window": 30.0,
        },
    )
    run = harness.start()
    before = run.wait_all_running()

    pid = before["a"]
    for _ in range(3):  # three crashes: each restarted after a growing backoff
        os.kill(pid, signal.SIGKILL)
        pid = run.wait_running("a", not_pid=pid)
    os.kill(pid, signal.SIGKILL)  # the fourth within the window: give up
    fatal = run.wait_state("a", "fatal")

    assert fatal["pid"] is None
    assert fatal["restarts"] == 3
    assert fatal["last_exit"]["code"] == -signal.SIGKILL
    log = run.log()
    assert log.count("a: worker exited (killed by SIGKILL); restarting in") == 3
    assert "a: worker exited (killed by SIGKILL); too many restarts" in log
    assert {t: p for t, p in run.pids().items() if t != "a"} == {"b": before["b"], "c": before["c"]}
    time.sleep(0.3)  # longer than backoff_max: fatal means no more restarts
    assert run.status("a")["state"] == "fatal"

    assert run.request("restart", tenant="a") == {"restarting": ["a"], "skipped": []}
    revived = run.wait_running("a")
    assert alive(psutil.Process(revived))
    assert run.pids() == {**before, "a": revived}


def test_a_message_that_crashes_the_worker_is_quarantined(harness: SupervisorHarness) -> None:
    harness.write_config(
        {
            "a": {},
            "crashy": {"handler": "chatq.tenant_worker.handlers.demo:crash", "max_attempts": 2},
        }
    )
    run = harness.start()
    before = run.wait_all_running()

    assert run.post("crashy", "crash") == 202
    # Attempt 1 and its replay (attempt 2) kill the worker; the third start quarantines it.
    status = wait_for(
        "crashy running after two crashes",
        lambda: (s := run.status("crashy"))["restarts"] == 2 and s["state"] == "running" and s,
    )
    assert status["last_exit"]["code"] == 70
    assert run.log().count("crashy: worker exited (exit code 70)") == 2
    run.wait_log("quarantined: 2 attempts never finished")  # logged just after Ready
    assert run.post("crashy", "fine", msg_id="m2") == 202
    time.sleep(0.3)
    assert run.tenants()["crashy"]["pid"] == status["pid"]
    assert run.pids()["a"] == before["a"]


def test_boot_failure_is_fatal_at_once_with_the_reason(harness: SupervisorHarness) -> None:
    harness.write_config({"a": {}, "bad": {"handler": "nonexistent.module:f"}})
    run = harness.start(wait_running=False)
    run.wait_running("a")

    status = run.wait_state("bad", "fatal")
    assert status["pid"] is None
    assert "nonexistent" in status["boot_error"]
    assert status["last_exit"]["code"] == 3
    time.sleep(0.5)  # well past backoff_max: a boot failure is not retried
    status = run.status("bad")
    assert (status["state"], status["restarts"]) == ("fatal", 0)
    assert run.log().count("bad: started worker") == 1
    assert "bad: failed to boot" in run.log()


def test_hung_worker_is_killed_and_restarted(harness: SupervisorHarness) -> None:
    harness.write_config(
        {"a": {}, "hang": {"handler": "chatq.tenant_worker.handlers.demo:hang", "max_attempts": 1}},
        supervisor={"heartbeat_interval_ms": 100, "heartbeat_timeout_ms": 500, "stop_grace": 15},
    )
    run = harness.start()
    before = run.wait_all_running()

    assert run.post("hang", "hang") == 202
    hung_at = time.monotonic()
    new_pid = run.wait_running("hang", not_pid=before["hang"], timeout=10.0)
    took = time.monotonic() - hung_at

    # 0.5 s of silence (counted from the last beat, up to 0.1 s before the message),
    # a stack dump, SIGKILL 0.2 s later: not SIGTERM and the 15 s stop_grace.
    assert 0.5 <= took < 5.0
    status = run.status("hang")
    assert status["last_exit"]["code"] == -signal.SIGKILL
    assert status["last_exit"]["reason"].startswith("hung")
    log = run.log()
    assert f"hang: pid {before['hang']} hung: SIGKILL" in log
    assert "hang: hung at: " in log and "in hang" in log  # its stack: the handler's frame
    assert (run.run_dir / "hang.stacks").read_text() == ""  # the new worker's, still empty
    assert run.pids()["a"] == before["a"]
    # The message that hung it is quarantined on replay (max_attempts 1): it stays up.
    time.sleep(0.7)
    assert run.tenants()["hang"]["pid"] == new_pid


def test_a_sigstopped_worker_is_killed_fast_and_serves_again(harness: SupervisorHarness) -> None:
    harness.write_config({"a": {}}, supervisor={"heartbeat_timeout_ms": 500, "stop_grace": 15})
    run = harness.start()
    pid = run.wait_running("a")

    os.kill(pid, signal.SIGSTOP)
    stopped_at = time.monotonic()
    run.wait_running("a", not_pid=pid, timeout=10.0)
    assert time.monotonic() - stopped_at < 3.0
    assert run.post("a", "back") == 202
    assert "a: no stacks dumped" in run.log()


BLOCKING_IMPORT = """
import time

time.sleep(30)  # blocks the worker's loop while it boots


async def reply(message, ctx):
    return message.text
"""


def test_a_handler_import_that_blocks_is_a_hang_after_the_heartbeat_timeout(
    harness: SupervisorHarness,
) -> None:
    harness.write_module("slow_import", BLOCKING_IMPORT)
    harness.write_config(
        {"slow": {"handler": "slow_import:reply"}},
        supervisor={"heartbeat_timeout_ms": 500, "stop_grace": 15},
    )
    run = harness.start(wait_running=False)
    run.wait_log("slow: hung: no heartbeat for 0.5s", timeout=5.0)  # not the 60 s boot timeout
    run.wait_log("slow: pid ", timeout=3.0)
    run.wait_log("hung at: ", timeout=3.0)
    assert "slow_import.py" in run.log()


BLOCK_LOOP = """
import time


async def reply(message, ctx):
    time.sleep(30)  # blocks the worker's loop: neither SIGTERM nor the Stop frame gets acted on
    return message.text
"""


def test_worker_that_will_not_stop_gets_sigkill_after_stop_grace(
    harness: SupervisorHarness,
) -> None:
    harness.write_module("block_loop", BLOCK_LOOP)
    harness.write_config(
        {"a": {}, "stubborn": {"handler": "block_loop:reply"}}, supervisor={"stop_grace": 0.5}
    )
    run = harness.start()
    before = run.wait_all_running()
    worker = psutil.Process(before["stubborn"])
    assert run.post("stubborn", "stuck") == 202
    time.sleep(0.2)  # its handler now holds the loop

    asked_at = time.monotonic()
    run.request("stop", tenant="stubborn")
    status = run.wait_state("stubborn", "stopped")
    took = time.monotonic() - asked_at

    assert 0.45 <= took < 2.5
    assert not alive(worker)
    assert status["last_exit"]["code"] == -signal.SIGKILL
    assert status["restarts"] == 0
    assert f"stubborn: pid {worker.pid} still running 0.5s after SIGTERM: SIGKILL" in run.log()
    time.sleep(0.3)
    assert run.status("stubborn")["state"] == "stopped"  # asked to stop: not restarted
    assert run.pids()["a"] == before["a"]


def test_memory_limit_restarts_the_worker(harness: SupervisorHarness) -> None:
    harness.write_config(
        {"a": {}, "fat": {"memory_limit_mb": 30}}, supervisor={"watchdog_interval": 0.2}
    )
    run = harness.start(wait_running=False)
    first = run.wait_running("a")

    def restarted_for_memory() -> dict[str, object] | None:
        status = run.status("fat")
        exit_info = status["last_exit"]
        return status if exit_info and "memory" in exit_info["reason"] else None

    status = wait_for("a memory restart of fat", restarted_for_memory)
    assert "memory_limit_mb 30" in status["last_exit"]["reason"]  # type: ignore[index]
    assert "fat: memory: rss" in run.log()
    assert run.pids()["a"] == first


def test_stopping_a_hung_worker_leaves_it_stopped(harness: SupervisorHarness) -> None:
    """A fast hang-kill must not turn an asked-for stop into a hung-restart."""
    harness.write_config(
        {"hang": {"handler": "chatq.tenant_worker.handlers.demo:hang", "max_attempts": 1}},
        supervisor={"heartbeat_timeout_ms": 300, "stop_grace": 15},
    )
    run = harness.start()
    pid = run.wait_running("hang")

    assert run.post("hang", "hang") == 202
    time.sleep(0.1)  # let the handler block the loop
    run.request("stop", tenant="hang")
    status = run.wait_state("hang", "stopped", timeout=5.0)

    assert status["last_exit"]["code"] == -signal.SIGKILL
    assert status["last_exit"]["reason"] == "stop requested"
    time.sleep(0.4)
    status = run.status("hang")
    assert (status["state"], status["pid"], status["restarts"]) == ("stopped", None, 0)
    assert f"hang: pid {pid} hung: SIGKILL" in run.log()


@pytest.mark.parametrize("via", ["control", "sighup"])
def test_reload_applies_the_difference_and_refuses_a_bad_file(
    harness: SupervisorHarness, via: str
) -> None:
    harness.write_config(ECHO3)
    run = harness.start()
    before = run.wait_all_running()

    def reload() -> None:
        if via == "control":
            changes = run.request("reload")
            assert changes == {
                "added": ["d"],
                "removed": ["c"],
                "changed": ["b"],
                "unchanged": ["a"],
            }
        else:
            os.kill(run.pid, signal.SIGHUP)

    harness.write_config({"a": {}, "b": {"max_queue_size": 7}, "d": {}})
    reload()
    d_pid = run.wait_running("d")
    b_pid = run.wait_running("b", not_pid=before["b"])
    wait_for("c to be removed", lambda: "c" not in run.tenants())
    assert run.pids() == {"a": before["a"], "b": b_pid, "d": d_pid}
    assert gone(before["c"])
    assert "reloaded: added d; removed c; changed b; unchanged a" in (run.log())

    harness.write_config({"a": {"max_queue_size": 0}, "b": {}})
    if via == "control":
        with pytest.raises(ConfigError, match=r"tenants\[0\] \(a\): max_queue_size"):
            run.request("reload")
    else:
        os.kill(run.pid, signal.SIGHUP)
    log = run.wait_log("reload refused, keeping the running config")
    assert "max_queue_size" in log.split("reload refused", 1)[1].splitlines()[0]
    time.sleep(0.2)
    assert run.pids() == {"a": before["a"], "b": b_pid, "d": d_pid}
    assert all(row["state"] == "running" for row in run.tenants().values())


def test_sigterm_drains_every_worker_and_exits_0(harness: SupervisorHarness) -> None:
    harness.write_config(ECHO3)
    run = harness.start()
    pids = run.wait_all_running()
    helpers = run.worker_processes()  # the workers, the fork server, the resource tracker
    assert set(pids.values()) <= {p.pid for p in helpers}

    os.kill(run.pid, signal.SIGTERM)
    assert run.wait_exit() == 0

    for tenant, pid in pids.items():
        assert not psutil.pid_exists(pid), f"{tenant}'s worker {pid} left behind (or a zombie)"
    wait_for("the fork server to exit", lambda: not any(map(alive, helpers)), 5.0)
    log = run.log()
    assert "shutting down (SIGTERM received)" in log
    assert log.rstrip().endswith("supervisor stopped")
    assert not run.socket.exists()


def test_sigkilled_supervisor_leaves_no_worker_behind(harness: SupervisorHarness) -> None:
    harness.write_config(ECHO3)
    run = harness.start()
    pids = run.wait_all_running()
    workers = [psutil.Process(pid) for pid in pids.values()]

    os.kill(run.pid, signal.SIGKILL)
    run.wait_exit()

    # Each worker sees EOF on its pipe, drains (drain_timeout 0.2) and exits.
    wait_for("orphaned workers to exit", lambda: not any(map(alive, workers)), 5.0)


SPAM = """
import threading
import time

from loguru import logger


def _spam():
    n = 0
    while True:
        n += 1
        logger.info("spam line {}", n)
        time.sleep(0.0005)


threading.Thread(target=_spam, daemon=True).start()


async def reply(message, ctx):
    return message.text
"""


def _spam_lines(log: str, tenant: str) -> int:
    return sum(1 for line in log.splitlines() if f"[{tenant} pid=" in line and "spam line" in line)


def test_heavy_logging_survives_workers_being_killed(harness: SupervisorHarness) -> None:
    harness.write_module("spam", SPAM)
    harness.write_config({"a": {}, "b": {}}, defaults={"handler": "spam:reply"})
    run = harness.start()
    before = run.wait_all_running()

    pid = before["a"]
    counts = [_spam_lines(run.log(), "b")]
    for _ in range(5):
        os.kill(pid, signal.SIGKILL)
        pid = run.wait_running("a", not_pid=pid)
        time.sleep(0.1)
        counts.append(_spam_lines(run.log(), "b"))

    # b kept logging the whole time, through every one of a's deaths.
    assert all(later > earlier for earlier, later in itertools.pairwise(counts)), counts
    wait_for("more lines from b", lambda: _spam_lines(run.log(), "b") > counts[-1] + 50, 5.0)
    assert run.pids()["b"] == before["b"]
    assert run.tenants()["b"]["last_heartbeat_age_s"] < 1.0
    # Whole lines only: every line starts with a timestamp (none were cut into another).
    bad = [line for line in run.log().splitlines() if not line[:4].isdigit()]
    assert not bad, bad[:3]


def test_control_socket_and_stop_start_restart_all(harness: SupervisorHarness) -> None:
    harness.write_config({"a": {}, "b": {}})
    run = harness.start()
    before = run.wait_all_running()

    assert stat.S_IMODE(run.socket.stat().st_mode) == 0o600

    assert run.request("stop", tenant="a") == {"stopping": ["a"], "already_stopped": []}
    stopped = run.wait_state("a", "stopped")
    assert stopped["pid"] is None
    assert stopped["last_exit"]["reason"] == "stop requested"
    assert not psutil.pid_exists(before["a"])
    time.sleep(0.2)
    assert run.status("a")["state"] == "stopped"

    assert run.request("start", tenant="a") == {"starting": ["a"], "already_running": []}
    a_pid = run.wait_running("a", not_pid=before["a"])
    assert run.request("start", tenant="a") == {"starting": [], "already_running": ["a"]}
    assert run.pids()["b"] == before["b"]

    assert run.request("restart", all=True) == {"restarting": ["a", "b"], "skipped": []}
    new_a = run.wait_running("a", not_pid=a_pid)
    new_b = run.wait_running("b", not_pid=before["b"])
    assert run.pids() == {"a": new_a, "b": new_b}
    assert run.status("b")["last_exit"]["reason"] == "restart requested"

    with pytest.raises(NoSuchTenant):
        run.request("status", tenant="nope")


FAILING_LOOP = """
import sys
from pathlib import Path
from chatq.supervisor.cli import main
from chatq.supervisor.supervisor import Supervisor

real_step = Supervisor.step

def step(self):
    if Path("fail-now").exists():
        raise RuntimeError("injected: the main loop failed")
    real_step(self)

if __name__ == "__main__":  # the fork server imports this file too
    Supervisor.step = step
    sys.exit(main())
"""


def test_a_failing_main_loop_stops_its_workers_and_exits(harness: SupervisorHarness) -> None:
    """No worker may run on unsupervised (holding its store) after the supervisor failed."""
    harness.write_config({"a": {}, "b": {}})
    script = harness.tmp_path / "failing_loop.py"
    script.write_text(FAILING_LOOP, encoding="utf-8")
    run = harness.start(main=script)
    workers = [psutil.Process(pid) for pid in run.wait_all_running().values()]

    (harness.tmp_path / "fail-now").touch()
    assert run.wait_exit(timeout=20) != 0
    wait_for("the workers to exit", lambda: not any(map(alive, workers)), 10.0)
    assert "supervisor failed: stopping every worker" in run.log()


def test_a_stop_right_after_a_start_drains_instead_of_being_killed(
    harness: SupervisorHarness,
) -> None:
    """A just-forked worker still ignores SIGTERM; the Stop frame on its pipe reaches it."""
    harness.write_config({"a": {}}, supervisor={"stop_grace": 10.0})
    run = harness.start()
    run.request("stop", tenant="a")
    run.wait_state("a", "stopped")

    run.request("start", tenant="a")
    began = time.monotonic()
    run.request("stop", tenant="a")  # before the new worker has even booted
    run.wait_state("a", "stopped", timeout=9.0)
    assert time.monotonic() - began < 5.0  # not stop_grace's SIGKILL
    assert "SIGKILL" not in run.log()


def test_a_supervised_worker_binds_its_deleted_socket_file_again(
    harness: SupervisorHarness,
) -> None:
    """Checked on every fifth beat's timer (0.5 s here, 5 s at the default beat)."""
    harness.write_config({"a": {}})
    run = harness.start()
    run.wait_all_running()
    sock = run.run_dir / "a.sock"
    sock.unlink()
    wait_for("the socket file back", sock.exists, timeout=5.0)
    assert run.post("a", "hello") == 202
    # Logged once bound again, and carried to the log file by the supervisor:
    # it may land a moment after the post above was answered.
    wait_for("the rebind logged", lambda: "listening again" in run.log(), timeout=5.0)


def test_workers_keep_the_fork_servers_heap_shared(harness: SupervisorHarness) -> None:
    """Guard against copy-on-write of the preloaded heap (e.g. a gc.collect() after fork).

    A worker sharing the fork server's frozen heap holds ~8.5 MB of private
    memory (USS) idle here, ~10 MB after its first message; one that copied the
    inherited heap held ~20 MB more, one that ran the parent's __main__ again
    (multiprocessing's default) ~2.3 MB more.
    """
    harness.write_config(ECHO3)
    run = harness.start()
    pids = run.wait_all_running()
    assert run.post("a", "hello") == 202
    time.sleep(0.5)  # a few heartbeats and the watchdog's first pass: the idle steady state
    uss = {
        tenant: psutil.Process(pid).memory_full_info().uss / 2**20 for tenant, pid in pids.items()
    }
    print(f"\nworker USS MB: {uss}")
    assert max(uss.values()) < 13, uss


def test_a_stderr_nobody_reads_stalls_neither_workers_nor_the_control_socket(
    harness: SupervisorHarness,
) -> None:
    """A stalled journald or `chatq run | less`: log lines are dropped, service goes on."""
    read_fd, write_fd = os.pipe()  # nobody reads read_fd: 64 KiB fill it
    try:
        harness.write_config({"a": {"rate_limit_per_minute": 100_000}})
        run = harness.start(output=write_fd)
        for n in range(2_000):  # every reply is logged at INFO: ~400 bytes a line
            assert run.post("a", f"{n} {'x' * 300}", chat_id=f"c{n % 20}", msg_id=f"m{n}") == 202
        wait_for("all processed", lambda: run.tenants()["a"]["processed"] == 2_000, 20.0)
        assert run.tenants()["a"]["state"] == "running"
    finally:
        os.close(read_fd)
        os.close(write_fd)


def test_a_stopped_supervisor_does_not_stall_its_workers(harness: SupervisorHarness) -> None:
    """SIGSTOP the supervisor: nobody reads the workers' pipes, and they serve on."""
    # At DEBUG the local transport logs every reply (at INFO only a few a second).
    harness.write_config(
        {"a": {"rate_limit_per_minute": 100_000}}, supervisor={"log_level": "DEBUG"}
    )
    run = harness.start()
    os.kill(run.pid, signal.SIGSTOP)
    try:
        for n in range(2_000):  # ~2,000 reply lines: far past the pipe's 64 KiB
            assert run.post("a", f"{n} {'x' * 300}", chat_id=f"c{n % 20}", msg_id=f"m{n}") == 202
    finally:
        os.kill(run.pid, signal.SIGCONT)
    wait_for("all processed", lambda: run.tenants()["a"]["processed"] == 2_000, 20.0)
    wait_for("the dropped lines reported", lambda: "log lines dropped" in run.log(), 10.0)


def run_once(harness: SupervisorHarness, **popen: Any) -> subprocess.CompletedProcess[str]:
    """`chatq run` on the harness's config, expected to refuse at once."""
    return subprocess.run(
        [sys.executable, "-m", "chatq.supervisor.cli", "--config", str(harness.config_path), "run"],
        capture_output=True,
        text=True,
        timeout=30,
        env=clean_env(),
        check=False,
        **popen,
    )


def test_a_second_supervisor_on_the_same_run_dir_refuses_to_start(
    harness: SupervisorHarness,
) -> None:
    harness.write_config({"a": {}})
    run = harness.start()
    pid_before = run.pids()["a"]
    run.socket.unlink()  # even with the control socket gone, the run folder is taken
    second = run_once(harness)
    assert second.returncode == 1
    assert second.stderr == (
        f"chatq: another supervisor (pid {run.pid}) is running on {harness.run_dir}"
        f" (lock {harness.run_dir / 'supervisor.lock'})\n"
    )
    assert psutil.Process(pid_before).is_running()  # the first one's worker untouched


def test_a_symlink_planted_as_the_run_lock_is_refused(harness: SupervisorHarness) -> None:
    harness.write_config({"a": {}})
    victim = harness.tmp_path / "victim"
    victim.write_text("precious\n")
    (harness.run_dir / "supervisor.lock").symlink_to(victim)
    second = run_once(harness)
    assert second.returncode == 1
    assert second.stderr.startswith("chatq: cannot lock the run folder:")
    assert victim.read_text() == "precious\n"


def test_a_run_dir_others_may_write_in_is_refused(harness: SupervisorHarness) -> None:
    harness.write_config({"a": {}})
    harness.run_dir.chmod(0o1777)  # /tmp-style: anyone could plant symlinks there
    refused = run_once(harness)
    assert refused.returncode == 2
    assert refused.stderr == (
        f"chatq: run_dir {harness.run_dir}: writable by group or others (mode 1777);"
        " chmod go-w it\n"
    )
    assert list(harness.run_dir.iterdir()) == []  # nothing created


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to give the folder away")
def test_a_data_dir_owned_by_another_user_is_refused(harness: SupervisorHarness) -> None:
    harness.write_config({"a": {}})
    harness.data_dir.mkdir(mode=0o700)
    os.chown(harness.data_dir, 65534, 65534)
    refused = run_once(harness)
    assert refused.returncode == 2
    assert refused.stderr == (
        f"chatq: data_dir {harness.data_dir}: owned by uid 65534, not by this user (uid 0)\n"
    )


def test_stores_and_logs_are_private_files(harness: SupervisorHarness) -> None:
    log_file = harness.tmp_path / "logs" / "chatq.log"
    harness.write_config({"a": {}}, supervisor={"log_file": log_file})
    run = harness.start()
    assert run.post("a", "hello") == 202
    wait_for("processed", lambda: run.tenants()["a"]["processed"] == 1, 10.0)
    store = harness.data_dir / "a.sqlite3"
    files = [store, store.with_name("a.sqlite3-wal"), store.with_name("a.sqlite3-shm"), log_file]
    files += [store.with_name("a.sqlite3.lock"), harness.run_dir / "supervisor.lock"]
    modes = {file.name: stat.S_IMODE(file.stat().st_mode) for file in files}
    assert modes == dict.fromkeys(modes, 0o600)


def test_the_open_file_limit_is_raised_or_a_fleet_that_cannot_fit_refused(
    harness: SupervisorHarness,
) -> None:
    harness.write_config({f"t{n}": {} for n in range(100)})

    def low_limits() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (64, 256))

    refused = run_once(harness, preexec_fn=low_limits)
    assert refused.returncode == 2
    assert refused.stderr == (
        "chatq: 100 tenants need about 564 open files, but the hard limit is 256"
        " (raise it: LimitNOFILE= in the systemd unit, or ulimit -Hn)\n"
    )


def test_the_soft_open_file_limit_is_raised_to_the_hard_one(harness: SupervisorHarness) -> None:
    harness.write_config({"a": {}})
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (256, hard))  # the supervisor inherits it
    try:
        run = harness.start()
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    assert psutil.Process(run.pid).rlimit(psutil.RLIMIT_NOFILE) == (hard, hard)
    assert psutil.Process(run.pids()["a"]).rlimit(psutil.RLIMIT_NOFILE) == (hard, hard)


def _fork_server(run: SupervisorRun) -> psutil.Process:
    children = psutil.Process(run.pid).children()
    return next(p for p in children if "forkserver" in " ".join(p.cmdline()))


def test_a_dead_fork_server_loses_no_worker(harness: SupervisorHarness) -> None:
    """Killing the fork server must not make live workers look dead (they were all
    "restarted" beside themselves), nor orphan a hung one to pid 1, unkilled."""
    harness.write_config(
        {"a": {}, "hang": {"handler": "chatq.tenant_worker.handlers.demo:hang", "max_attempts": 1}},
        supervisor={"heartbeat_timeout_ms": 500, "stop_grace": 15},
    )
    run = harness.start()
    before = run.wait_all_running()
    assert run.post("hang", "hang") == 202  # hung from now on
    _fork_server(run).kill()

    time.sleep(0.3)
    a = run.status("a")
    assert (a["pid"], a["state"], a["restarts"]) == (before["a"], "running", 0)
    assert run.post("a", "still here", msg_id="m2") == 202
    assert psutil.Process(before["hang"]).ppid() == run.pid  # ours (subreaper), not init's

    # The hung one is still known by pid: killed, reaped, replaced (by a new fork server).
    new_pid = run.wait_running("hang", not_pid=before["hang"], timeout=10.0)
    assert gone(before["hang"])
    assert run.status("hang")["last_exit"]["code"] == -signal.SIGKILL
    assert run.pids()["a"] == before["a"]
    assert alive(psutil.Process(new_pid))
    assert "worker exited (exit code 255)" not in run.log()


def test_the_fork_server_flags_itself_ready(harness: SupervisorHarness) -> None:
    harness.write_config({"a": {}})
    run = harness.start()
    run.wait_all_running(timeout=5.0)  # not FORK_SERVER_WAIT_S (10 s) after a missed flag
    assert not (harness.run_dir / "forkserver.ready").exists()  # seen, and removed


def test_a_spawn_that_kills_the_fork_server_fails_alone(harness: SupervisorHarness) -> None:
    """A fork server out of file descriptors dies on the next spawn request (issue 15:
    EMFILE in recvfds). That spawn fails, and only it: the supervisor and the other
    workers go on, and the retry starts a new fork server."""
    harness.write_config({"a": {}, "b": {}})
    run = harness.start()
    before = run.wait_all_running()
    server = _fork_server(run)
    told = server.environ()["CHATQ_FORKSERVER_LOG"]  # the children's logging, preset there
    open_now = server.num_fds()
    server.rlimit(psutil.RLIMIT_NOFILE, (open_now, open_now))  # no room to accept a request

    run.request("restart", tenant="b")
    wait_for("the fork server to die", lambda: not alive(server), 10.0)
    new_pid = run.wait_running("b", not_pid=before["b"], timeout=15.0)

    assert _fork_server(run).pid != server.pid
    assert _fork_server(run).environ().get("CHATQ_FORKSERVER_LOG") == told  # the new one too
    assert run.pids()["a"] == before["a"]
    assert (run.status("a")["state"], run.status("a")["restarts"]) == ("running", 0)
    assert alive(psutil.Process(new_pid))
    assert "supervisor failed" not in run.log()
    assert run.post("a", "still here") == 202


def test_the_loop_goes_on_while_the_fork_server_has_not_forked(
    harness: SupervisorHarness,
) -> None:
    """A spawn held the loop (and `list`, and every worker's frames) until the fork
    server had forked and answered with the pid; now the pid is read when it comes."""
    harness.write_config({"a": {}, "b": {}})
    run = harness.start()
    before = run.wait_all_running()
    server = _fork_server(run)
    server.suspend()
    try:
        run.request("restart", tenant="b")

        def spawned() -> dict[str, Any] | None:
            row: dict[str, Any] = run.tenants()["b"]
            return row if row["state"] == "starting" and row["pid"] is None else None

        wait_for("b spawned again, its pid not known yet", spawned, 10.0)
        asked = time.monotonic()
        assert run.tenants()["a"]["pid"] == before["a"]
        assert time.monotonic() - asked < 1.0
    finally:
        server.resume()
    new_pid = run.wait_running("b", not_pid=before["b"], timeout=15.0)
    assert alive(psutil.Process(new_pid))
    assert f"b: started worker pid {new_pid}" in run.log()
    assert run.pids()["a"] == before["a"]


def test_exits_the_fork_server_is_slow_to_report_are_waited_for_together(
    harness: SupervisorHarness,
) -> None:
    """A worker's exit code comes from the fork server: the loop waited for it inside
    each reap (1 s at most each), so a fleet's stop, or four crashes with the fork
    server stopped, waited one after the other. Now it waits for them all at once."""
    harness.write_config({name: {} for name in ("a", "b", "c", "d")})
    run = harness.start()
    before = run.wait_all_running()
    server = _fork_server(run)
    server.suspend()
    try:
        killed = time.monotonic()
        for name in before:
            run.kill_worker(name)

        def all_exited() -> bool:
            return all(row["pid"] is None for row in run.tenants().values())

        wait_for("every killed worker reaped", all_exited, 10.0)
        assert time.monotonic() - killed < 2.5  # one report wait (1 s), not four in a row
    finally:
        server.resume()
    for name, pid in before.items():
        run.wait_running(name, not_pid=pid, timeout=15.0)


def chatq(harness: SupervisorHarness, *args: str) -> subprocess.CompletedProcess[str]:
    """The `chatq` command on the harness's config."""
    command = [sys.executable, "-m", "chatq.supervisor.cli", "--config", str(harness.config_path)]
    return subprocess.run(
        [*command, *args], capture_output=True, text=True, timeout=30, env=clean_env(), check=False
    )


def test_reload_names_what_a_removed_tenant_leaves_behind_and_guards_data_dir(
    harness: SupervisorHarness,
) -> None:
    sleepy = {"handler": "chatq.tenant_worker.handlers.demo:sleepy"}
    harness.write_config({"a": {}, "b": sleepy})
    run = harness.start()
    assert run.post("b", "30", msg_id="slow") == 202  # in a handler for 30 s
    assert run.post("b", "0", msg_id="behind") == 202  # queued behind it, same chat

    harness.write_config({"a": {}})
    answer = chatq(harness, "reload")
    assert answer.returncode == 0, answer.stderr
    assert "left behind" in answer.stdout and "b: 2 messages, 0 replies" in answer.stdout
    run.wait_log("reload: unfinished rows stay in")
    history = chatq(harness, "history", "b", "--json")  # removed, still readable
    assert {e["id"] for e in json.loads(history.stdout)} == {"slow", "behind"}

    harness.write_config({"a": {}, "b": sleepy}, supervisor={"data_dir": harness.tmp_path / "new"})
    refused = chatq(harness, "reload")
    assert refused.returncode == 1
    assert "data_dir changes" in refused.stderr and "--force" in refused.stderr
    assert run.request("status", tenant="a")["state"] == "running"  # nothing changed
    forced = chatq(harness, "reload", "--force", "--json")
    assert forced.returncode == 0, forced.stderr
    assert json.loads(forced.stdout)["left_behind"] == {"b": {"messages": 2, "replies": 0}}
