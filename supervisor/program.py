"""One supervised program as the supervisor sees it: its process, state and history.

    starting --Ready--> running --exit--> backoff --delay--> starting
        |                  |                  \\--too many--> fatal
        \\--BootFailed----> fatal             stop --> stopped
                           |
                           \\--silent--> hung (stacks dumped, SIGKILL) --exit--> backoff

A program is a tenant's worker (supervisor/tenant.py) or the gateway
(supervisor/gateway/handle.py): both speak the same pipe protocol, beat from
their event loop and drain on Stop, so one `ProgramHandle` runs either; a
subclass says what to spawn and what the program is called.

A handle holds no loop of its own: the supervisor calls it with what it saw
(a frame, an exit, the time) and it changes state.
"""

from __future__ import annotations

import contextlib
import os
import signal
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum
from multiprocessing.connection import Connection
from multiprocessing.context import ForkServerContext
from multiprocessing.process import BaseProcess
from pathlib import Path
from typing import Any, ClassVar

from loguru import logger

from chatq.config import ChatqConfig
from chatq.shared import protocol, stack_dump
from chatq.supervisor import spawn
from chatq.supervisor.child_watch import FORKSERVER_REPORT_S, ChildWatch, kill_if_ours
from chatq.supervisor.pipes import FrameReader
from chatq.supervisor.policy import RestartPolicy
from chatq.supervisor.watchdog import ProcStats

LOG_TAIL = 20
# Stops the supervisor makes because the worker misbehaved: their exits count
# as failures for the restart policy (backoff, fatal), unlike asked-for stops.
FAILURE_REASONS = ("hung", "memory", "protocol error")
BOOT_TIMEOUT = 60.0  # a worker that has not beaten once by then is hung in boot
# A hung program cannot drain (its loop is blocked): after the stack dump
# (written at once by faulthandler's C handler), this long, then SIGKILL
# instead of SIGTERM and stop_grace.
HANG_KILL_AFTER = 0.2
# `chatq list` shows a program `hung` once it has missed this many beats, while
# the heartbeat timeout (5 beats by default) runs out, not `running`.
LATE_BEATS = 3
DRAIN_NICE = 10  # a worker's nice value while the whole fleet stops: the loop signals first


class State(Enum):
    STARTING = "starting"
    RUNNING = "running"
    BACKOFF = "backoff"
    STOPPED = "stopped"
    FATAL = "fatal"


@dataclass(frozen=True, slots=True)
class ExitInfo:
    """How a worker process ended."""

    code: int | None
    reason: str
    at: float  # wall clock


def describe_exit(code: int | None) -> str:
    if code is None:
        return "unknown"
    if code < 0:
        try:
            name = signal.Signals(-code).name
        except ValueError:  # real-time signals (SIGRTMIN+n) have no name in the enum
            name = f"signal {-code}"
        return f"killed by {name}"
    return f"exit code {code}"


class ProgramHandle:
    """One supervised program's process, restarted per its policy."""

    kind: ClassVar[str]  # "tenant" | "gateway": the `kind` of its `chatq list` row
    noun: ClassVar[str] = "process"  # what its log lines call the process

    def __init__(
        self,
        config: ChatqConfig,
        *,
        clock: Callable[[], float] = time.monotonic,
        wall: Callable[[], float] = time.time,
    ) -> None:
        # Called with this handle whenever a deadline of it may have come nearer
        # (start_at, kill_at, a first heartbeat): the supervisor's timers.
        self.on_change: Callable[[ProgramHandle], None] | None = None
        self.config = config
        self._clock = clock
        self._wall = wall
        self.policy = RestartPolicy(*_limits(config), clock=clock)
        self.state = State.STOPPED
        self.process: BaseProcess | None = None
        self.watch: ChildWatch | None = None  # its pidfd: exits seen without the fork server
        self.conn: Connection | None = None
        self.reader: FrameReader | None = None
        self.started_at = 0.0
        self.restarts = 0  # after failures (crash, hang, memory): what alerts watch
        self.manual_restarts = 0  # asked for: `chatq restart`, a reload's config change
        self._heartbeat: protocol.Heartbeat | None = None
        self.heartbeat_at = 0.0
        self.heartbeat_seq = 0  # of the last beat, full or short
        self.last_exit: ExitInfo | None = None
        self.boot_error: str | None = None
        self._start_at: float | None = None
        self._kill_at: float | None = None
        self.stopping_reason: str | None = None
        self.after_exit: State | None = None  # what an asked-for exit leads to
        self.hung = False  # being killed for a hang: stacks dumped, SIGKILL due
        self.proc_stats: ProcStats | None = None
        self.log_tail: deque[str] = deque(maxlen=LOG_TAIL)

    # -- what the supervisor's timers follow ---------------------------------

    @property
    def start_at(self) -> float | None:
        """When a queued or backed-off start is due."""
        return self._start_at

    @start_at.setter
    def start_at(self, value: float | None) -> None:
        self._start_at = value
        self._changed()

    @property
    def kill_at(self) -> float | None:
        """When a stopping worker gets SIGKILL."""
        return self._kill_at

    @kill_at.setter
    def kill_at(self, value: float | None) -> None:
        self._kill_at = value
        self._changed()

    @property
    def heartbeat(self) -> protocol.Heartbeat | None:
        """The last full heartbeat (None until the first; the hang timeout starts with it)."""
        return self._heartbeat

    @heartbeat.setter
    def heartbeat(self, value: protocol.Heartbeat | None) -> None:
        first = value is not None and self._heartbeat is None
        self._heartbeat = value
        if first:
            self._changed()

    def _changed(self) -> None:
        if self.on_change is not None:
            self.on_change(self)

    def check_at(self) -> float | None:
        """When it next needs looking at: its SIGKILL, or when it turns hung if silent."""
        if self.process is None:
            return None
        kill_at = self._kill_at
        hang_at = self.hang_at()
        if kill_at is None or (hang_at is not None and hang_at < kill_at):
            return hang_at
        return kill_at

    def hang_at(self) -> float | None:
        """When `is_hung` turns true if no beat comes first (None: it cannot)."""
        if self.process is None or self.hung:
            return None
        if self.stopping_reason is not None and self._kill_at is None:
            return None  # already SIGKILLed: its exit decides
        if self._heartbeat is not None:
            return self.heartbeat_at + self.config.supervisor.heartbeat_timeout_s
        return self.heartbeat_at + BOOT_TIMEOUT

    @property
    def id(self) -> str:
        """Its name: the tenant id, or "gateway"."""
        raise NotImplementedError

    @property
    def enabled(self) -> bool:
        """Whether the config wants it running."""
        raise NotImplementedError

    @property
    def memory_limit_mb(self) -> int | None:
        """RSS over which the watchdog restarts it."""
        raise NotImplementedError

    def spawn(self, ctx: ForkServerContext) -> tuple[BaseProcess, Connection]:
        """Start its process; return it and the supervisor's end of its pipe."""
        raise NotImplementedError

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process is not None else None

    @property
    def sentinel(self) -> int:
        """Readable once its process has exited (the pidfd; else multiprocessing's sentinel)."""
        assert self.process is not None
        return self.watch.fd if self.watch is not None else self.process.sentinel

    @property
    def stopping_for_good(self) -> bool:
        """A stop under way that ends in ``stopped`` (not a restart)."""
        return self.process is not None and self.after_exit is State.STOPPED

    def use_config(self, config: ChatqConfig) -> None:
        """A reloaded config: restart limits apply now, the rest at the next start."""
        self.config = config
        self.policy.set_limits(*_limits(config))

    @property
    def alive(self) -> bool:
        return self.process is not None

    @property
    def booting(self) -> bool:
        """Spawned and not ready yet."""
        return self.process is not None and self.state is State.STARTING

    def due(self, now: float) -> bool:
        """No process, and a queued or backed-off start whose time has come."""
        waiting = self.state in (State.STARTING, State.BACKOFF) and self.process is None
        return waiting and self.start_at is not None and self.start_at <= now

    # -- transitions --------------------------------------------------------

    def queue_start(self) -> None:
        """`starting` now, spawned by the supervisor's loop in a coming pass (`due`)."""
        self.state = State.STARTING
        self.start_at = self._clock()

    def start(self, ctx: ForkServerContext) -> None:
        """Spawn the worker now (a spawn that fails counts as a failed run).

        The fork server forks it a moment later: until `take_pid`, its pid is
        unknown (`pid_pending`), and the supervisor waits on `pid_pipe`.
        """
        try:
            self.process, self.conn = self.spawn(ctx)
        except (OSError, EOFError) as exc:
            # Out of file descriptors or processes, or the fork server died
            # half-way (EOFError): retry later, keep the rest up. The next
            # spawn starts a new fork server if this one is gone.
            self.policy.on_start()
            self._spawn_failed(exc)
            return
        self.reader = FrameReader(self.conn)
        now = self._clock()
        self.state = State.STARTING
        self.started_at = now
        self.heartbeat = None
        self.heartbeat_at = now
        self.start_at = self.kill_at = self.stopping_reason = self.after_exit = None
        self.boot_error = None
        self.hung = False
        self.policy.on_start()
        if not self.pid_pending:
            self._forked()

    @property
    def pid_pending(self) -> bool:
        """Spawned, and the fork server's answer (the pid) not read yet."""
        return self.process is not None and spawn.pid_pending(self.process)

    @property
    def pid_pipe(self) -> int:
        """Readable once the fork server has answered a spawn (`take_pid`)."""
        assert self.process is not None
        return self.process.sentinel

    def take_pid(self) -> None:
        """Read the pid the fork server answered with (`pid_pipe` is readable).

        EOFError (or OSError): it died before forking; call `spawn_failed`
        then, once nothing waits on the pipes any more.
        """
        assert self.process is not None
        spawn.take_pid(self.process)
        self._forked()

    def _forked(self) -> None:
        assert self.process is not None
        self.watch = ChildWatch.open(self.pid)
        logger.info("{}: started {} pid {}", self.id, self.noun, self.pid)
        if self.stopping_reason is not None:  # stopped while its pid was unknown: signal it now
            overdue = self._kill_at is None or self.hung
            _signal(self.process, signal.SIGKILL if overdue else signal.SIGTERM)

    def spawn_failed(self, exc: BaseException) -> None:
        """The fork server died before it forked this spawn: a failed run, retried."""
        if self.process is not None:
            with contextlib.suppress(ValueError):
                self.process.close()
        if self.conn is not None:
            self.conn.close()
        self.process = self.conn = self.reader = None
        self._spawn_failed(exc)

    def _spawn_failed(self, exc: BaseException) -> None:
        logger.error("{}: cannot start a {}: {}", self.id, self.noun, exc)
        self.start_at = self.kill_at = self.stopping_reason = self.after_exit = None
        self.boot_error = None
        self.last_exit = ExitInfo(code=None, reason=f"spawn failed: {exc}", at=self._wall())
        self._after_failure(None, self.last_exit.reason)

    def on_frame(self, frame: protocol.Frame) -> str | None:
        """Take in a frame from the worker; returns a log line to pass on, if any."""
        if isinstance(frame, protocol.LogRecord):
            self.log_tail.append(frame.line)
            return frame.line
        if isinstance(frame, protocol.Beat):  # counters as in the last Heartbeat
            self.on_beat(frame.seq)
        elif isinstance(frame, protocol.Heartbeat):
            self.heartbeat, self.heartbeat_at = frame, self._clock()
            self.heartbeat_seq = frame.seq
        elif isinstance(frame, protocol.Ready):
            if self.state is State.STARTING:
                self.state = State.RUNNING
            self.heartbeat_at = self._clock()
        elif isinstance(frame, protocol.BootFailed):
            self.boot_error = frame.reason
        return None

    def on_beat(self, seq: int) -> None:
        """A `Beat` (an idle worker's every second): alive, counters unchanged."""
        self.heartbeat_at, self.heartbeat_seq = self._clock(), seq

    def stop(self, reason: str, then: State) -> None:
        """Ask the worker to drain and exit (SIGTERM), SIGKILL after stop_grace.

        ``then`` is the state once it has exited (stopped, or starting again
        for a restart). A tenant without a process moves there at once.
        """
        if self.process is None:
            self.start_at = None
            self.state = then if then is not State.STARTING else State.BACKOFF
            if then is State.STARTING:
                self.start_at = self._clock()
            return
        self.after_exit = then
        # Once per stop: after SIGKILL `kill_at` is None again, but the first
        # reason (e.g. "stop requested") must survive until the exit.
        if self.stopping_reason is None:
            self.stopping_reason = reason
            self.kill_at = self._clock() + self.config.supervisor.stop_grace
            logger.info("{}: stopping pid {} ({})", self.id, self.pid, reason)
            _signal(self.process, signal.SIGTERM)
            self._send_stop(reason)

    def drain_behind_us(self) -> None:
        """Lower its CPU priority (nice DRAIN_NICE, all its threads) for a fleet-wide stop.

        Each SIGTERM wakes a worker that then preempts the supervisor: stopping
        1,000 workers, the loop that signals them took ~7 s, the last one
        signalled only then. A worker not yet in its own process group (forked a
        moment ago) is left as it is.
        """
        pid = self.pid
        if pid is not None:
            with contextlib.suppress(OSError):  # gone, or no group of its own yet
                os.setpriority(os.PRIO_PGRP, pid, DRAIN_NICE)

    def _send_stop(self, reason: str) -> None:
        """The same request by pipe: a worker forked a moment ago still ignores
        SIGTERM (inherited from the fork server) but reads this once it is up."""
        if self.conn is not None:
            with contextlib.suppress(OSError, ValueError):
                protocol.send(self.conn, protocol.Stop(reason=reason))

    def abandon(self) -> None:
        """The supervisor is failing: close the pipe (the worker drains on EOF) and SIGTERM."""
        if self.conn is not None:
            with contextlib.suppress(OSError):
                self.conn.close()
            self.conn = self.reader = None
        if self.process is not None:
            _signal(self.process, signal.SIGTERM)

    def reap_or_kill(self, within: float) -> None:
        """Wait up to ``within`` s for the process to exit, then SIGKILL it."""
        if self.process is None:
            return
        self.process.join(within)
        if self.process.exitcode is None:
            _signal(self.process, signal.SIGKILL)
            self.process.join(5.0)

    def kill_if_overdue(self) -> None:
        if self.process is None or self.kill_at is None or self._clock() < self.kill_at:
            return
        if self.hung:
            logger.warning("{}: pid {} hung: SIGKILL", self.id, self.pid)
        else:
            logger.warning(
                "{}: pid {} still running {}s after SIGTERM: SIGKILL",
                self.id,
                self.pid,
                self.config.supervisor.stop_grace,
            )
        _signal(self.process, signal.SIGKILL)
        self.kill_at = None  # once is enough; the sentinel reports the exit

    def is_hung(self) -> bool:
        """Silent for heartbeat_timeout since its last beat (or no beat at all in time).

        Workers beat from the start of their loop, before they import the
        handler, through boot and replay; a draining one beats too, so a
        stop does not hide a hang.
        """
        if self.process is None or self.hung:
            return False
        if self.stopping_reason is not None and self._kill_at is None:
            return False  # already SIGKILLed: its exit decides
        silent = self._clock() - self.heartbeat_at
        if self._heartbeat is not None:
            return silent > self.config.supervisor.heartbeat_timeout_s
        return silent > BOOT_TIMEOUT

    def kill_hung(self, reason: str) -> None:
        """Dump a hung program's stacks, then SIGKILL it HANG_KILL_AFTER s later.

        A blocked loop cannot drain, so SIGTERM and stop_grace would only
        keep the tenant down longer. An asked-for stop under way keeps its
        reason (and ends in its state); otherwise it restarts, as a failure.
        """
        if self.process is None or self.hung:
            return
        if self.stopping_reason is None:
            self.stopping_reason, self.after_exit = reason, State.STARTING
        self.hung = True
        self.kill_at = self._clock() + HANG_KILL_AFTER
        logger.error("{}: {}: dumping its stacks, then SIGKILL", self.id, reason)
        _signal(self.process, stack_dump.DUMP_SIGNAL)

    @property
    def stacks_path(self) -> Path:
        """Where its process dumps its stacks when told it is hung."""
        return stack_dump.stacks_path(self.config.supervisor.run_dir, self.id)

    @property
    def exit_unreported(self) -> bool:
        """Exited (its pidfd said so), and the fork server has not written its exit code
        yet (to `pid_pipe`, which turns readable then, or when the fork server dies)."""
        return (
            self.watch is not None
            and self.process is not None
            and not spawn.readable(self.process.sentinel)
        )

    def on_exit(self, wait_report: float = FORKSERVER_REPORT_S) -> None:
        """The process ended: record why, and decide what comes next.

        `wait_report`: how long to wait for the fork server to report its exit code.
        """
        assert self.process is not None
        code = self._exit_code(self.process, wait_report)
        with contextlib.suppress(ValueError):  # the fork server is gone: it never reported
            self.process.close()
        if self.conn is not None:
            self.conn.close()
        self.process, self.conn, self.reader = None, None, None
        self.proc_stats = None
        self._log_stacks()
        reason = self.stopping_reason or describe_exit(code)
        self.last_exit = ExitInfo(code=code, reason=reason, at=self._wall())
        asked = self.after_exit
        self.kill_at = self.stopping_reason = self.after_exit = None
        # An operator's stop wins even over a failure-stop already under way.
        if asked is State.STOPPED or (asked is not None and not reason.startswith(FAILURE_REASONS)):
            self._after_asked_exit(asked)
        else:
            self._after_failure(code, reason)

    def _exit_code(self, process: BaseProcess, wait_report: float) -> int | None:
        watch, self.watch = self.watch, None
        if watch is None:  # only the fork server's word for it, which a dead one gets wrong
            process.join(0)
            if process.pid is not None and kill_if_ours(process.pid):
                logger.error(
                    "{}: pid {} was reported gone but ran on: SIGKILL", self.id, process.pid
                )
            return process.exitcode
        try:
            return watch.exit_code(process, wait_report)
        finally:
            watch.close()

    def _log_stacks(self) -> None:
        """After a hang: where it hung (the file is removed either way)."""
        lines = stack_dump.collect(self.stacks_path)
        if not self.hung:
            return
        self.hung = False
        if not lines:
            logger.error("{}: no stacks dumped (a stopped process, or one in C code)", self.id)
        for line in lines:
            logger.error("{}: hung at: {}", self.id, line)

    def _after_asked_exit(self, then: State) -> None:
        logger.info(
            "{}: {} exited ({})", self.id, self.noun, self.last_exit and self.last_exit.reason
        )
        if then is State.STARTING:
            self.state, self.start_at = State.BACKOFF, self._clock()
            self.manual_restarts += 1
        else:
            self.state = then

    def _after_failure(self, code: int | None, reason: str) -> None:
        if self.boot_error is not None:
            logger.error("{}: failed to boot: {} (not restarting)", self.id, self.boot_error)
            self.state = State.FATAL
            return
        decision = self.policy.on_exit()
        if decision.action == "fatal":
            logger.error(
                "{}: {} exited ({}); too many restarts, giving up (state fatal)",
                self.id,
                self.noun,
                reason,
            )
            self.state = State.FATAL
            return
        logger.warning(
            "{}: {} exited ({}); restarting in {:.2f}s", self.id, self.noun, reason, decision.delay
        )
        self.state = State.BACKOFF
        self.start_at = self._clock() + decision.delay
        self.restarts += 1

    def revive(self) -> None:
        """An operator's restart: forget the failure history."""
        self.policy.reset()
        self.boot_error = None

    # -- reporting ----------------------------------------------------------

    def summary(self) -> dict[str, Any]:
        """The ``chatq list --json`` object of this program."""
        now = self._clock()
        beat = self.heartbeat
        stats = self.proc_stats
        running = self.process is not None
        live = self.state in (State.STARTING, State.RUNNING)
        return {
            "tenant": self.id,
            "kind": self.kind,
            "state": self._shown_state(now),
            "stopping": self.stopping_reason is not None,  # a stop or restart under way
            "pid": self.pid,
            "uptime_s": round(now - self.started_at, 3) if running else None,
            "restarts": self.restarts,
            "manual_restarts": self.manual_restarts,
            # None without a live worker: a stopped tenant's age would only grow (and alert).
            "last_heartbeat_age_s": round(now - self.heartbeat_at, 3) if beat and live else None,
            "heartbeat_seq": self.heartbeat_seq if beat else None,
            "queued": beat.queued if beat else 0,
            "in_flight": beat.in_flight if beat else 0,
            "processed": beat.processed if beat else 0,
            "failed": beat.failed if beat else 0,
            "rejected": beat.rejected if beat else 0,
            "duplicates": beat.duplicates if beat else 0,
            "rate_limited": beat.rate_limited if beat else 0,
            "rss_bytes": stats.rss_bytes if stats else None,
        }

    def _shown_state(self, now: float) -> str:
        """Its state, or ``hung`` once it has missed LATE_BEATS beats (before the kill)."""
        late = now - self.heartbeat_at > LATE_BEATS * self.config.supervisor.heartbeat_interval_s
        silent = self.heartbeat is not None and self.process is not None and late
        if self.hung or (silent and self.state in (State.STARTING, State.RUNNING)):
            return "hung"
        return self.state.value

    def details(self) -> dict[str, Any]:
        """The ``chatq status --json`` object: the summary and more."""
        now = self._clock()
        stats = self.proc_stats
        exit_info = self.last_exit
        return {
            **self.summary(),
            "enabled": self.enabled,
            "cpu_percent": stats.cpu_percent if stats else None,
            "num_fds": stats.num_fds if stats else None,
            "backoff_left_s": (
                round(max(0.0, self.start_at - now), 3)
                if self.state is State.BACKOFF and self.start_at is not None
                else None
            ),
            "last_exit": (
                {"code": exit_info.code, "reason": exit_info.reason, "at": exit_info.at}
                if exit_info
                else None
            ),
            "boot_error": self.boot_error,
            "busiest": [list(pair) for pair in self.heartbeat.busiest] if self.heartbeat else [],
            "log_tail": list(self.log_tail),
        }


def _signal(process: BaseProcess, signum: int) -> None:
    if process.pid is None:
        return
    with contextlib.suppress(ProcessLookupError):  # already gone: the sentinel tells
        os.kill(process.pid, signum)


def _limits(config: ChatqConfig) -> tuple[float, float, float, int, float]:
    s = config.supervisor
    return s.backoff_initial, s.backoff_max, s.healthy_after, s.max_restarts, s.restart_window
