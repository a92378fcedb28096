"""TenantHandle's state machine and the Supervisor's repair steps, without processes.

Spawning is replaced by a fake that hands out fake processes (a pid, an exit
code set by the test) with a real pipe, so frames go through the real reader;
signals are recorded instead of sent; time is a fake clock. Each test drives
one transition or one loop step by hand.
"""

from __future__ import annotations

import contextlib
import io
import itertools
import multiprocessing
import os
import resource
import signal
import subprocess
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import pytest
from fakes import FakeClock
from pydantic import SecretStr

from chatq.config import ChatqConfig, SupervisorSettings, TenantConfig
from chatq.config.settings import GatewaySettings, GatewayWhatsApp, WhatsAppSettings
from chatq.shared import protocol
from chatq.shared.errors import ConfigError, ControlError, NoSuchTenant
from chatq.supervisor import program as program_module
from chatq.supervisor import supervisor as supervisor_module
from chatq.supervisor import tenant as tenant_module
from chatq.supervisor.child_watch import ChildWatch
from chatq.supervisor.commands import COMMANDS
from chatq.supervisor.control import ControlServer
from chatq.supervisor.gateway import handle as gateway_handle_module
from chatq.supervisor.logstream import LogStream
from chatq.supervisor.pipes import FrameReader
from chatq.supervisor.supervisor import Supervisor
from chatq.supervisor.tenant import State, TenantHandle
from chatq.supervisor.watchdog import ProcStats

GRACE = 2.0
HB_TIMEOUT = 0.5
SETTINGS = SupervisorSettings(
    run_dir=Path("/nonexistent/run"),
    data_dir=Path("/nonexistent/data"),
    heartbeat_interval_ms=100,
    heartbeat_timeout_ms=500,
    stop_grace=GRACE,
    backoff_initial=0.1,
    backoff_max=1.0,
    healthy_after=10.0,
    max_restarts=3,
    restart_window=30.0,
    watchdog_interval=1.0,
)


def make_config(*tenants: TenantConfig, **settings: Any) -> ChatqConfig:
    supervisor = SETTINGS.model_copy(update=settings) if settings else SETTINGS
    return ChatqConfig(
        path=Path("/nonexistent/tenants.toml"), supervisor=supervisor, tenants=tenants
    )


_pids = itertools.count(4_000_000)  # above any real pid_max: never a real process


class FakeProcess:
    """What TenantHandle uses of a multiprocessing process."""

    def __init__(self) -> None:
        self.pid = next(_pids)
        self.exitcode: int | None = None
        self.sentinel = -1
        self.closed = False

    def join(self, timeout: float | None = None) -> None:
        pass

    def close(self) -> None:
        self.closed = True


@dataclass
class FakeSpawner:
    """Stands in for spawn_worker: fake processes, real pipes; records signals."""

    processes: list[FakeProcess] = field(default_factory=list)
    worker_ends: dict[int, Connection] = field(default_factory=dict)
    pipes: list[Connection] = field(default_factory=list)
    signals: list[tuple[int, signal.Signals]] = field(default_factory=list)
    fail_with: OSError | None = None

    def spawn(
        self, _ctx: object, _config: ChatqConfig, _tenant: TenantConfig
    ) -> tuple[Any, Connection]:
        if self.fail_with is not None:
            raise self.fail_with
        ours, theirs = multiprocessing.Pipe(duplex=True)
        self.pipes += [ours, theirs]
        process = FakeProcess()
        self.processes.append(process)
        self.worker_ends[process.pid] = theirs
        return process, ours

    def record_signal(self, process: FakeProcess, signum: int) -> None:
        self.signals.append((process.pid, signal.Signals(signum)))

    def sent(self, pid: int | None) -> list[signal.Signals]:
        return [signum for target, signum in self.signals if target == pid]

    def close(self) -> None:
        for conn in self.pipes:
            conn.close()


@pytest.fixture
def spawner(monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeSpawner]:
    fake = FakeSpawner()
    monkeypatch.setattr(tenant_module, "spawn_worker", fake.spawn)
    monkeypatch.setattr(program_module, "_signal", fake.record_signal)
    yield fake
    fake.close()


CTX: Any = None  # the fake spawner ignores the multiprocessing context


def make_handle(clock: FakeClock, tenant_id: str = "acme", **settings: Any) -> TenantHandle:
    config = make_config(TenantConfig(id=tenant_id), **settings)
    return TenantHandle(config, config.tenant(tenant_id), clock=clock, wall=lambda: 1.5e9)


def running_handle(clock: FakeClock, **settings: Any) -> TenantHandle:
    handle = make_handle(clock, **settings)
    handle.start(CTX)
    assert handle.pid is not None
    handle.on_frame(protocol.Ready(pid=handle.pid))
    return handle


def heartbeat(seq: int = 1, *, queued: int = 0, processed: int = 0) -> protocol.Heartbeat:
    return protocol.Heartbeat(
        seq=seq,
        time=0.0,
        queued=queued,
        in_flight=0,
        processed=processed,
        failed=0,
        rejected=0,
        duplicates=0,
        rate_limited=0,
    )


def state_of(handle: TenantHandle) -> State:
    """The state now (a call, so mypy does not carry an earlier narrowing over)."""
    return handle.state


def exit_with(handle: TenantHandle, code: int) -> None:
    """The worker process ends with `code` and the supervisor reaps it."""
    assert isinstance(handle.process, FakeProcess)
    handle.process.exitcode = code
    handle.on_exit()


# -- TenantHandle ------------------------------------------------------------------------


def test_start_then_ready_is_running(spawner: FakeSpawner, clock: FakeClock) -> None:
    handle = make_handle(clock)
    assert handle.state is State.STOPPED and handle.pid is None

    handle.start(CTX)
    assert state_of(handle) is State.STARTING
    assert handle.pid == spawner.processes[0].pid

    clock.advance(0.3)
    handle.on_frame(protocol.Ready(pid=handle.pid))
    handle.on_frame(heartbeat(seq=1, queued=4, processed=9))
    clock.advance(0.2)
    summary = handle.summary()
    assert summary["state"] == "running"
    assert summary["pid"] == handle.pid
    assert summary["uptime_s"] == pytest.approx(0.5)
    assert summary["last_heartbeat_age_s"] == pytest.approx(0.2)
    assert (summary["queued"], summary["processed"], summary["restarts"]) == (4, 9, 0)


def test_log_frames_are_passed_on_and_kept_in_the_tail(
    spawner: FakeSpawner, clock: FakeClock
) -> None:
    handle = running_handle(clock)
    for n in range(program_module.LOG_TAIL + 5):
        assert handle.on_frame(protocol.LogRecord(line=f"line {n}", level="INFO")) == f"line {n}"
    tail = handle.details()["log_tail"]
    assert len(tail) == program_module.LOG_TAIL
    assert tail[-1] == f"line {program_module.LOG_TAIL + 4}"


def test_crash_backs_off_then_restarts(spawner: FakeSpawner, clock: FakeClock) -> None:
    handle = running_handle(clock)
    exit_with(handle, 70)

    assert handle.state is State.BACKOFF
    assert handle.pid is None
    assert handle.restarts == 1
    assert handle.start_at is not None and handle.start_at >= clock.now
    assert handle.last_exit is not None
    assert (handle.last_exit.code, handle.last_exit.reason) == (70, "exit code 70")
    assert handle.policy.failures == 1
    assert spawner.processes[0].closed


def test_backoff_grows_then_too_many_crashes_are_fatal(
    spawner: FakeSpawner, clock: FakeClock
) -> None:
    handle = running_handle(clock)
    delays = []
    for _ in range(SETTINGS.max_restarts):
        exit_with(handle, -signal.SIGKILL)
        assert handle.state is State.BACKOFF and handle.start_at is not None
        delays.append(handle.start_at - clock.now)
        clock.now = handle.start_at
        handle.start(CTX)

    exit_with(handle, -signal.SIGKILL)  # one more within restart_window
    assert handle.state is State.FATAL
    assert handle.restarts == SETTINGS.max_restarts
    assert handle.last_exit is not None and handle.last_exit.reason == "killed by SIGKILL"
    assert delays == sorted(delays) and delays[-1] > delays[0]
    assert all(delay <= SETTINGS.backoff_max * 1.2 for delay in delays)

    handle.revive()  # what `chatq restart` does to a fatal tenant
    handle.stop("restart requested", State.STARTING)
    assert (handle.state, handle.start_at) == (State.BACKOFF, clock.now)
    assert handle.policy.failures == 0


def test_a_healthy_run_resets_the_backoff(spawner: FakeSpawner, clock: FakeClock) -> None:
    handle = running_handle(clock)
    exit_with(handle, 1)
    handle.start(CTX)
    exit_with(handle, 1)
    assert handle.policy.failures == 2
    handle.start(CTX)
    clock.advance(SETTINGS.healthy_after)
    exit_with(handle, 1)
    assert handle.policy.failures == 1


def test_boot_failure_is_fatal_without_a_restart(spawner: FakeSpawner, clock: FakeClock) -> None:
    handle = make_handle(clock)
    handle.start(CTX)
    handle.on_frame(protocol.BootFailed(reason="handler 'x:f': no module named 'x'"))
    exit_with(handle, 3)

    assert handle.state is State.FATAL
    assert handle.restarts == 0
    details = handle.details()
    assert details["boot_error"] == "handler 'x:f': no module named 'x'"
    assert details["last_exit"]["code"] == 3
    assert handle.start_at is None


def test_stop_sends_sigterm_once_then_sigkill_after_grace(
    spawner: FakeSpawner, clock: FakeClock
) -> None:
    handle = running_handle(clock)
    pid = handle.pid

    handle.stop("stop requested", State.STOPPED)
    handle.stop("stop requested", State.STOPPED)
    assert spawner.sent(pid) == [signal.SIGTERM]
    assert handle.kill_at == clock.now + GRACE

    clock.advance(GRACE - 0.01)
    handle.kill_if_overdue()
    assert spawner.sent(pid) == [signal.SIGTERM]
    clock.advance(0.01)
    handle.kill_if_overdue()
    handle.kill_if_overdue()
    assert spawner.sent(pid) == [signal.SIGTERM, signal.SIGKILL]

    exit_with(handle, -signal.SIGKILL)
    assert handle.state is State.STOPPED
    assert handle.restarts == 0 and handle.policy.failures == 0
    assert handle.last_exit is not None
    assert (handle.last_exit.code, handle.last_exit.reason) == (-9, "stop requested")


def test_a_sigkilled_stopping_worker_is_not_hung(spawner: FakeSpawner, clock: FakeClock) -> None:
    """Regression: after SIGKILL the stop must not turn into a hung-restart."""
    handle = running_handle(clock)
    handle.on_frame(heartbeat())
    handle.stop("stop requested", State.STOPPED)
    clock.advance(GRACE)
    handle.kill_if_overdue()
    assert handle.kill_at is None

    clock.advance(HB_TIMEOUT * 10)
    assert not handle.is_hung()
    handle.stop("later reason", State.STOPPED)  # e.g. a second `chatq stop`
    assert spawner.sent(handle.pid) == [signal.SIGTERM, signal.SIGKILL]
    exit_with(handle, -signal.SIGKILL)
    assert handle.state is State.STOPPED
    assert handle.last_exit is not None and handle.last_exit.reason == "stop requested"


def test_silence_past_the_timeout_is_hung_and_counts_as_a_failure(
    spawner: FakeSpawner, clock: FakeClock
) -> None:
    handle = running_handle(clock)
    handle.on_frame(heartbeat())
    clock.advance(HB_TIMEOUT)
    assert not handle.is_hung()
    clock.advance(0.01)
    assert handle.is_hung()

    handle.kill_hung("hung: no heartbeat for 0.5s")
    assert not handle.is_hung()  # being killed
    exit_with(handle, -signal.SIGKILL)
    assert handle.state is State.BACKOFF
    assert handle.policy.failures == 1  # a hang is a failure, unlike an asked restart
    assert handle.last_exit is not None and handle.last_exit.reason.startswith("hung")


def test_a_hung_worker_gets_a_stack_dump_then_sigkill_within_a_second(
    spawner: FakeSpawner, clock: FakeClock
) -> None:
    """A blocked loop cannot drain: no SIGTERM and stop_grace, a dump then SIGKILL."""
    handle = running_handle(clock)
    pid = handle.pid
    handle.on_frame(heartbeat())
    clock.advance(HB_TIMEOUT + 0.01)

    handle.kill_hung("hung: no heartbeat for 0.5s")
    handle.kill_hung("hung: no heartbeat for 0.5s")
    assert spawner.sent(pid) == [signal.SIGUSR1]
    assert handle.summary()["state"] == "hung"
    clock.advance(program_module.HANG_KILL_AFTER)
    handle.kill_if_overdue()
    assert spawner.sent(pid) == [signal.SIGUSR1, signal.SIGKILL]
    assert program_module.HANG_KILL_AFTER < 1.0 < GRACE
    exit_with(handle, -signal.SIGKILL)
    assert handle.summary()["state"] == "backoff"


def test_list_shows_hung_once_beats_are_missed_before_the_kill(
    spawner: FakeSpawner, clock: FakeClock
) -> None:
    handle = running_handle(clock)
    handle.on_frame(heartbeat())
    clock.advance(program_module.LATE_BEATS * 0.1)  # heartbeat_interval_ms=100
    assert handle.summary()["state"] == "running"
    clock.advance(0.01)
    assert handle.summary()["state"] == "hung"
    assert not handle.is_hung()  # shown, not yet killed: the timeout decides that
    handle.on_frame(heartbeat(seq=2))
    assert handle.summary()["state"] == "running"


def test_a_stop_that_hangs_is_killed_fast_and_still_ends_stopped(
    spawner: FakeSpawner, clock: FakeClock
) -> None:
    handle = running_handle(clock)
    pid = handle.pid
    handle.on_frame(heartbeat())
    handle.stop("stop requested", State.STOPPED)
    clock.advance(HB_TIMEOUT + 0.01)
    assert handle.is_hung()  # a draining worker beats; this one does not

    handle.kill_hung("hung: no heartbeat for 0.5s")
    clock.advance(program_module.HANG_KILL_AFTER)
    handle.kill_if_overdue()
    assert spawner.sent(pid) == [signal.SIGTERM, signal.SIGUSR1, signal.SIGKILL]
    exit_with(handle, -signal.SIGKILL)
    assert handle.state is State.STOPPED
    assert handle.last_exit is not None and handle.last_exit.reason == "stop requested"


def test_asked_restart_starts_again_at_once_without_a_failure(
    spawner: FakeSpawner, clock: FakeClock
) -> None:
    handle = running_handle(clock)
    handle.stop("restart requested", State.STARTING)
    exit_with(handle, 0)
    assert (handle.state, handle.start_at) == (State.BACKOFF, clock.now)
    # Counted apart: `restarts` (what alerts watch) counts failures only.
    assert (handle.restarts, handle.manual_restarts) == (0, 1)
    assert handle.summary()["manual_restarts"] == 1
    assert handle.policy.failures == 0


def test_restart_asked_while_stopping_wins(spawner: FakeSpawner, clock: FakeClock) -> None:
    handle = running_handle(clock)
    handle.stop("stop requested", State.STOPPED)
    handle.stop("restart requested", State.STARTING)
    assert spawner.sent(handle.pid) == [signal.SIGTERM]
    exit_with(handle, 0)
    assert handle.state is State.BACKOFF


def test_stop_without_a_process_moves_at_once(spawner: FakeSpawner, clock: FakeClock) -> None:
    handle = running_handle(clock)
    exit_with(handle, 70)
    assert handle.state is State.BACKOFF
    handle.stop("stop requested", State.STOPPED)
    assert (handle.state, handle.start_at) == (State.STOPPED, None)
    handle.stop("restart requested", State.STARTING)
    assert (handle.state, handle.start_at) == (State.BACKOFF, clock.now)
    assert spawner.signals == []


def test_a_failed_spawn_is_a_failure_not_a_crash(spawner: FakeSpawner, clock: FakeClock) -> None:
    handle = make_handle(clock)
    spawner.fail_with = OSError(24, "Too many open files")
    handle.start(CTX)

    assert handle.state is State.BACKOFF
    assert handle.pid is None
    assert handle.last_exit is not None and "Too many open files" in handle.last_exit.reason
    for _ in range(SETTINGS.max_restarts):
        handle.start(CTX)
    assert state_of(handle) is State.FATAL

    spawner.fail_with = None
    handle.revive()
    handle.start(CTX)
    assert state_of(handle) is State.STARTING


def test_no_ready_in_boot_timeout_is_hung(spawner: FakeSpawner, clock: FakeClock) -> None:
    handle = make_handle(clock)
    handle.start(CTX)
    clock.advance(program_module.BOOT_TIMEOUT)
    assert not handle.is_hung()
    clock.advance(0.01)
    assert handle.is_hung()


# -- Supervisor steps ------------------------------------------------------------------------


@dataclass
class SupervisorUnderTest:
    sup: Supervisor
    clock: FakeClock
    spawner: FakeSpawner
    reload_to: list[ChatqConfig | Exception]

    def pid(self, tenant_id: str) -> int | None:
        return self.sup.handle(tenant_id).pid

    def exit(self, tenant_id: str, code: int) -> None:
        """The tenant's worker exits and the loop reaps it."""
        handle = self.sup._handles[tenant_id]
        assert isinstance(handle.process, FakeProcess)
        handle.process.exitcode = code
        self.sup._reap(handle)

    def ready_all(self) -> None:
        for handle in self.sup.handles():
            if handle.pid is not None:
                handle.on_frame(protocol.Ready(pid=handle.pid))


@pytest.fixture
def make_supervisor(
    spawner: FakeSpawner, clock: FakeClock, monkeypatch: pytest.MonkeyPatch
) -> Iterator[Callable[..., SupervisorUnderTest]]:
    made: list[Supervisor] = []
    # A reload that changes log_level must not reconfigure this test process's logging.
    monkeypatch.setattr(supervisor_module, "setup_logging", lambda *_args, **_kwargs: None)

    def make(*tenants: TenantConfig, **settings: Any) -> SupervisorUnderTest:
        config = make_config(*tenants, **settings)
        reload_to: list[ChatqConfig | Exception] = []

        def load() -> ChatqConfig:
            outcome = reload_to.pop(0)
            if isinstance(outcome, Exception):
                raise outcome
            return outcome

        sup = Supervisor(config, load, LogStream(stream=io.StringIO()), clock=clock)
        made.append(sup)
        for tenant in config.tenants:
            sup._add(config, tenant)
        sup._start_due()
        under_test = SupervisorUnderTest(sup, clock, spawner, reload_to)
        under_test.ready_all()
        return under_test

    yield make
    for sup in made:
        os.close(sup._wake_r)
        os.close(sup._wake_w)


def tenants(*ids: str, **keys: Any) -> tuple[TenantConfig, ...]:
    return tuple(TenantConfig(id=tenant_id, **keys) for tenant_id in ids)


def test_start_due_waits_for_the_backoff(make_supervisor: Callable[..., Any]) -> None:
    t: SupervisorUnderTest = make_supervisor(*tenants("a", "b"))
    b_pid = t.pid("b")
    t.exit("a", 70)  # the first crash restarts at once ...
    handle = t.sup.handle("a")
    handle.start(CTX)
    t.exit("a", 70)  # ... a second one backs off
    assert handle.state is State.BACKOFF and handle.start_at is not None
    assert handle.start_at > t.clock.now

    t.sup._start_due()
    assert handle.pid is None
    t.clock.now = handle.start_at
    t.sup._start_due()
    assert state_of(handle) is State.STARTING and handle.pid is not None
    assert t.pid("b") == b_pid


def test_hung_worker_is_dumped_then_killed_and_restarted(
    make_supervisor: Callable[..., Any],
) -> None:
    t: SupervisorUnderTest = make_supervisor(*tenants("a", "b"))
    for handle in t.sup.handles():
        handle.on_frame(heartbeat())
    t.clock.advance(HB_TIMEOUT / 2)
    t.sup.handle("b").on_frame(heartbeat(seq=2))
    t.clock.advance(HB_TIMEOUT / 2 + 0.01)

    a_pid, b_pid = t.pid("a"), t.pid("b")
    t.sup._check_due()
    assert t.spawner.sent(a_pid) == [signal.SIGUSR1]
    assert t.spawner.sent(b_pid) == []

    t.clock.advance(program_module.HANG_KILL_AFTER)
    t.sup._check_due()
    t.sup._check_due()  # regression: must not stop it again under another reason
    assert t.spawner.sent(a_pid) == [signal.SIGUSR1, signal.SIGKILL]
    t.exit("a", -signal.SIGKILL)
    handle = t.sup.handle("a")
    assert handle.state is State.BACKOFF
    assert handle.last_exit is not None and handle.last_exit.reason.startswith("hung")


def test_an_exit_whose_code_is_still_to_come_is_not_called_hung(
    make_supervisor: Callable[..., Any],
) -> None:
    """An exited worker waits (FORKSERVER_REPORT_S at most) for the fork server to
    report its code: not a silent worker to dump and kill, and reaped in the end."""
    t: SupervisorUnderTest = make_supervisor(*tenants("a"))
    handle = t.sup.handle("a")
    handle.on_frame(heartbeat())
    assert isinstance(handle.process, FakeProcess)
    report_r, report_w = os.pipe()  # what the fork server would write the code to
    handle.process.sentinel = report_r
    handle.watch = ChildWatch(os.getpid(), os.pidfd_open(os.getpid()))  # not our child
    try:
        t.clock.advance(HB_TIMEOUT - 0.5)
        t.sup._exited(handle)  # its pidfd fired; the report is not there yet
        assert handle.pid is not None  # still waiting
        t.clock.advance(0.6)  # past its hang deadline, within the report's wait
        t.sup._check_due()
        assert t.spawner.sent(handle.pid) == []
        t.clock.advance(supervisor_module.FORKSERVER_REPORT_S)
        t.sup._process_events([])
        assert handle.pid is None and handle.state is State.BACKOFF
        assert handle.last_exit is not None and handle.last_exit.code is None
    finally:
        os.close(report_w)
        with contextlib.suppress(OSError):
            os.close(report_r)


def test_beats_waiting_in_the_pipe_count_before_a_worker_is_called_hung(
    make_supervisor: Callable[..., Any],
) -> None:
    """Regression: a loop held up (e.g. by a slow control client) judged stale beats."""
    t: SupervisorUnderTest = make_supervisor(*tenants("a"))
    handle = t.sup.handle("a")
    handle.on_frame(heartbeat())
    t.clock.advance(HB_TIMEOUT + 0.01)
    assert handle.pid is not None
    protocol.send(t.spawner.worker_ends[handle.pid], heartbeat(seq=2))  # not read yet

    t.sup._check_due()
    assert t.spawner.signals == []
    assert handle.heartbeat is not None and handle.heartbeat.seq == 2


def test_the_hung_check_works_on_pipes_numbered_past_1023(
    make_supervisor: Callable[..., Any],
) -> None:
    """Regression: select() (FD_SETSIZE 1024) raised for the ~510th tenant's pipe."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < 2048:
        pytest.skip("the file descriptor limit is below 2048")
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, 2048), hard))
    try:
        t: SupervisorUnderTest = make_supervisor(*tenants("a"))
        handle = t.sup.handle("a")
        handle.on_frame(heartbeat())
        assert handle.conn is not None and handle.pid is not None
        high = Connection(os.dup2(handle.conn.fileno(), 1500))
        handle.conn.close()
        handle.conn, handle.reader = high, FrameReader(high)
        t.clock.advance(HB_TIMEOUT + 0.01)  # silent: hung

        try:
            t.sup._check_due()
            assert t.spawner.sent(handle.pid) == [signal.SIGUSR1]
        finally:
            high.close()
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def test_stop_of_a_hung_worker_ends_stopped(make_supervisor: Callable[..., Any]) -> None:
    """Regression: SIGKILL after stop_grace, then the hung check, used to restart it."""
    t: SupervisorUnderTest = make_supervisor(*tenants("a"))
    t.sup.handle("a").on_frame(heartbeat())
    t.sup.stop_tenant("a")
    t.clock.advance(GRACE)  # past heartbeat_timeout too
    t.sup._check_due()
    t.sup._check_due()
    t.sup._watchdog()
    t.exit("a", -signal.SIGKILL)
    t.sup._start_due()
    handle = t.sup.handle("a")
    assert (handle.state, handle.pid) == (State.STOPPED, None)
    assert handle.last_exit is not None and handle.last_exit.reason == "stop requested"


def test_operator_stop_during_a_hung_restart_ends_stopped(
    make_supervisor: Callable[..., Any],
) -> None:
    """Regression: the first reason ("hung") made the exit a failure, so it restarted."""
    t: SupervisorUnderTest = make_supervisor(*tenants("a"))
    t.sup.handle("a").on_frame(heartbeat())
    t.clock.advance(HB_TIMEOUT + 0.01)
    t.sup._check_due()  # a restart is on its way
    t.sup.stop_tenant("a")  # the operator wants it stopped
    t.exit("a", 0)
    t.clock.advance(60)
    t.sup._start_due()
    handle = t.sup.handle("a")
    assert (handle.state, handle.pid) == (State.STOPPED, None)
    assert handle.last_exit is not None and handle.last_exit.reason.startswith("hung")


class FakeSampler:
    def __init__(self, rss_mb: int) -> None:
        self.rss_bytes = rss_mb * 2**20

        self.counted_fds: list[bool] = []  # each sample: whether it listed open files

    def sample(self, pid: int, fds: bool = True) -> ProcStats:
        self.counted_fds.append(fds)
        return ProcStats(
            pid=pid, rss_bytes=self.rss_bytes, cpu_percent=0.0, num_fds=7 if fds else None
        )

    def rss(self, pid: int) -> int:
        return self.rss_bytes

    def forget(self, pid: int) -> None:
        pass


def test_watchdog_restarts_a_worker_over_its_memory_limit(
    make_supervisor: Callable[..., Any],
) -> None:
    t: SupervisorUnderTest = make_supervisor(
        TenantConfig(id="fat", memory_limit_mb=30), TenantConfig(id="lean")
    )
    t.sup._sampler = FakeSampler(rss_mb=64)  # type: ignore[assignment]
    fat, lean = t.pid("fat"), t.pid("lean")

    t.sup._watchdog()
    assert t.spawner.sent(fat) == [signal.SIGTERM]
    assert t.spawner.sent(lean) == []
    assert t.sup.handle("lean").summary()["rss_bytes"] == 64 * 2**20

    t.clock.advance(0.5)
    t.sup._watchdog()  # not due yet
    t.clock.advance(SETTINGS.watchdog_interval)
    t.sup._watchdog()  # due, but fat is already stopping
    t.clock.advance(GRACE)
    t.sup._check_due()
    t.clock.advance(SETTINGS.watchdog_interval)
    t.sup._watchdog()  # regression: after SIGKILL it is still the same stop
    assert t.spawner.sent(fat) == [signal.SIGTERM, signal.SIGKILL]

    t.exit("fat", -signal.SIGKILL)
    details = t.sup.handle("fat").details()
    assert details["state"] == "backoff"
    assert "memory" in details["last_exit"]["reason"]
    assert "memory_limit_mb 30" in details["last_exit"]["reason"]


def test_only_status_lists_a_workers_open_files(make_supervisor: Callable[..., Any]) -> None:
    """The watchdog's rounds listed every worker's /proc/PID/fd (every 30 s, 500 listings
    at 500 tenants) for a count only `status` shows: it counts them itself."""
    t: SupervisorUnderTest = make_supervisor(*tenants("a", "b"))
    sampler = FakeSampler(rss_mb=10)
    t.sup._sampler = sampler  # type: ignore[assignment]
    for _ in range(2 * supervisor_module.FULL_SAMPLE_EVERY):
        t.clock.advance(SETTINGS.watchdog_interval)
        t.sup._watchdog()
    assert sampler.counted_fds and not any(sampler.counted_fds)
    assert t.sup.handle("a").summary()["rss_bytes"] == 10 * 2**20

    status = COMMANDS["status"](t.sup, {"tenant": "a"})
    assert sampler.counted_fds[-1] and status["num_fds"] == 7


def test_reap_reads_a_boot_failed_frame_left_in_the_pipe(
    make_supervisor: Callable[..., Any],
) -> None:
    t: SupervisorUnderTest = make_supervisor(*tenants("a"))
    pid = t.pid("a")
    assert pid is not None
    protocol.send(t.spawner.worker_ends[pid], protocol.BootFailed(reason="store: disk full"))
    t.exit("a", 3)
    handle = t.sup.handle("a")
    assert (handle.state, handle.boot_error) == (State.FATAL, "store: disk full")


def test_reload_applies_the_difference(make_supervisor: Callable[..., Any]) -> None:
    t: SupervisorUnderTest = make_supervisor(*tenants("a", "b", "c"))
    before = {h.id: h.pid for h in t.sup.handles()}
    new = make_config(
        TenantConfig(id="a"), TenantConfig(id="b", max_queue_size=7), TenantConfig(id="d")
    )
    t.reload_to.append(new)

    changes = t.sup.reload()
    assert changes == {"added": ["d"], "removed": ["c"], "changed": ["b"], "unchanged": ["a"]}
    assert t.spawner.sent(before["a"]) == []
    assert t.spawner.sent(before["b"]) == [signal.SIGTERM]
    assert t.spawner.sent(before["c"]) == [signal.SIGTERM]
    assert t.sup.handle("d").state is State.STARTING
    with pytest.raises(NoSuchTenant):
        t.sup.handle("c")  # draining, but no longer a tenant

    t.exit("b", 0)
    t.exit("c", 0)
    t.sup._start_due()
    assert t.sup.handle("b").pid not in (None, before["b"])
    assert t.sup.handle("b").tenant.max_queue_size == 7
    assert "c" not in t.sup._handles
    assert t.sup.config is new


def test_a_changed_fatal_tenant_is_started_again_by_reload(
    make_supervisor: Callable[..., Any],
) -> None:
    t: SupervisorUnderTest = make_supervisor(*tenants("a"))
    handle = t.sup.handle("a")
    handle.on_frame(protocol.BootFailed(reason="handler 'x:f': no module named 'x'"))
    t.exit("a", 3)
    assert handle.state is State.FATAL
    t.reload_to.append(make_config(TenantConfig(id="a", handler="echo", max_queue_size=9)))

    assert t.sup.reload()["changed"] == ["a"]
    t.sup._start_due()
    assert handle.state is State.STARTING and handle.boot_error is None


def test_reload_leaves_an_operator_stopped_tenant_stopped_with_its_new_config(
    make_supervisor: Callable[..., Any],
) -> None:
    t: SupervisorUnderTest = make_supervisor(*tenants("a", "b"))
    t.sup.stop_tenant("a")
    t.exit("a", 0)
    b_pid = t.pid("b")
    # a's own change, and one every worker depends on (its log level)
    t.reload_to.append(
        make_config(TenantConfig(id="a", max_queue_size=9), TenantConfig(id="b"), log_level="DEBUG")
    )

    assert t.sup.reload()["changed"] == ["a", "b"]
    t.exit("b", 0)
    t.clock.advance(60)
    t.sup._start_due()
    a = t.sup.handle("a")
    assert (a.state, a.pid) == (State.STOPPED, None)
    assert t.pid("b") not in (None, b_pid)  # b was running: restarted
    t.sup.start_tenant("a")
    assert a.state is State.STARTING and a.tenant.max_queue_size == 9


def test_reload_during_a_stops_drain_leaves_the_tenant_stopped(
    make_supervisor: Callable[..., Any],
) -> None:
    t: SupervisorUnderTest = make_supervisor(*tenants("a"))
    t.sup.stop_tenant("a")  # draining: still running until it exits
    t.reload_to.append(make_config(TenantConfig(id="a", max_queue_size=9)))
    assert t.sup.reload()["changed"] == ["a"]

    t.exit("a", 0)
    t.clock.advance(60)
    t.sup._start_due()
    handle = t.sup.handle("a")
    assert (handle.state, handle.pid) == (State.STOPPED, None)
    assert handle.tenant.max_queue_size == 9


def test_start_during_a_stops_drain_starts_it_again_once_it_exits(
    make_supervisor: Callable[..., Any],
) -> None:
    t: SupervisorUnderTest = make_supervisor(*tenants("a"))
    first = t.pid("a")
    t.sup.stop_tenant("a")
    t.sup.start_tenant("a")  # not refused as "already running"
    assert t.spawner.sent(first) == [signal.SIGTERM]  # the drain goes on, once

    t.exit("a", 0)
    t.sup._start_due()
    handle = t.sup.handle("a")
    assert handle.state is State.STARTING and handle.pid not in (None, first)
    with pytest.raises(ControlError, match="already starting"):
        t.sup.start_tenant("a")


def test_reload_applies_new_restart_limits_at_once(make_supervisor: Callable[..., Any]) -> None:
    t: SupervisorUnderTest = make_supervisor(*tenants("a"))  # max_restarts=3
    t.reload_to.append(make_config(*tenants("a"), max_restarts=0))
    assert t.sup.reload()["unchanged"] == ["a"]

    t.exit("a", 1)  # a crash: with the old limit, a restart
    handle = t.sup.handle("a")
    assert handle.state is State.FATAL


def test_a_refused_reload_changes_nothing(make_supervisor: Callable[..., Any]) -> None:
    t: SupervisorUnderTest = make_supervisor(*tenants("a", "b"))
    config = t.sup.config
    t.reload_to.append(ConfigError("tenants.toml: tenants[0] (a): max_queue_size: too small"))
    with pytest.raises(ConfigError, match="max_queue_size"):
        t.sup.reload()
    assert t.sup.config is config
    assert t.spawner.signals == []
    assert [h.state for h in t.sup.handles()] == [State.RUNNING, State.RUNNING]


def test_a_tenant_added_back_while_draining_restarts_once_it_exits(
    make_supervisor: Callable[..., Any],
) -> None:
    """Regression: the draining worker was forgotten and a second one started."""
    t: SupervisorUnderTest = make_supervisor(*tenants("a", "b"))
    first = t.pid("b")
    t.reload_to += [make_config(*tenants("a")), make_config(*tenants("a", "b", max_attempts=5))]
    t.sup.reload()  # b removed: draining
    assert t.sup.reload()["added"] == ["b"]  # back before it exited

    handle = t.sup.handle("b")
    assert handle.pid == first  # still the draining one: never two workers for one store
    assert len(t.spawner.processes) == 2
    t.exit("b", 0)
    t.sup._start_due()
    assert handle.state is State.STARTING and handle.pid not in (None, first)
    assert handle.tenant.max_attempts == 5
    assert t.sup._handles["b"] is handle


def test_a_disabled_tenant_is_not_started_by_restart_all(
    make_supervisor: Callable[..., Any],
) -> None:
    t: SupervisorUnderTest = make_supervisor(
        TenantConfig(id="a"), TenantConfig(id="off", enabled=False), TenantConfig(id="gone")
    )
    t.reload_to.append(make_config(TenantConfig(id="a"), TenantConfig(id="off", enabled=False)))
    t.sup.reload()  # "gone" is draining
    assert t.sup.handle("off").state is State.STOPPED

    result = COMMANDS["restart"](t.sup, {"cmd": "restart", "all": True})
    assert result == {"restarting": ["a"], "skipped": []}
    t.exit("a", 0)
    t.sup._start_due()
    assert t.sup.handle("off").state is State.STOPPED
    assert t.sup.handle("a").state is State.STARTING


def test_restart_all_leaves_operator_stopped_tenants_stopped(
    make_supervisor: Callable[..., Any],
) -> None:
    t: SupervisorUnderTest = make_supervisor(*tenants("a", "b", "c"))
    COMMANDS["stop"](t.sup, {"cmd": "stop", "tenant": "b"})  # draining: already "stopped"
    t.sup.stop_tenant("c")
    t.exit("c", 0)

    result = COMMANDS["restart"](t.sup, {"cmd": "restart", "all": True})
    assert result == {"restarting": ["a"], "skipped": ["b", "c"]}
    t.exit("b", 0)
    t.exit("a", 0)
    t.sup._start_due()
    states = {h.id: h.state for h in t.sup.handles()}
    assert states == {"a": State.STARTING, "b": State.STOPPED, "c": State.STOPPED}


def test_stop_and_start_are_idempotent_and_take_all(make_supervisor: Callable[..., Any]) -> None:
    t: SupervisorUnderTest = make_supervisor(*tenants("a", "b"))
    stop, start = COMMANDS["stop"], COMMANDS["start"]
    assert start(t.sup, {"cmd": "start", "all": True}) == {
        "starting": [],
        "already_running": ["a", "b"],
    }
    assert stop(t.sup, {"cmd": "stop", "tenant": "a"}) == {
        "stopping": ["a"],
        "already_stopped": [],
    }
    assert t.sup.handle("a").summary()["stopping"] is True
    t.exit("a", 0)
    assert stop(t.sup, {"cmd": "stop", "all": True}) == {
        "stopping": ["b"],
        "already_stopped": ["a"],
    }
    t.exit("b", 0)
    assert stop(t.sup, {"cmd": "stop", "tenant": "b"}) == {
        "stopping": [],
        "already_stopped": ["b"],
    }
    assert start(t.sup, {"cmd": "start", "all": True}) == {
        "starting": ["a", "b"],
        "already_running": [],
    }
    assert {h.state for h in t.sup.handles()} == {State.STARTING}


def test_start_stop_and_restart_commands(make_supervisor: Callable[..., Any]) -> None:
    t: SupervisorUnderTest = make_supervisor(*tenants("a"))
    with pytest.raises(ControlError, match="already running"):
        t.sup.start_tenant("a")
    t.sup.stop_tenant("a")
    t.exit("a", 0)
    assert t.sup.handle("a").state is State.STOPPED
    t.sup.start_tenant("a")
    assert t.sup.handle("a").state is State.STARTING
    with pytest.raises(NoSuchTenant):
        t.sup.restart("nope")


def test_shutdown_stops_everything_and_starts_nothing(
    make_supervisor: Callable[..., Any],
) -> None:
    t: SupervisorUnderTest = make_supervisor(*tenants("a", "b"))
    t.exit("b", 70)  # b is in backoff
    t.sup.begin_shutdown("SIGTERM received")

    assert t.sup.handle("b").state is State.STOPPED
    assert t.spawner.sent(t.pid("a")) == [signal.SIGTERM]
    with pytest.raises(ControlError, match="shutting down"):
        t.sup._dispatch({"cmd": "restart", "tenant": "a"})
    assert t.sup._dispatch({"cmd": "list"})[0]["tenant"] == "a"

    t.exit("a", 0)
    t.clock.advance(60)
    t.sup._start_due()
    assert [h.state for h in t.sup.handles()] == [State.STOPPED, State.STOPPED]
    assert not any(h.alive for h in t.sup.handles())


# -- the gateway as a program ------------------------------------------------------------


def with_gateway(config: ChatqConfig, secret: str = "s") -> ChatqConfig:
    gateway = GatewaySettings(
        listen="127.0.0.1:8080",
        whatsapp=GatewayWhatsApp(app_secret=SecretStr(secret), verify_token=SecretStr("v")),
    )
    return config.model_copy(update={"gateway": gateway})


def wa_tenant(tenant_id: str, number: str) -> TenantConfig:
    return TenantConfig(
        id=tenant_id,
        whatsapp=WhatsAppSettings(phone_number_id=number, access_token=SecretStr("t")),
    )


def test_reload_adds_keeps_restarts_and_removes_the_gateway(
    make_supervisor: Callable[..., Any], spawner: FakeSpawner, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(
        gateway_handle_module,
        "spawn_gateway",
        lambda ctx, config: spawner.spawn(ctx, config, "gateway"),
    )
    t: SupervisorUnderTest = make_supervisor(wa_tenant("a", "111"))
    plain = make_config(wa_tenant("a", "111"))
    t.reload_to.append(with_gateway(plain))
    assert t.sup.reload()["added"] == ["gateway"]
    gateway = t.sup.handle("gateway")
    assert (
        gateway.summary()["kind"] == "gateway" and t.sup.handle("a").summary()["kind"] == "tenant"
    )
    first = gateway.pid

    t.reload_to.append(with_gateway(plain))
    assert t.sup.reload()["unchanged"] == ["a", "gateway"]
    assert spawner.sent(first) == []

    t.reload_to.append(with_gateway(make_config(wa_tenant("a", "222"))))  # a new number
    assert t.sup.reload()["changed"] == ["a", "gateway"]
    assert spawner.sent(first) == [signal.SIGTERM]
    t.exit("gateway", 0)
    t.sup._start_due()
    assert t.sup.handle("gateway").pid not in (None, first)

    t.reload_to.append(make_config(wa_tenant("a", "222")))
    assert t.sup.reload()["removed"] == ["gateway"]
    with pytest.raises(NoSuchTenant):
        t.sup.handle("gateway")


class NoControl:
    """The control server's part of `_wait_time`: no client waiting."""

    def due_in(self) -> float | None:
        return None


def test_a_fleet_starts_a_few_per_pass_with_few_booting_at_once(
    make_supervisor: Callable[..., Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Regression (issue 15): every tenant was spawned before the loop's first pass, so
    the control socket and heartbeats were dead for the whole start of a large fleet."""
    monkeypatch.setattr(supervisor_module, "STARTS_PER_PASS", 3)
    monkeypatch.setattr(supervisor_module, "MAX_BOOTING", 5)
    t: SupervisorUnderTest = make_supervisor(*tenants(*(f"t{n}" for n in range(12))))
    t.sup.control = NoControl()  # type: ignore[assignment]
    t.sup._next_watchdog = t.clock.now + 60  # no other deadline is near
    spawned = [h for h in t.sup.handles() if h.pid is not None]
    assert len(spawned) == 3  # one pass: a few; they are running (ready_all)
    rows = {row["tenant"]: row for row in COMMANDS["list"](t.sup, {"cmd": "list"})}
    assert [row["state"] for row in rows.values()].count("starting") == 9  # queued: no pid yet
    assert rows["t11"]["pid"] is None
    assert t.sup._wait_time() == 0  # starts are due: the next pass comes at once

    t.sup._start_due()
    t.sup._start_due()  # 3 then 2 more: five booting, the cap
    booting = [h for h in t.sup.handles() if h.booting]
    assert len(booting) == 5
    t.sup._start_due()
    assert len([h for h in t.sup.handles() if h.pid is not None]) == 8
    assert t.sup._wait_time() > 0  # at the cap: no busy loop, a Ready frame wakes it

    for handle in booting[:2]:
        assert handle.pid is not None
        handle.on_frame(protocol.Ready(pid=handle.pid))
    t.sup._start_due()
    assert len([h for h in t.sup.handles() if h.pid is not None]) == 10
    t.ready_all()
    t.sup._start_due()
    assert all(h.pid is not None for h in t.sup.handles())


def test_nothing_is_spawned_until_the_fork_server_says_it_is_ready(
    make_supervisor: Callable[..., Any], tmp_path: Path
) -> None:
    """A spawn before the fork server has preloaded blocks the loop (and `list`) inside
    multiprocessing for ~0.6 s; the loop polls its flag file instead."""
    t: SupervisorUnderTest = make_supervisor()
    t.sup.control = NoControl()  # type: ignore[assignment]
    t.sup._next_watchdog = t.clock.now + 60
    flag = tmp_path / "forkserver.ready"
    t.sup._ready_flag, t.sup._fork_server_up = flag, False
    t.sup._fork_server_wait_end = t.clock.now + supervisor_module.FORK_SERVER_WAIT_S
    t.sup._add(t.sup.config, TenantConfig(id="a"))

    t.sup._start_due()
    assert t.sup.handle("a").pid is None
    assert t.sup._wait_time() == pytest.approx(supervisor_module.FORK_SERVER_POLL_S)  # a poll

    flag.touch()
    t.sup._start_due()
    assert t.sup.handle("a").pid is not None
    assert not flag.exists()


def test_a_fork_server_that_never_says_ready_is_used_after_a_while(
    make_supervisor: Callable[..., Any], tmp_path: Path
) -> None:
    t: SupervisorUnderTest = make_supervisor()
    t.sup._ready_flag, t.sup._fork_server_up = tmp_path / "forkserver.ready", False
    t.sup._fork_server_wait_end = t.clock.now + supervisor_module.FORK_SERVER_WAIT_S
    t.sup._add(t.sup.config, TenantConfig(id="a"))
    t.sup._start_due()
    assert t.sup.handle("a").pid is None
    t.clock.advance(supervisor_module.FORK_SERVER_WAIT_S)
    t.sup._start_due()
    assert t.sup.handle("a").pid is not None


def test_a_watchdog_round_is_spread_over_loop_passes(
    make_supervisor: Callable[..., Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Regression (issue 15): reading 1,000 workers in one pass held `list` up ~2 s."""
    monkeypatch.setattr(supervisor_module, "WATCH_BUDGET_S", 0.0)  # one reading per pass
    t: SupervisorUnderTest = make_supervisor(*tenants("a", "b", "c"))
    t.sup.control = NoControl()  # type: ignore[assignment]
    read: list[str] = []
    monkeypatch.setattr(t.sup, "_read_stats", lambda handle, _full: read.append(handle.id))

    t.sup._watchdog()
    assert read == ["a"]
    assert t.sup._wait_time() == 0  # the rest of the round comes next pass
    t.sup._watchdog()
    t.sup._watchdog()
    t.sup._watchdog()
    assert read == ["a", "b", "c"]
    assert t.sup._wait_time() > 0


def test_passes_that_only_read_beats_skip_the_repair_steps_until_a_deadline(
    make_supervisor: Callable[..., Any], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """An idle fleet's passes cost what they read; a silent worker is still called hung on time."""
    t: SupervisorUnderTest = make_supervisor(*tenants("a", "b"))
    t.sup.control = ControlServer(tmp_path / "c.sock", t.sup._dispatch)
    scans: list[float] = []
    check_due = t.sup._check_due
    monkeypatch.setattr(t.sup, "_check_due", lambda: (scans.append(t.clock.now), check_due()))
    a, b = (t.sup.handle(name) for name in ("a", "b"))
    alive_r, alive_w = os.pipe()  # a sentinel that stays quiet: both workers live on
    for handle in (a, b):
        assert isinstance(handle.process, FakeProcess)
        handle.process.sentinel = alive_r
    try:
        for handle in (a, b):
            assert handle.pid is not None
            protocol.send(t.spawner.worker_ends[handle.pid], heartbeat())
        t.sup.step()  # the first pass builds what it waits on
        assert a.heartbeat is not None and b.heartbeat is not None
        scans.clear()

        t.clock.advance(HB_TIMEOUT / 2)
        assert b.pid is not None
        protocol.send(t.spawner.worker_ends[b.pid], protocol.Beat(seq=2))
        t.sup.step()
        assert b.heartbeat_seq == 2 and scans == []  # only a beat, nothing due: quiet

        t.clock.advance(HB_TIMEOUT / 2 + 0.02)  # a's deadline has passed; b beats on
        protocol.send(t.spawner.worker_ends[b.pid], protocol.Beat(seq=3))
        t.sup.step()
        assert scans == [t.clock.now]
        assert t.spawner.sent(a.pid) == [signal.SIGUSR1]  # hung: stacks, then SIGKILL
        assert t.spawner.sent(b.pid) == []
    finally:
        t.sup.control.close()
        os.close(alive_r)
        os.close(alive_w)


def test_a_ready_frame_at_the_booting_cap_starts_the_next_tenant_in_that_pass(
    make_supervisor: Callable[..., Any], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """A pass that reads only frames is quiet, unless one ends a boot: at the cap, that is
    what lets the next tenant start (found when the quiet passes met the capped starts)."""
    monkeypatch.setattr(supervisor_module, "MAX_BOOTING", 1)
    t: SupervisorUnderTest = make_supervisor(*tenants("a", "b", "c"))
    t.sup.control = ControlServer(tmp_path / "c.sock", t.sup._dispatch)
    t.sup._next_watchdog = t.clock.now + 60
    alive_r, alive_w = os.pipe()  # a sentinel that stays quiet: the workers live on
    a_process = t.sup.handle("a").process
    assert isinstance(a_process, FakeProcess)
    a_process.sentinel = alive_r
    try:
        t.sup.step()  # b is due and one may boot: it is spawned
        b, c = t.sup.handle("b"), t.sup.handle("c")
        assert b.pid is not None and c.pid is None
        for handle in t.sup.handles():
            if isinstance(handle.process, FakeProcess):
                handle.process.sentinel = alive_r
        t.sup.step()  # at the cap: nothing more starts
        assert c.pid is None
        protocol.send(t.spawner.worker_ends[b.pid], protocol.Ready(pid=b.pid))
        t.sup.step()
        assert c.pid is not None
    finally:
        t.sup.control.close()
        os.close(alive_r)
        os.close(alive_w)


def test_a_short_beat_keeps_the_counters_of_the_last_heartbeat(
    spawner: FakeSpawner, clock: FakeClock
) -> None:
    handle = running_handle(clock)
    handle.on_frame(heartbeat(seq=1, queued=4, processed=9))
    clock.advance(0.2)
    handle.on_frame(protocol.Beat(seq=2))
    summary = handle.summary()
    assert summary["last_heartbeat_age_s"] == 0.0
    assert (summary["heartbeat_seq"], summary["queued"], summary["processed"]) == (2, 4, 9)
    clock.advance(HB_TIMEOUT)
    assert not handle.is_hung()
    clock.advance(0.01)
    assert handle.is_hung()


def test_a_pass_looks_only_at_the_workers_whose_deadline_came(
    make_supervisor: Callable[..., Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Regression (issue 15): every pass that was not quiet looked at every handle (hang,
    kill, start, booting), and a fleet's start has thousands of such passes."""
    monkeypatch.setattr(supervisor_module, "STARTS_PER_PASS", 1000)
    monkeypatch.setattr(supervisor_module, "MAX_BOOTING", 1000)
    monkeypatch.setattr(supervisor_module, "START_BUDGET_S", 60.0)
    t: SupervisorUnderTest = make_supervisor(*tenants(*(f"t{n}" for n in range(300))))
    assert all(handle.pid is not None for handle in t.sup.handles())
    t.sup.control = NoControl()  # type: ignore[assignment]
    t.sup._next_watchdog = t.clock.now + 60
    for handle in t.sup.handles():
        handle.on_frame(heartbeat())
    looked_at: list[str] = []
    is_hung = program_module.ProgramHandle.is_hung

    def counted(handle: program_module.ProgramHandle) -> bool:
        looked_at.append(handle.id)
        return is_hung(handle)

    monkeypatch.setattr(program_module.ProgramHandle, "is_hung", counted)
    t.clock.advance(HB_TIMEOUT / 2)
    t.sup._check_due()
    t.sup._start_due()
    assert looked_at == []
    assert t.sup._wait_time() == pytest.approx(HB_TIMEOUT / 2 + supervisor_module.HANG_SLACK)

    for handle in t.sup.handles():  # all beat on, but t7
        if handle.id != "t7":
            handle.on_frame(protocol.Beat(seq=2))
    t.clock.advance(HB_TIMEOUT / 2 + supervisor_module.HANG_SLACK)
    t.sup._check_due()
    assert set(looked_at) == {"t7"}  # twice: before and after reading its pipe
    assert t.spawner.sent(t.pid("t7")) == [signal.SIGUSR1]
    assert t.spawner.signals == [(t.pid("t7"), signal.SIGUSR1)]


def test_a_stop_asked_for_brings_its_sigkill_into_the_wait(
    make_supervisor: Callable[..., Any],
) -> None:
    t: SupervisorUnderTest = make_supervisor(*tenants("a"))  # ready, no heartbeat yet
    t.sup.control = NoControl()  # type: ignore[assignment]
    t.sup._next_watchdog = t.clock.now + 60
    assert t.sup._wait_time() == supervisor_module.MAX_WAIT
    t.sup.stop_tenant("a")
    assert t.sup._wait_time() == pytest.approx(GRACE + supervisor_module.HANG_SLACK)
    t.clock.advance(GRACE)
    t.sup._check_due()
    assert t.spawner.sent(t.pid("a")) == [signal.SIGTERM, signal.SIGKILL]


def test_a_reload_that_shortens_the_heartbeat_timeout_applies_to_running_workers(
    make_supervisor: Callable[..., Any],
) -> None:
    t: SupervisorUnderTest = make_supervisor(*tenants("a"), heartbeat_timeout_ms=5000)
    t.sup.handle("a").on_frame(heartbeat())
    t.reload_to.append(make_config(*tenants("a"), heartbeat_timeout_ms=500))
    assert t.sup.reload()["unchanged"] == ["a"]
    t.clock.advance(0.51)
    t.sup._check_due()
    assert t.spawner.sent(t.pid("a")) == [signal.SIGUSR1]


def test_a_backoff_made_longer_starts_at_its_new_time(
    make_supervisor: Callable[..., Any],
) -> None:
    t: SupervisorUnderTest = make_supervisor(*tenants("a"))
    handle = t.sup.handle("a")
    t.exit("a", 70)  # a first crash: due again at once
    assert handle.state is State.BACKOFF and handle.start_at == t.clock.now
    handle.start_at = t.clock.now + 1.0  # later, as a longer backoff would set it
    t.sup._start_due()
    assert handle.pid is None
    t.clock.advance(1.0)
    t.sup._start_due()
    assert handle.pid is not None


def test_a_fleet_wide_stop_lowers_every_workers_priority_before_signalling(
    make_supervisor: Callable[..., Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Regression (issue 15): each SIGTERM woke a worker that preempted the supervisor,
    so signalling 1,000 workers took ~7 s, the last ones stopping only then."""
    t: SupervisorUnderTest = make_supervisor(*tenants("a", "b", "c"))
    events: list[tuple[str, int | None, int]] = []

    def renice(which: int, who: int, value: int) -> None:
        assert which == os.PRIO_PGRP  # the worker's group: every thread of it
        events.append(("nice", who, value))

    def signal_and_record(process: FakeProcess, signum: int) -> None:
        events.append(("signal", process.pid, signum))
        t.spawner.record_signal(process, signum)

    monkeypatch.setattr(os, "setpriority", renice)
    monkeypatch.setattr(program_module, "_signal", signal_and_record)
    t.sup.begin_shutdown("SIGTERM received")
    pids = [t.pid(name) for name in ("a", "b", "c")]
    assert events == [("nice", pid, program_module.DRAIN_NICE) for pid in pids] + [
        ("signal", pid, signal.SIGTERM) for pid in pids
    ]


def test_draining_behind_us_lowers_a_real_process_groups_priority(clock: FakeClock) -> None:
    child = subprocess.Popen(["sleep", "30"], start_new_session=True)  # leads its own group
    try:
        handle = make_handle(clock)
        process = FakeProcess()
        process.pid = child.pid
        handle.process = process  # type: ignore[assignment]
        handle.drain_behind_us()
        assert os.getpriority(os.PRIO_PROCESS, child.pid) == program_module.DRAIN_NICE
        handle.process = None
        handle.drain_behind_us()  # no process: nothing, no error
    finally:
        child.kill()
        child.wait(10)
