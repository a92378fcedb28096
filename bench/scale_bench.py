"""Start-up at scale: a fleet's start, the control socket meanwhile, stop, boot CPU.

    .venv/bin/python bench/scale_bench.py [--tenants 1000] [--runs 3] [--settle 5] [--json]

Drives the real `chatq run` with N idle echo tenants (1 s heartbeats, log
level WARNING) and measures, per run:

- time from `chatq run` to every tenant `running`;
- the control socket during the start: a `list` request every ~100 ms
  (`--list-every`) from the moment the socket exists, each answer's wall
  time (max, p99);
- `list` at steady state (`--settle` s later): the raw request, and the
  `chatq list --json` command as a subprocess (interpreter start included);
- graceful stop of all: SIGTERM to the supervisor until it has exited (every
  worker drained);
- the supervisor's CPU from exec to all running, and the fork server's;
  how the host's cores spent that time (busy, idle, waiting on I/O, stolen
  by the hypervisor), all of chatq's processes' CPU, and this bench's own
  (its `list` client);
- each worker's boot CPU, fork to ready: its threads' run time (schedstat,
  in ns) read from /proc the moment a `list` first shows it `running` (a
  forked child's CPU times start at zero; what runs after Ready before the
  read is one heartbeat at most, ~0.2 ms);
- what one tenant holds: PSS, USS (a sample of workers), threads and open
  files, and the supervisor's and fork server's open files.

Every process the bench starts is in one session (`start_new_session`):
whatever is left of it at the end is SIGKILLed, whatever happened.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import suppress
from pathlib import Path
from typing import Any

import psutil
from supervisor_bench import start_chatq, write_config

from chatq.supervisor.control_client import request

ROOT = Path(__file__).resolve().parent.parent
SAMPLE_EVERY = 0.1
MB = 2**20
USS_SAMPLE = 40  # workers whose USS is read (smaps: slow at 2,000)
ENV = dict(os.environ)  # --code DIR: another chatq tree (the baseline) on PYTHONPATH


def kill_session(sid: int) -> int:
    """SIGKILL every process left in session `sid` (the bench's supervisor and its children)."""
    killed = 0
    for proc in psutil.process_iter():
        with suppress(psutil.Error, ProcessLookupError, PermissionError):
            if os.getsid(proc.pid) == sid:
                proc.kill()
                killed += 1
    return killed


def session_cpu_s(sid: int) -> float:
    """CPU of every live process in session `sid`: the supervisor, fork server, workers."""
    total = 0.0
    for proc in psutil.process_iter():
        with suppress(psutil.Error, ProcessLookupError, PermissionError):
            if os.getsid(proc.pid) == sid:
                times = proc.cpu_times()
                total += times.user + times.system
    return total


def cpu_s(pid: int) -> float | None:
    try:
        times = psutil.Process(pid).cpu_times()
    except psutil.Error:
        return None
    return float(times.user + times.system)


def threads_cpu_s(pid: int) -> float | None:
    """CPU of a process to the nanosecond: its live threads' /proc schedstat run times
    (psutil's cpu_times count 10 ms ticks, too coarse for a 20 ms boot)."""
    total = 0
    try:
        for task in Path(f"/proc/{pid}/task").iterdir():
            with suppress(FileNotFoundError, ProcessLookupError):
                total += int((task / "schedstat").read_text().split()[0])
    except (FileNotFoundError, ProcessLookupError):
        return None
    return total / 1e9


def host_cpu() -> list[int]:
    """The machine's CPU time so far, in clock ticks: user .. steal (proc(5), the "cpu" line)."""
    with open("/proc/stat") as file:
        return [int(field) for field in file.readline().split()[1:9]]


def host_use(before: list[int], after: list[int]) -> dict[str, float]:
    """How the machine's cores spent the time between two `host_cpu` readings (fractions)."""
    user, nice, system, idle, iowait, irq, softirq, steal = (
        b - a for a, b in zip(before, after, strict=True)
    )
    total = max(1, user + nice + system + idle + iowait + irq + softirq + steal)
    return {
        "host_busy_frac": (user + nice + system + irq + softirq) / total,
        "host_idle_frac": idle / total,
        "host_iowait_frac": iowait / total,
        "host_steal_frac": steal / total,
    }


def own_cpu_s() -> float:
    """This bench's own CPU so far (its `list` client parses every answer)."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def fork_server(sup: psutil.Process) -> psutil.Process | None:
    for child in sup.children():
        with suppress(psutil.Error):
            if "forkserver" in " ".join(child.cmdline()):
                return child
    return None


def watch_start(
    proc: subprocess.Popen[bytes],
    sock: Path,
    count: int,
    started: float,
    timeout: float,
    *,
    every: float = SAMPLE_EVERY,
) -> dict[str, Any]:
    """Sample `list` every `every` s until all run; answer times and boot CPUs."""
    answers: list[float] = []
    boot: dict[str, float] = {}
    socket_up = None
    slowest = (0.0, 0.0)  # the slowest answer, and when it was asked
    deadline = started + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"chatq run exited with {proc.returncode} during the start")
        asked = time.monotonic()
        try:
            rows = request(sock, "list", timeout=timeout)
        except Exception:
            if socket_up is not None:
                raise
            time.sleep(0.01)
            continue
        answered = time.monotonic()
        if socket_up is None:
            socket_up = asked - started
        answers.append(answered - asked)
        slowest = max(slowest, (answered - asked, asked - started))
        for row in rows:
            if row["state"] == "running" and row["tenant"] not in boot:
                cpu = threads_cpu_s(row["pid"])
                if cpu is not None:
                    boot[row["tenant"]] = cpu
        if len(rows) == count and all(row["state"] == "running" for row in rows):
            return {
                "all_running_s": answered - started,
                "socket_up_s": socket_up,
                "list_samples": len(answers),
                "list_max_ms_during_start": max(answers) * 1000,
                "list_max_asked_at_s": slowest[1],
                "list_p99_ms_during_start": percentile(answers, 0.99) * 1000,
                "boot_cpu_ms": [value * 1000 for value in boot.values()],
            }
        time.sleep(max(0.0, every - (time.monotonic() - asked)))
    raise TimeoutError(f"not all {count} tenants running within {timeout:.0f} s")


def steady_list(sock: Path, config: Path) -> dict[str, float]:
    raw = []
    for _ in range(10):
        asked = time.monotonic()
        request(sock, "list", timeout=30)
        raw.append(time.monotonic() - asked)
        time.sleep(0.1)
    cli = []
    command = [sys.executable, "-m", "chatq.supervisor.cli", "--config", str(config), "list"]
    for _ in range(5):
        asked = time.monotonic()
        subprocess.run([*command, "--json"], check=True, capture_output=True, cwd=ROOT, env=ENV)
        cli.append(time.monotonic() - asked)
    return {
        "list_ms_steady": statistics.median(raw) * 1000,
        "list_ms_steady_max": max(raw) * 1000,
        "cli_list_ms_steady": statistics.median(cli) * 1000,
    }


def footprint(sup: psutil.Process, pids: list[int]) -> dict[str, float]:
    """Memory, threads and open files per tenant; the supervisor's and fork server's fds."""
    pss, threads, fds = [], [], []
    for pid in pids:
        with suppress(psutil.Error):
            worker = psutil.Process(pid)
            pss.append(worker.memory_full_info().pss)
            threads.append(worker.num_threads())
            fds.append(worker.num_fds())
    step = max(1, len(pids) // USS_SAMPLE)
    uss = []
    for pid in pids[::step]:
        with suppress(psutil.Error):
            uss.append(psutil.Process(pid).memory_full_info().uss)
    server = fork_server(sup)
    return {
        "worker_pss_mb_median": statistics.median(pss) / MB,
        "worker_pss_gb_total": sum(pss) / 2**30,
        "worker_uss_mb_median": statistics.median(uss) / MB,
        "worker_threads": statistics.median(threads),
        "worker_fds": statistics.median(fds),
        "supervisor_fds": sup.num_fds(),
        "supervisor_rss_mb": sup.memory_info().rss / MB,
        "forkserver_fds": server.num_fds() if server else float("nan"),
    }


def one_run(
    folder: Path, count: int, settle: float, timeout: float, every: float = SAMPLE_EVERY
) -> dict[str, Any]:
    """One `chatq run` in `folder` (its stores are created, or reused from the last run)."""
    config = write_config(folder, count, healthy_after=None)
    sock = folder / "run" / "supervisor.sock"
    host_before, own_before = host_cpu(), own_cpu_s()
    started = time.monotonic()
    proc = start_chatq(config, ENV)
    try:
        result = watch_start(proc, sock, count, started, timeout, every=every)
        result.update(host_use(host_before, host_cpu()))
        result["chatq_start_cpu_s"] = session_cpu_s(proc.pid)
        result["bench_client_cpu_s"] = own_cpu_s() - own_before
        sup = psutil.Process(proc.pid)
        result["supervisor_start_cpu_s"] = cpu_s(proc.pid)
        server = fork_server(sup)
        result["forkserver_cpu_s"] = cpu_s(server.pid) if server else None
        time.sleep(settle)
        result.update(steady_list(sock, config))
        pids = [row["pid"] for row in request(sock, "list", timeout=30)]
        result.update(footprint(sup, pids))
        stopping = time.monotonic()
        os.kill(proc.pid, signal.SIGTERM)
        proc.wait(120)
        result["stop_all_s"] = time.monotonic() - stopping
        result["exit_code"] = proc.returncode
        result["left_running"] = sum(psutil.pid_exists(pid) for pid in pids)
        return result
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            with suppress(subprocess.TimeoutExpired):
                proc.wait(30)
        kill_session(proc.pid)
        with suppress(subprocess.TimeoutExpired):
            proc.wait(10)


def summarize(runs: list[dict[str, Any]]) -> dict[str, Any]:
    keys = [key for key, value in runs[0].items() if isinstance(value, (int, float))]
    summary: dict[str, Any] = {key: statistics.median(run[key] for run in runs) for key in keys}
    boots = [statistics.median(run["boot_cpu_ms"]) for run in runs]
    summary["boot_cpu_ms_median"] = statistics.median(boots)
    summary["boot_cpu_ms_runs"] = boots
    summary["boot_cpu_ms_p90"] = statistics.median(
        percentile(run["boot_cpu_ms"], 0.9) for run in runs
    )
    for key in ("all_running_s", "list_max_ms_during_start", "stop_all_s"):
        summary[f"{key}_runs"] = [run[key] for run in runs]
    return summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tenants", type=int, default=1000)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--settle", type=float, default=5.0)
    parser.add_argument("--timeout", type=float, default=180.0)
    parser.add_argument("--json", action="store_true")
    parser.add_argument(
        "--list-every",
        type=float,
        default=SAMPLE_EVERY,
        help="seconds between `list` requests during the start (each costs the start CPU)",
    )
    parser.add_argument(
        "--reuse-stores",
        action="store_true",
        help="start over existing stores (one unmeasured start creates them) instead of new ones",
    )
    parser.add_argument(
        "--code",
        type=Path,
        help="a folder holding a chatq/ package tree to run instead (a baseline checkout)",
    )
    args = parser.parse_args()
    if args.code is not None:
        ENV["PYTHONPATH"] = str(args.code.resolve())
    load = os.getloadavg()[0]
    runs = []
    with tempfile.TemporaryDirectory() as shared:
        if args.reuse_stores:
            one_run(Path(shared), args.tenants, 0.0, args.timeout)
        for _ in range(args.runs):
            with tempfile.TemporaryDirectory() as own:
                folder = Path(shared if args.reuse_stores else own)
                runs.append(
                    one_run(folder, args.tenants, args.settle, args.timeout, args.list_every)
                )
    summary = summarize(runs)
    summary.update(
        tenants=args.tenants,
        runs=args.runs,
        stores="reused" if args.reuse_stores else "new",
        load_before=load,
        load_after=os.getloadavg()[0],
        list_every_s=args.list_every,
        machine=f"{os.cpu_count()} CPU, {psutil.virtual_memory().total / 2**30:.0f} GB,"
        f" Python {platform.python_version()}",
    )
    if args.json:
        print(json.dumps(summary, indent=2))
        return
    s = summary
    print(
        f"{s['tenants']} echo tenants, {s['runs']} runs (medians), {s['stores']} stores,"
        f" {s['machine']}"
    )
    print(
        f"  all running {s['all_running_s']:.1f} s {fmt(s['all_running_s_runs'])};"
        f" control socket up after {s['socket_up_s']:.2f} s"
    )
    print(
        f"  list during the start: max {s['list_max_ms_during_start']:.0f} ms"
        f" {fmt(s['list_max_ms_during_start_runs'], 0)}, p99"
        f" {s['list_p99_ms_during_start']:.0f} ms ({s['list_samples']:.0f} samples; the"
        f" slowest asked {s['list_max_asked_at_s']:.2f} s after `chatq run`)"
    )
    print(
        f"  list at steady state: {s['list_ms_steady']:.0f} ms raw,"
        f" `chatq list --json` {s['cli_list_ms_steady']:.0f} ms"
    )
    print(f"  stop all: {s['stop_all_s']:.2f} s {fmt(s['stop_all_s_runs'], 2)}")
    print(
        f"  CPU to all running: supervisor {s['supervisor_start_cpu_s']:.2f} s,"
        f" fork server {s['forkserver_cpu_s']:.2f} s"
    )
    print(
        f"  the host's cores until all ran: busy {s['host_busy_frac']:.0%}, idle"
        f" {s['host_idle_frac']:.0%}, iowait {s['host_iowait_frac']:.0%}, steal"
        f" {s['host_steal_frac']:.0%}; this bench's own `list` client"
        f" {s['bench_client_cpu_s']:.1f} CPU-s; all of chatq's processes"
        f" {s['chatq_start_cpu_s']:.1f} CPU-s"
    )
    print(
        f"  worker boot CPU (fork to ready): median {s['boot_cpu_ms_median']:.1f} ms"
        f" {fmt(s['boot_cpu_ms_runs'], 1)}, p90 {s['boot_cpu_ms_p90']:.1f} ms"
    )
    print(
        f"  per worker: PSS {s['worker_pss_mb_median']:.1f} MB, USS"
        f" {s['worker_uss_mb_median']:.1f} MB, {s['worker_threads']:.0f} threads,"
        f" {s['worker_fds']:.0f} fds; all workers PSS {s['worker_pss_gb_total']:.2f} GB"
    )
    print(
        f"  supervisor {s['supervisor_fds']:.0f} fds, RSS {s['supervisor_rss_mb']:.0f} MB;"
        f" fork server {s['forkserver_fds']:.0f} fds"
    )
    print(f"  load average {s['load_before']:.2f} before, {s['load_after']:.2f} after")


def fmt(values: list[float], digits: int = 1) -> str:
    return "[" + " ".join(f"{value:.{digits}f}" for value in values) + "]"


if __name__ == "__main__":
    main()
