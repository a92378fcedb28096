"""Density: what one more idle tenant costs in memory, driving the real `chatq run`.

    .venv/bin/python bench/density_bench.py [--tenants 100] [--settle 10] [--repeat 3] [--json]

Starts `chatq run` with N idle echo tenants, waits until all are `running`
and then `--settle` seconds (first heartbeats, first watchdog passes), and
reads every worker's USS (private memory: what the kernel frees if that one
worker goes) and PSS (its fair share of the pages it shares) from
/proc/PID/smaps via psutil.

Each run is a fresh `chatq run`; the figures are medians over `--repeat`
runs (the bracketed lists: each run's median).

Anchor, in the same run: one separately started Python process with the
same imports as a worker (``import chatq.tenant_worker.worker``), idle: what
a tenant would cost without the fork server's shared pages.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import psutil
from supervisor_bench import all_running, start_chatq, tenants, wait_for, write_config

MB = 2**20


def anchor_uss() -> float:
    """USS of a plain Python process that imported what a worker imports."""
    code = "import chatq.tenant_worker.worker, sys, time; print('up', flush=True); time.sleep(60)"
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE)
    try:
        assert proc.stdout is not None
        proc.stdout.readline()
        time.sleep(1)
        return float(psutil.Process(proc.pid).memory_full_info().uss)
    finally:
        proc.kill()
        proc.wait()


def fleet(count: int, settle: float) -> dict[str, float]:
    with tempfile.TemporaryDirectory() as tmp:
        config = write_config(Path(tmp), count)
        sock = Path(tmp) / "run" / "supervisor.sock"
        started = time.monotonic()
        proc = start_chatq(config)
        try:
            wait_for(lambda: all_running(sock, count), 60 + count * 0.2, "all tenants up")
            up = time.monotonic() - started
            time.sleep(settle)
            infos = [psutil.Process(t["pid"]).memory_full_info() for t in tenants(sock).values()]
            uss = [i.uss for i in infos]
            pss = [i.pss for i in infos]
            return {
                "tenants": count,
                "all_running_s": up,
                "uss_mb_median": statistics.median(uss) / MB,
                "uss_mb_max": max(uss) / MB,
                "pss_mb_median": statistics.median(pss) / MB,
                "pss_gb_total": sum(pss) / 2**30,
            }
        finally:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tenants", type=int, default=100)
    parser.add_argument("--settle", type=float, default=10.0)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    runs = [fleet(args.tenants, args.settle) for _ in range(args.repeat)]
    result: dict[str, Any] = {key: statistics.median(run[key] for run in runs) for key in runs[0]}
    result["runs_uss_mb"] = [round(run["uss_mb_median"], 2) for run in runs]
    result["runs_pss_mb"] = [round(run["pss_mb_median"], 2) for run in runs]
    result["load_average"] = os.getloadavg()
    result["anchor_uss_mb"] = anchor_uss() / MB
    result["uss_vs_anchor"] = result["uss_mb_median"] / result["anchor_uss_mb"]
    if args.json:
        print(json.dumps(result, indent=2))
        return
    print(
        f"{result['tenants']} idle tenants, all running in {result['all_running_s']:.1f} s:"
        f" worker USS median {result['uss_mb_median']:.1f} MB (max {result['uss_mb_max']:.1f}),"
        f" PSS median {result['pss_mb_median']:.1f} MB, PSS total {result['pss_gb_total']:.2f} GB"
        f" (medians of {args.repeat}: USS {result['runs_uss_mb']}, PSS {result['runs_pss_mb']})"
    )
    print(
        f"anchor: a separate Python process with a worker's imports, USS"
        f" {result['anchor_uss_mb']:.1f} MB; worker/anchor {result['uss_vs_anchor']:.2f};"
        f" load average {result['load_average'][0]:.2f}"
    )


if __name__ == "__main__":
    main()
