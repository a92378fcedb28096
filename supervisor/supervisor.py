"""The supervisor: one worker per enabled tenant, kept running.

The loop waits on everything at once -- every worker's pipe and process
sentinel, the fork server's answers (a spawn's pid, an exit's code), the
control socket and a wake-up pipe for signals -- like
``multiprocessing.connection.wait`` but with an epoll set kept between passes
(supervisor/waiter.py), then runs a fixed series of repair
steps, each small and testable alone (after gunicorn's ``Arbiter.run``):

    read frames -> pids, exits (reaped) -> serve control -> act on signals
    -> due checks (overdue stops: SIGKILL; silent workers: hung)
    -> watchdog -> start due workers
       (a few per pass: a fleet's start is spread over many passes)

A pass costs what happened, not the size of the fleet: workers are added to
and taken out of the wait set as they start and exit, and every deadline
(a start, a SIGKILL, a hang) sits in a heap (`_Timers`) that its handle
feeds when the deadline comes nearer (`ProgramHandle.on_change`). Starting
2,000 tenants took ~4,000 passes that each looked at every handle.

Signal handlers only record the signal; the loop acts on it.
"""

from __future__ import annotations

import contextlib
import heapq
import itertools
import os
import signal
import time
from collections import deque
from collections.abc import Callable
from multiprocessing.connection import Connection
from pathlib import Path
from types import FrameType
from typing import Any

from loguru import logger

from chatq.config import ChatqConfig, TenantConfig
from chatq.shared import protocol
from chatq.shared.errors import ChatqError, ConfigError, ControlError, NoSuchTenant
from chatq.shared.log import setup_logging
from chatq.supervisor import leftovers, spawn
from chatq.supervisor.child_watch import FORKSERVER_REPORT_S, become_subreaper, reap_orphans
from chatq.supervisor.commands import COMMANDS
from chatq.supervisor.control import ControlServer
from chatq.supervisor.gateway.handle import GATEWAY_ID, GatewayHandle, gateway_view
from chatq.supervisor.logbook import LogBook
from chatq.supervisor.logstream import LogStream
from chatq.supervisor.metrics import MetricsServer, start_metrics_server
from chatq.supervisor.program import ProgramHandle
from chatq.supervisor.tenant import State, TenantHandle
from chatq.supervisor.waiter import Waiter
from chatq.supervisor.watchdog import ProcessSampler, ProcStats, over_memory

MAX_WAIT = 5.0  # every timed event is a deadline anyway; this is a safety net
# Spawns per loop pass, and the time they may take: a fleet starts a few at a
# time, so the control socket and the running workers' beats are served in
# between (2,000 spawned before the first pass held `list` up for a minute).
STARTS_PER_PASS = 8
START_BUDGET_S = 0.05
# Workers booting at once (spawned, not yet ready). A boot is CPU and waits
# (its new store's fsyncs, the loop noticing Ready): with 8 at once, 2,000
# tenants took 89 s with the two cores half idle; with 32, 69 s, and each
# boot took less CPU, not more (31 ms against 36). Far more at once (300)
# made each boot dearer and left the supervisor a smaller share.
MAX_BOOTING = max(8, 16 * (os.cpu_count() or 1))
# How long the first spawn waits for the fork server to say it is ready
# (polled between passes); past this, a spawn waits inside multiprocessing.
FORK_SERVER_WAIT_S = 10.0
FORK_SERVER_POLL_S = 0.02
COALESCE = 0.005  # seconds to let a wave of heartbeats finish arriving
FULL_SAMPLE_EVERY = 6  # watchdog ticks between CPU/fd readings (30 s by default)
WATCH_BUDGET_S = 0.01  # watchdog readings per pass: a tick's round is spread over passes
PUBLISH_EVERY = 1.0  # seconds between snapshots for the metrics thread
CATCH_UP_READS = 16  # pipe reads (256 KiB each) before calling a silent worker hung
HANDLED_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
HANG_SLACK = 0.01  # wake this long after a hang deadline: the worker is then past it


class _Timers:
    """Handles by when they next need looking at: a heap kept against `deadline`.

    `push` is called when a handle's deadline may have come nearer; one that
    moved later (a beat), or went, is found out when its entry comes to the
    top, and moved or dropped there. So the entry at the top is always a
    handle's real deadline, and nothing is done per beat.
    """

    def __init__(self, deadline: Callable[[ProgramHandle], float | None]) -> None:
        self._deadline = deadline
        self._heap: list[tuple[float, int, ProgramHandle]] = []
        self._at: dict[ProgramHandle, float] = {}  # each handle's live entry
        self._order = itertools.count()  # ties: first pushed, first out

    def push(self, handle: ProgramHandle) -> None:
        """Put `handle` in at its deadline, unless an entry at or before it is there."""
        when = self._deadline(handle)
        current = self._at.get(handle)
        if when is None or (current is not None and current <= when):
            return
        self._put(handle, when)

    def first(self) -> float | None:
        """The earliest deadline."""
        heap = self._heap
        while heap:
            when, _, handle = heap[0]
            if self._at.get(handle) != when:
                heapq.heappop(heap)  # superseded by an earlier entry
                continue
            now_due = self._deadline(handle)
            if now_due == when:
                return when
            heapq.heappop(heap)
            del self._at[handle]
            if now_due is not None:  # moved (later, by a beat): in again where it is now
                self._put(handle, now_due)
        return None

    def pop(self) -> ProgramHandle:
        """Take out the handle with the earliest deadline (`first` must have found one)."""
        _, _, handle = heapq.heappop(self._heap)
        del self._at[handle]
        return handle

    def pop_due(self, now: float) -> list[ProgramHandle]:
        """Take out the handles whose deadline is `now` or earlier, earliest first."""
        due = []
        while (first := self.first()) is not None and first <= now:
            due.append(self.pop())
        return due

    def _put(self, handle: ProgramHandle, when: float) -> None:
        self._at[handle] = when
        heapq.heappush(self._heap, (when, next(self._order), handle))


def _start_deadline(handle: ProgramHandle) -> float | None:
    """When a queued or backed-off start is due (None: none is waiting)."""
    waiting = handle.process is None and handle.state in (State.STARTING, State.BACKOFF)
    return handle.start_at if waiting else None


def _worker_view(config: ChatqConfig) -> tuple[Any, ...]:
    """Supervisor settings a running worker depends on (a change restarts all)."""
    s = config.supervisor
    return (s.run_dir, s.data_dir, s.heartbeat_interval_ms, s.log_level, s.log_format)


def changes_text(changes: dict[str, list[str]]) -> str:
    """'added initech; unchanged acme, globex' for a log line (not a dict's repr)."""
    return "; ".join(f"{kind} {', '.join(names)}" for kind, names in changes.items() if names)


class Supervisor:
    """Owns the tenant handles and the loop that keeps them in their states."""

    def __init__(
        self,
        config: ChatqConfig,
        load: Callable[[], ChatqConfig],
        stream: LogStream,
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.config = config
        self._load = load
        self._stream = stream
        self._clock = clock
        self._handles: dict[str, ProgramHandle] = {}  # tenants, and "gateway"
        self._removed: set[str] = set()
        self._ctx = spawn.context()
        self._sampler = ProcessSampler()
        self._signals: list[int] = []
        self._shutting_down = False
        self._next_watchdog = 0.0
        self._watch_ticks = 0
        self._watch_due: deque[str] = deque()  # programs this tick still has to read
        self._watch_full = False  # this tick reads CPU and fds too
        self._subreaper = False
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        os.set_blocking(self._wake_w, False)
        self.control: ControlServer | None = None
        self._waiter = Waiter()
        self._waiter.add(self._wake_r)
        # Live workers' pipes and sentinels (as waited on), and which handle each is.
        self._conns: dict[Connection, ProgramHandle] = {}
        self._sentinels: dict[int, ProgramHandle] = {}
        self._pending: dict[int, ProgramHandle] = {}  # pid pipes: spawned, pid not read yet
        # Exited; their exit code (from the fork server, on the same pipe) not here yet.
        self._reporting: dict[int, ProgramHandle] = {}
        self._report_by: list[tuple[float, int, ProgramHandle]] = []  # when to stop waiting
        self._report_order = itertools.count()
        self._fd_of: dict[ProgramHandle, int] = {}  # its fd in one of those three
        self._live: set[ProgramHandle] = set()  # with a process
        self._boot: set[ProgramHandle] = set()  # spawned, maybe still booting
        self._checks = _Timers(ProgramHandle.check_at)  # SIGKILLs and hang deadlines
        self._starts = _Timers(_start_deadline)  # queued and backed-off starts
        self._due: float | None = None  # when the next pass is due; None: work it out
        self._news = False  # this pass read a frame that changes a program's state
        # What other threads (the metrics server) may read: replaced, never mutated.
        self.published: list[dict[str, Any]] = []
        self.publishing = config.supervisor.metrics_port is not None
        self._metrics: MetricsServer | None = None
        self._next_publish = 0.0
        self._fork_server_up = True  # `run` waits for the one `chatq run` started
        self._ready_flag: Path | None = None
        self._fork_server_wait_end = 0.0

    # -- lookups used by commands ------------------------------------------

    @property
    def log_book(self) -> LogBook:
        """The recent log lines per source (``chatq logs``)."""
        return self._stream.book

    def handles(self) -> list[ProgramHandle]:
        return list(self._handles.values())

    def handle(self, tenant_id: str) -> ProgramHandle:
        found = self._handles.get(tenant_id)
        if found is None or tenant_id in self._removed:
            raise NoSuchTenant(tenant_id)
        return found

    # -- the main loop --------------------------------------------------------

    def run(self) -> int:
        """Run until shut down; returns the process exit code (0)."""
        self._subreaper = become_subreaper()  # see supervisor/child_watch.py
        if not self._subreaper:
            logger.warning("cannot become the child subreaper: a dead fork server orphans workers")
        spawn.start_fork_server()  # before any thread exists; see supervisor/spawn.py
        self._ready_flag = spawn.awaited_flag()
        self._fork_server_up = self._ready_flag is None
        self._fork_server_wait_end = self._clock() + FORK_SERVER_WAIT_S
        for folder in (self.config.supervisor.run_dir, self.config.supervisor.data_dir):
            folder.mkdir(mode=0o700, parents=True, exist_ok=True)  # sockets and stores: ours only
        self.control = ControlServer(self.config.control_socket, self._dispatch)
        previous = self._install_signals()
        try:
            port = self.config.supervisor.metrics_port
            if port is not None:
                self._metrics = start_metrics_server(port, lambda: self.published)
                logger.info("metrics on http://127.0.0.1:{}/metrics", port)
            logger.info(
                "supervisor pid {} up; control socket {}", os.getpid(), self.config.control_socket
            )
            if self.config.gateway is not None:
                self._add_gateway(self.config)  # first: it serves every tenant
            for tenant in self.config.tenants:
                self._add(self.config, tenant)
            while not (self._shutting_down and not self._live):
                self.step()
        except BaseException:
            logger.exception("supervisor failed: stopping every worker")
            self._abandon_workers()
            raise
        finally:
            if self._metrics is not None:
                self._metrics.stop()
            self._restore_signals(previous)
            self.control.close()
            self._waiter.close()
            os.close(self._wake_r)
            os.close(self._wake_w)
        logger.info("supervisor stopped")
        return 0

    def _abandon_workers(self) -> None:
        """Stop every worker after the loop failed.

        One left running would go on unsupervised, holding its store, and
        Python's exit would wait for it forever.
        """
        running = [h for h in self.handles() if h.process is not None]
        for handle in running:
            handle.abandon()
        deadline = self._clock() + self.config.supervisor.stop_grace
        for handle in running:
            handle.reap_or_kill(max(0.0, deadline - self._clock()))

    def step(self) -> None:
        """One pass: wait for something to happen, then repair.

        A pass that only read frames (heartbeats, log lines) before anything
        is due is *quiet*: frames only push deadlines later, so it skips the
        repair steps. An idle fleet's passes are nearly all quiet, and cost
        what was read, not the number of workers.
        """
        assert self.control is not None
        if self._due is None:
            self._due = self._clock() + self._wait_time()
        readers, writers = self.control.waitables(), self.control.writables()
        timeout = max(0.0, self._due - self._clock())
        ready = self._waiter.wait(readers, timeout, writers)
        conns = self._conns
        only_pipes = bool(ready) and all(obj in conns for obj in ready)
        if only_pipes:
            # Most likely the start of a heartbeat wave (workers beat on the
            # same wall-clock instants). Let the rest of it land and take it
            # in one pass rather than one pass per worker.
            time.sleep(COALESCE)
            ready = self._waiter.wait(readers, 0, writers)
            only_pipes = all(obj in conns for obj in ready)
        dropped = False
        self._news = False
        for obj in ready:
            handle = conns.get(obj)
            if handle is not None:
                dropped |= not self._read_frames(handle)
        quiet = only_pipes and not dropped and not self._news and not writers
        if quiet and self._clock() < self._due:
            return
        self._due = None  # deadlines may change below
        self._process_events(ready)
        self.control.handle_ready(ready)
        self._act_on_signals()
        self._check_due()
        self._watchdog()
        self._start_due()
        self._publish()

    def _wait_time(self) -> float:
        assert self.control is not None
        now = self._clock()
        deadlines = [now + MAX_WAIT, self._next_watchdog]
        if self._watch_due:
            deadlines.append(now)
        if self.publishing:
            deadlines.append(self._next_publish)
        if not self._fork_server_up:
            deadlines.append(now + FORK_SERVER_POLL_S)
        # At the cap a Ready frame wakes us; before the fork server is, the poll.
        if self._fork_server_up and self._booting() < MAX_BOOTING:
            start = self._starts.first()
            if start is not None:
                deadlines.append(start)
        check = self._checks.first()
        if check is not None:
            deadlines.append(check + HANG_SLACK)
        report = self._report_deadline()
        if report is not None:
            deadlines.append(report)
        due = self.control.due_in()
        if due is not None:
            deadlines.append(now + due)
        return max(0.0, min(deadlines) - now)

    # -- what is waited on, and when --------------------------------------------

    def _follow(self, handle: ProgramHandle) -> None:
        """Have the loop follow `handle`'s deadlines (its `on_change` hook)."""
        handle.on_change = self._schedule
        self._schedule(handle)

    def _schedule(self, handle: ProgramHandle) -> None:
        """A deadline of `handle` may have come nearer: put it in the heaps."""
        self._starts.push(handle)
        self._checks.push(handle)

    def _watch(self, handle: ProgramHandle) -> None:
        """A process was just spawned: wait on its pipe, and on its pid or its exit."""
        if handle.process is None:
            return
        if handle.conn is not None:
            self._conns[handle.conn] = handle
            self._waiter.add(handle.conn)
        if handle.pid_pending:
            self._watch_fd(handle, handle.pid_pipe, self._pending)
        else:
            self._watch_fd(handle, handle.sentinel, self._sentinels)
        self._live.add(handle)
        self._boot.add(handle)

    def _watch_fd(self, handle: ProgramHandle, fd: int, kind: dict[int, ProgramHandle]) -> None:
        """Wait on `fd` of `handle`: its pid pipe (`_pending`) or its exit (`_sentinels`)."""
        if fd >= 0:
            kind[fd] = handle
            self._fd_of[handle] = fd
            self._waiter.add(fd)

    def _unwatch_fd(self, handle: ProgramHandle) -> None:
        fd = self._fd_of.pop(handle, None)
        if fd is not None:
            self._waiter.remove(fd)
            for kind in (self._pending, self._sentinels, self._reporting):
                if kind.get(fd) is handle:
                    del kind[fd]

    def _take_pid(self, handle: ProgramHandle) -> None:
        """The fork server answered a spawn: its pid (then wait on its exit), or it died."""
        self._unwatch_fd(handle)
        try:
            handle.take_pid()
        except (OSError, EOFError) as exc:  # it died before forking: that spawn failed alone
            self._unwatch(handle)
            handle.spawn_failed(exc)
            return
        self._watch_fd(handle, handle.sentinel, self._sentinels)

    def _unwatch(self, handle: ProgramHandle) -> None:
        """Before its pipe and sentinel are closed (the process has exited)."""
        self._unwatch_conn(handle)
        self._unwatch_fd(handle)
        self._live.discard(handle)
        self._boot.discard(handle)

    def _unwatch_conn(self, handle: ProgramHandle) -> None:
        conn = handle.conn
        if conn is not None and self._conns.get(conn) is handle:
            del self._conns[conn]
            self._waiter.remove(conn)

    # -- repair steps --------------------------------------------------------

    def _read_frames(self, handle: ProgramHandle) -> bool:
        """Take in what the pipe holds; False if the pipe was dropped (EOF, bad frame)."""
        conn, reader = handle.conn, handle.reader
        if conn is None or reader is None:  # dropped earlier in this pass
            return False
        try:
            seq = reader.read_beat()
            if seq is not None:  # an idle worker's second: nothing else to do
                handle.on_beat(seq)
                return True
            frames = reader.frames()
        except protocol.ProtocolError as exc:
            logger.error("{}: bad frame from worker ({}); stopping it", handle.id, exc)
            self._drop_conn(handle, conn)
            handle.stop(f"protocol error: {exc}", State.STARTING)
            return False
        for frame in frames:
            if isinstance(frame, protocol.Ready | protocol.BootFailed):
                self._news = True  # a boot ended: the next start may be due (MAX_BOOTING)
            line = handle.on_frame(frame)
            if line is not None:
                self._stream.write_line(line, source=handle.id)
        if reader.eof:
            self._drop_conn(handle, conn)
            return False
        return True

    def _catch_up(self, handle: ProgramHandle) -> None:
        """Read what the worker's pipe holds now, beats included."""
        for _ in range(CATCH_UP_READS):
            conn = handle.conn
            if conn is None or not conn.poll(0):  # poll(2): no FD_SETSIZE limit, unlike select
                return
            self._read_frames(handle)

    def _drop_conn(self, handle: ProgramHandle, conn: Connection) -> None:
        self._unwatch_conn(handle)
        conn.close()
        handle.conn = handle.reader = None  # the sentinel reports the exit itself

    def _process_events(self, ready: list[Any]) -> None:
        """Pids the fork server answered, exits, exit codes it reported (or not, in time)."""
        for obj in ready:
            if not isinstance(obj, int):
                continue
            forked = self._pending.get(obj)
            if forked is not None:
                self._take_pid(forked)
                continue
            exited = self._sentinels.get(obj)
            if exited is not None:
                self._exited(exited)
                continue
            reported = self._reporting.get(obj)
            if reported is not None:
                self._reap(reported)
        self._reap_unreported()

    def _exited(self, handle: ProgramHandle) -> None:
        """Its pidfd says it exited: reap it once the fork server has reported its code.

        Waiting for that report inside the reap held the loop once per exit:
        1.4 s of a 1,000-tenant stop's 5.5 s. Now the loop waits on the report
        with everything else, FORKSERVER_REPORT_S at most (a stopped fork server).
        """
        if not handle.exit_unreported:
            self._reap(handle)
            return
        self._unwatch_fd(handle)
        self._watch_fd(handle, handle.pid_pipe, self._reporting)
        deadline = self._clock() + FORKSERVER_REPORT_S
        heapq.heappush(self._report_by, (deadline, next(self._report_order), handle))

    def _awaiting_report(self, handle: ProgramHandle) -> bool:
        fd = self._fd_of.get(handle)
        return fd is not None and self._reporting.get(fd) is handle

    def _reap_unreported(self) -> None:
        """Reap those whose exit the fork server has not reported in time (code unknown)."""
        now = self._clock()
        while self._report_by and self._report_by[0][0] <= now:
            handle = heapq.heappop(self._report_by)[2]
            if self._awaiting_report(handle):
                self._reap(handle, wait_report=0.0)

    def _report_deadline(self) -> float | None:
        """When the first exit report still awaited is overdue (stale entries dropped)."""
        heap = self._report_by
        while heap:
            if self._awaiting_report(heap[0][2]):
                return heap[0][0]
            heapq.heappop(heap)
        return None

    def _reap(self, handle: ProgramHandle, wait_report: float = FORKSERVER_REPORT_S) -> None:
        if handle.conn is not None:
            self._read_frames(handle)  # a BootFailed frame may still be in the pipe
        if handle.pid is not None:
            self._sampler.forget(handle.pid)
        self._unwatch(handle)
        handle.on_exit(wait_report)
        if handle.id in self._removed:
            del self._handles[handle.id]
            self._removed.discard(handle.id)

    def _act_on_signals(self) -> None:
        with contextlib.suppress(BlockingIOError):
            while os.read(self._wake_r, 512):
                pass
        pending, self._signals = self._signals, []
        for signum in pending:
            if signum == signal.SIGHUP:
                with contextlib.suppress(ChatqError):  # already logged by reload
                    self.reload()
            else:
                self.begin_shutdown(f"{signal.Signals(signum).name} received")

    def _check_due(self) -> None:
        """SIGKILL overdue stops, and call hung the workers silent past their deadline.

        Only the handles whose deadline has come (`_checks`); one that beat
        since is looked at again at its new deadline.
        """
        timeout_s = self.config.supervisor.heartbeat_timeout_s
        due = self._checks.pop_due(self._clock())
        for handle in due:
            if self._awaiting_report(handle):
                continue  # it has exited: only its exit code is still to come
            handle.kill_if_overdue()
            if handle.is_hung():
                self._catch_up(handle)  # our loop may be the one that was held up
            if handle.is_hung():
                handle.kill_hung(f"hung: no heartbeat for {timeout_s:g}s")
        for handle in due:  # after the loop: a deadline just reached is not looked at twice
            self._schedule(handle)

    def _watchdog(self) -> None:
        now = self._clock()
        if now < self._next_watchdog:
            self._watch_some()  # the rest of this tick's round, if any
            return
        self._next_watchdog = now + self.config.supervisor.watchdog_interval
        # Every tick reads memory (the limit); CPU and fds, which cost several
        # /proc reads per worker, every FULL_SAMPLE_EVERY ticks, on `status`,
        # or every tick while metrics are served.
        self._watch_ticks += 1
        if self._subreaper:  # orphans come to us: leave no zombie
            for pid in reap_orphans({h.pid for h in self.handles() if h.pid is not None}):
                logger.info("reaped orphan pid {}", pid)
        self._watch_full = self.publishing or self._watch_ticks % FULL_SAMPLE_EVERY == 1
        self._watch_due = deque(self._handles)
        self._watch_some()

    def _watch_some(self) -> None:
        """Read the next workers of this tick's round for WATCH_BUDGET_S at most.

        A full reading of 1,000 workers took ~0.5 s of CPU (seconds, on a busy
        host) in one pass: `list` and heartbeats waited for it.
        """
        end = time.monotonic() + WATCH_BUDGET_S
        while self._watch_due:
            handle = self._handles.get(self._watch_due.popleft())
            if handle is not None and handle.pid is not None:
                self._check_memory(handle)
                if time.monotonic() >= end:
                    return

    def _check_memory(self, handle: ProgramHandle) -> None:
        stats = self._read_stats(handle, self._watch_full)
        limit = handle.memory_limit_mb
        if stats is not None and over_memory(stats, limit) and handle.stopping_reason is None:
            reason = f"memory: rss {stats.rss_bytes / 2**20:.0f} MB over memory_limit_mb {limit}"
            logger.warning("{}: {}; restarting it", handle.id, reason)
            handle.stop(reason, State.STARTING)

    def _read_stats(self, handle: ProgramHandle, full: bool, fds: bool = False) -> ProcStats | None:
        """Memory (and, `full`, CPU; `fds`, open files too) of `handle`'s process.

        The watchdog's rounds count no open files (a directory listing per
        worker, every 30 s, that nothing showed): `status` reads them itself.
        """
        assert handle.pid is not None
        old = handle.proc_stats
        if full or fds or old is None:
            handle.proc_stats = self._sampler.sample(handle.pid, fds=fds)
        else:
            rss = self._sampler.rss(handle.pid)
            # Not dataclasses.replace: it looks up the fields every time (~3 us, 100 a second).
            stats = None if rss is None else ProcStats(old.pid, rss, old.cpu_percent, old.num_fds)
            handle.proc_stats = stats
        return handle.proc_stats

    def sample_now(self, handle: ProgramHandle) -> None:
        """Fresh CPU, fds and memory readings of one tenant (for `status`)."""
        if handle.pid is not None:
            self._read_stats(handle, full=True, fds=True)

    def _start_due(self) -> None:
        """Start the programs whose (queued or backoff) start is due: a few per pass."""
        if self._shutting_down or not self._fork_server_ready():
            return
        now = self._clock()
        booting = self._booting()
        started, budget_end = 0, time.monotonic() + START_BUDGET_S
        while booting < MAX_BOOTING and (first := self._starts.first()) is not None:
            if first > now:
                return
            handle = self._starts.pop()
            if self._handles.get(handle.id) is not handle:
                continue  # removed from the config
            self._start(handle)
            started += 1
            booting += handle.booting
            if started >= STARTS_PER_PASS or time.monotonic() >= budget_end:
                return

    def _start(self, handle: ProgramHandle) -> None:
        handle.start(self._ctx)
        self._watch(handle)

    def _fork_server_ready(self) -> bool:
        """Whether the fork server has preloaded (its flag file is there), or we waited enough.

        Spawning earlier would block this loop, and the control socket,
        until it has.
        """
        flag = self._ready_flag
        if self._fork_server_up or flag is None:
            return True
        if flag.exists() or self._clock() >= self._fork_server_wait_end:
            flag.unlink(missing_ok=True)
            self._fork_server_up = True
        return self._fork_server_up

    def _booting(self) -> int:
        self._boot = {h for h in self._boot if h.booting}
        return len(self._boot)

    def _publish(self) -> None:
        if not self.publishing:
            return
        now = self._clock()
        if now >= self._next_publish:
            self._next_publish = now + PUBLISH_EVERY
            self.published = [handle.details() for handle in self.handles()]

    # -- operations (commands and signals) -----------------------------------

    def _add(self, config: ChatqConfig, tenant: TenantConfig) -> None:
        """A new tenant's handle; an enabled one starts in a coming pass (`_start_due`)."""
        handle = TenantHandle(config, tenant, clock=self._clock)
        self._handles[tenant.id] = handle
        self._follow(handle)
        if tenant.enabled and not self._shutting_down:
            handle.queue_start()

    def _add_gateway(self, config: ChatqConfig) -> None:
        handle = GatewayHandle(config, clock=self._clock)
        self._handles[GATEWAY_ID] = handle
        self._follow(handle)
        if not self._shutting_down:
            self._start(handle)

    def restart(self, tenant_id: str) -> None:
        handle = self.handle(tenant_id)
        handle.revive()
        handle.stop("restart requested", State.STARTING)

    def stop_tenant(self, tenant_id: str) -> None:
        self.handle(tenant_id).stop("stop requested", State.STOPPED)

    def start_tenant(self, tenant_id: str) -> None:
        handle = self.handle(tenant_id)
        if handle.alive and not handle.stopping_for_good:
            raise ControlError(f"tenant {tenant_id} is already {handle.state.value}")
        handle.revive()
        if handle.alive:  # still draining after a stop: start again once it exits
            handle.stop("start requested", State.STARTING)
        else:  # in a coming pass: `start --all` on a large fleet must not hold the loop
            handle.queue_start()

    def begin_shutdown(self, reason: str) -> None:
        if not self._shutting_down:
            logger.info("shutting down ({}): draining all workers", reason)
        self._shutting_down = True
        handles = self.handles()
        for handle in handles:  # first, so that the first ones to drain do not hold up the rest
            handle.drain_behind_us()
        for handle in handles:
            handle.stop(reason, State.STOPPED)

    def reload(self, force: bool = False) -> dict[str, Any]:
        """Re-read the config and apply the difference; unchanged tenants keep their PID.

        Every key is applied or the whole reload refused (nothing changed).
        The answer names the rows left behind (tenants removed, or every
        store when data_dir moves, with ``force``).
        """
        try:
            new = self._load()
            self._check_reload(new, force)
        except ChatqError as exc:
            logger.error("reload refused, keeping the running config: {}", exc)
            raise
        old = self.config
        everything_changed = _worker_view(new) != _worker_view(old)
        tenants = [h for h in self.handles() if isinstance(h, TenantHandle)]
        old_ids = {h.id for h in tenants if h.id not in self._removed}
        new_ids = [t.id for t in new.tenants]
        changes: dict[str, Any] = {"added": [], "removed": [], "changed": [], "unchanged": []}
        for tenant_id in old_ids - set(new_ids):
            self._remove(tenant_id)
            changes["removed"].append(tenant_id)
        for tenant_id in new_ids:
            kind = self._apply(new, tenant_id, old_ids, everything_changed)
            changes[kind].append(tenant_id)
        gateway = self._apply_gateway(new, everything_changed)
        if gateway is not None:
            changes[gateway].append(GATEWAY_ID)
        moved = new.supervisor.data_dir != old.supervisor.data_dir
        left = leftovers.unfinished(
            old, leftovers.stored_tenants(old) if moved else changes["removed"]
        )
        self._apply_own_settings(new)
        self.config = new
        for handle in self.handles():  # a shorter heartbeat timeout brings deadlines nearer
            self._schedule(handle)
        logger.info("reloaded: {}", changes_text(changes))
        if left:
            changes["left_behind"] = left
            logger.warning(
                "reload: unfinished rows stay in {} ({}); chatq history TENANT reads them",
                old.supervisor.data_dir,
                leftovers.describe(left),
            )
        return changes

    def _check_reload(self, new: ChatqConfig, force: bool) -> None:
        """Refuse (ChatqError) a reload that cannot be applied, before changing anything."""
        old = self.config.supervisor
        if new.supervisor.run_dir != old.run_dir:
            raise ConfigError(
                f"run_dir changes from {old.run_dir} to {new.supervisor.run_dir}: that needs a"
                " supervisor restart (the control and tenant sockets live there)"
            )
        if new.supervisor.data_dir != old.data_dir and not force:
            left = leftovers.unfinished(self.config, leftovers.stored_tenants(self.config))
            if left:
                raise ControlError(
                    f"data_dir changes from {old.data_dir} to {new.supervisor.data_dir} while"
                    f" stores there hold unfinished rows ({leftovers.describe(left)}); let them"
                    " finish, or reload --force to leave them behind"
                )

    def _apply_own_settings(self, new: ChatqConfig) -> None:
        """The supervisor's own keys: metrics_port, log_file, log_level, log_format."""
        old, settings = self.config.supervisor, new.supervisor
        if (settings.log_level, settings.log_format) != (old.log_level, old.log_format):
            spawn.use_log(settings.log_level, settings.log_format)  # a fork server started later
            setup_logging(
                settings.log_level,
                settings.log_format,
                tenant_id="supervisor",
                sink=self._stream.write_line,
            )
        if settings.log_file != old.log_file:
            self._stream.use_file(settings.log_file)
            logger.info("reload: log file now {}", settings.log_file or "(none)")
        if settings.metrics_port != old.metrics_port:
            self._serve_metrics(settings.metrics_port)

    def _serve_metrics(self, port: int | None) -> None:
        if self._metrics is not None:
            self._metrics.stop()
            self._metrics = None
        if port is not None:
            try:
                self._metrics = start_metrics_server(port, lambda: self.published)
            except ConfigError as exc:  # e.g. the port is taken: say so, serve none
                logger.error("reload: no metrics: {}", exc)
            else:
                logger.info("reload: metrics now on http://127.0.0.1:{}/metrics", port)
        self.publishing = self._metrics is not None

    def _remove(self, name: str) -> None:
        """Stop a program the config no longer has; forget it once it has exited."""
        self._removed.add(name)
        self._handles[name].stop("removed from the config", State.STOPPED)
        if not self._handles[name].alive:
            del self._handles[name]
            self._removed.discard(name)

    def _apply_gateway(self, new: ChatqConfig, force: bool) -> str | None:
        """Start, stop or restart the gateway for a reloaded config; None if there is none."""
        handle = self._handles.get(GATEWAY_ID)
        present = handle is not None and GATEWAY_ID not in self._removed
        if new.gateway is None:
            if not present:
                return None
            self._remove(GATEWAY_ID)
            return "removed"
        if handle is None:
            self._add_gateway(new)
            return "added"
        changed = force or gateway_view(new) != gateway_view(handle.config)
        handle.use_config(new)
        if not present:  # removed earlier and still draining: start it after
            self._removed.discard(GATEWAY_ID)
            handle.stop("added again to the config", State.STARTING)
            return "added"
        if not changed:
            return "unchanged"
        if not (handle.state is State.STOPPED or handle.stopping_for_good):
            handle.revive()
            handle.stop("config changed", State.STARTING)
        return "changed"

    def _apply(self, new: ChatqConfig, tenant_id: str, old_ids: set[str], force: bool) -> str:
        if tenant_id not in old_ids:
            self._removed.discard(tenant_id)
            draining = self._handles.get(tenant_id)
            if draining is None:
                self._add(new, new.tenant(tenant_id))
            else:  # removed earlier and still draining: one worker per store, so start it after
                assert isinstance(draining, TenantHandle)
                draining.use_config(new)
                draining.tenant = new.tenant(tenant_id)
                then = State.STARTING if draining.tenant.enabled else State.STOPPED
                draining.stop("added again to the config", then)
            return "added"
        handle = self._handles[tenant_id]
        assert isinstance(handle, TenantHandle)
        tenant = new.tenant(tenant_id)
        handle.use_config(new)
        if tenant == handle.tenant and not force:
            return self._resume_if_paused(handle)
        stopped = handle.state is State.STOPPED or handle.stopping_for_good
        stopped_by_operator = stopped and handle.tenant.enabled  # not by the config
        handle.tenant = tenant
        if stopped_by_operator:
            return "changed"  # it stays stopped: `chatq start` runs the new config
        if not tenant.enabled:
            handle.stop("disabled in the config", State.STOPPED)
        else:  # a fatal tenant gets a fresh chance too: the change may be its fix
            handle.revive()
            handle.stop("config changed", State.STARTING)
        return "changed"

    @staticmethod
    def _resume_if_paused(handle: TenantHandle) -> str:
        """A reload is how an operator says "Meta lifted it": a paused sending restarts."""
        beat = handle.heartbeat
        if beat is None or beat.paused is None or handle.process is None:
            return "unchanged"
        handle.stop("reload: resume paused sending", State.STARTING)
        return "changed"

    def _dispatch(self, request: dict[str, Any]) -> Any:
        command = COMMANDS[request["cmd"]]
        if self._shutting_down and request["cmd"] not in ("list", "status", "logs"):
            raise ControlError("supervisor is shutting down")
        return command(self, request)

    # -- signals ---------------------------------------------------------------

    def _install_signals(self) -> dict[int, Any]:
        previous: dict[int, Any] = {int(s): signal.getsignal(s) for s in HANDLED_SIGNALS}
        for signum in HANDLED_SIGNALS:
            signal.signal(signum, self._record_signal)
        previous[-1] = signal.set_wakeup_fd(self._wake_w)
        return previous

    def _record_signal(self, signum: int, _frame: FrameType | None) -> None:
        self._signals.append(signum)  # no logging, no work: the loop acts

    def _restore_signals(self, previous: dict[int, Any]) -> None:
        signal.set_wakeup_fd(previous.pop(-1))
        for signum, handler in previous.items():
            signal.signal(signum, handler)
