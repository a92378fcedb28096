"""Idle cost: the CPU that N idle echo tenants cost, driving the real `chatq run`.

    .venv/bin/python bench/idle_bench.py [--tenants 500] [--seconds 60] [--settle 10]
        [--repeat 3] [--json]

Starts `chatq run` with N idle echo tenants (1 s heartbeats, the default),
waits until all are `running` and then `--settle` seconds (first watchdog
passes, first full samples), then reads from /proc the CPU time
(/proc/PID/task/*/schedstat: all threads, user + system, in ns) of the
supervisor and of every worker over
`--seconds`, scaled to 60 s. Also the context switches per worker per
second: how often an idle worker wakes. A worker that was restarted during
the window fails the run (its CPU would be lost). Medians over `--repeat`
runs, each run a fresh `chatq run`.

Targets (issue #15, item 3): supervisor <= 0.5 CPU-s per 60 s, all workers
together <= 3 CPU-s per 60 s, at 500 tenants.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import psutil
from supervisor_bench import all_running, start_chatq, tenants, wait_for, write_config


def cpu_s(proc: psutil.Process) -> float:
    """CPU time of all its threads, from the scheduler's own count (ns), not clock ticks."""
    total = 0
    for task in os.listdir(f"/proc/{proc.pid}/task"):
        try:
            with open(f"/proc/{proc.pid}/task/{task}/schedstat") as file:
                total += int(file.read().split()[0])
        except FileNotFoundError:  # a thread that ended: its time is lost (idle: none end)
            pass
    return total / 1e9


def switches(proc: psutil.Process) -> int:
    counts = proc.num_ctx_switches()
    return int(counts.voluntary + counts.involuntary)


def one_run(count: int, seconds: float, settle: float) -> dict[str, float]:
    with tempfile.TemporaryDirectory() as tmp:
        config = write_config(Path(tmp), count)
        sock = Path(tmp) / "run" / "supervisor.sock"
        proc = start_chatq(config)
        try:
            wait_for(lambda: all_running(sock, count), 60 + count * 0.3, "all tenants up")
            time.sleep(settle)
            supervisor = psutil.Process(proc.pid)
            pids = sorted(t["pid"] for t in tenants(sock).values())
            workers = [psutil.Process(pid) for pid in pids]
            sup_before, sup_switched = cpu_s(supervisor), switches(supervisor)
            before = [cpu_s(w) for w in workers]
            switched = [switches(w) for w in workers]
            time.sleep(seconds)
            sup_after, sup_switched = cpu_s(supervisor), switches(supervisor) - sup_switched
            after = [cpu_s(w) for w in workers]
            switched = [switches(w) - s for w, s in zip(workers, switched, strict=True)]
            if sorted(t["pid"] for t in tenants(sock).values()) != pids:
                raise RuntimeError("a worker was restarted during the window")
            scale = 60 / seconds
            per_worker = [(a - b) * scale for a, b in zip(after, before, strict=True)]
            return {
                "supervisor_cpu_s_per_60s": (sup_after - sup_before) * scale,
                "workers_cpu_s_per_60s": sum(per_worker),
                "worker_cpu_ms_per_60s_median": statistics.median(per_worker) * 1000,
                "worker_switches_per_s_median": statistics.median(switched) / seconds,
                "supervisor_switches_per_s": sup_switched / seconds,
            }
        finally:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tenants", type=int, default=500)
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--settle", type=float, default=10.0)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    runs = [one_run(args.tenants, args.seconds, args.settle) for _ in range(args.repeat)]
    result: dict[str, Any] = {"tenants": args.tenants, "seconds": args.seconds, "runs": runs}
    for key in runs[0]:
        result[key] = statistics.median(run[key] for run in runs)
    result["load_average"] = os.getloadavg()
    if args.json:
        print(json.dumps(result, indent=2))
        return

    def spread(key: str) -> str:
        return " ".join(f"{run[key]:.2f}" for run in runs)

    print(
        f"{args.tenants} idle tenants, CPU-s per 60 s (median of {args.repeat}):"
        f" supervisor {result['supervisor_cpu_s_per_60s']:.2f}"
        f" [{spread('supervisor_cpu_s_per_60s')}],"
        f" workers together {result['workers_cpu_s_per_60s']:.2f}"
        f" [{spread('workers_cpu_s_per_60s')}]"
    )
    print(
        f"per worker: {result['worker_cpu_ms_per_60s_median']:.1f} ms CPU per 60 s,"
        f" {result['worker_switches_per_s_median']:.1f} context switches/s;"
        f" supervisor {result['supervisor_switches_per_s']:.1f} context switches/s;"
        f" load average {result['load_average'][0]:.2f}"
    )


if __name__ == "__main__":
    main()
