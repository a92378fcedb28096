"""Supervisor figures: restart latency, idle CPU, idle worker memory.

    .venv/bin/python bench/supervisor_bench.py [--kills 20] [--tenants 50]
        [--idle-seconds 60] [--supervisord PATH/TO/supervisord] [--json]

1. Restart latency: SIGKILL a worker of a running chatq supervisor (3 tenants,
   1 s heartbeats), then poll the control socket every 2 ms: time until the
   new PID is known, until its first heartbeat (the supervisor reports the
   heartbeat's age, so the beat's own time is recovered), until `running`.
   With --supervisord, the same kill on a supervisord program (polled over
   its XML-RPC) gives the baseline in the same run.
2. Idle cost: --tenants idle tenants at 1 s heartbeats; the supervisor's CPU
   seconds over --idle-seconds (after a warm-up), and each worker's USS
   (private memory: what one more tenant really costs). supervisord with the
   same number of idle programs, if given.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import xmlrpc.client
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psutil

from chatq.supervisor.control_client import request

ROOT = Path(__file__).resolve().parent.parent
POLL = 0.002


def write_config(folder: Path, tenants: int, healthy_after: float | None = 0.5) -> Path:
    """`tenants` echo tenants (t000, t001, ...); `healthy_after` 0.5 makes every
    kill a first failure (no backoff), None keeps chatq's default."""
    lines = [
        "[supervisor]",
        'run_dir = "run"',
        'data_dir = "data"',
        "heartbeat_interval_ms = 1000",
        'log_level = "WARNING"',
        "[defaults]",
        'handler = "echo"',
    ]
    if healthy_after is not None:
        lines.insert(4, f"healthy_after = {healthy_after}")
    width = max(3, len(str(tenants - 1)))
    for n in range(tenants):
        lines += ["[[tenants]]", f'id = "t{n:0{width}d}"']
    path = folder / "tenants.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


def start_chatq(config: Path, env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
    """`chatq run` in a session of its own (its workers stay in it: one killpg stops all)."""
    return subprocess.Popen(
        [sys.executable, "-m", "chatq.supervisor.cli", "run", "--config", str(config)],
        cwd=ROOT,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )


def wait_for(check: Callable[[], Any], timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            value = check()
        except Exception:
            value = None
        if value:
            return value
        time.sleep(0.01)
    raise TimeoutError(what)


def tenants(sock: Path) -> dict[str, dict[str, Any]]:
    return {t["tenant"]: t for t in request(sock, "list")}


def all_running(sock: Path, count: int) -> bool:
    listed = tenants(sock)
    return len(listed) == count and all(t["state"] == "running" for t in listed.values())


def one_kill(sock: Path, tenant: str) -> dict[str, float]:
    """SIGKILL one worker; seconds until new pid, first heartbeat, running."""
    old = tenants(sock)[tenant]["pid"]
    killed = time.monotonic()
    os.kill(old, signal.SIGKILL)
    found: dict[str, float] = {}
    while "running" not in found or "beat" not in found:
        asked = time.monotonic()
        info = request(sock, "list")
        mine = next(t for t in info if t["tenant"] == tenant)
        if mine["pid"] not in (None, old):
            found.setdefault("pid", asked - killed)
            if mine["heartbeat_seq"] == 1 and "beat" not in found:
                found["beat"] = asked - mine["last_heartbeat_age_s"] - killed
            elif mine["heartbeat_seq"] and "beat" not in found:
                found["beat"] = float("nan")  # missed the first beat: do not guess
            if mine["state"] == "running":
                found.setdefault("running", asked - killed)
        if asked - killed > 10:
            raise TimeoutError("worker did not come back in 10 s")
        time.sleep(POLL)
    return found


def chatq_restarts(kills: int) -> dict[str, list[float]]:
    with tempfile.TemporaryDirectory() as tmp:
        config = write_config(Path(tmp), 3)
        sock = Path(tmp) / "run" / "supervisor.sock"
        proc = start_chatq(config)
        try:
            wait_for(lambda: all_running(sock, 3), 30, "chatq up")
            samples: dict[str, list[float]] = {"pid": [], "beat": [], "running": []}
            for n in range(kills):
                for key, value in one_kill(sock, f"t{n % 3:03d}").items():
                    samples[key].append(value)
                time.sleep(0.7)  # past healthy_after: the next kill is a first failure
            return samples
        finally:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(30)


def idle_cost(tenant_count: int, seconds: float) -> dict[str, float]:
    with tempfile.TemporaryDirectory() as tmp:
        config = write_config(Path(tmp), tenant_count)
        sock = Path(tmp) / "run" / "supervisor.sock"
        proc = start_chatq(config)
        try:
            wait_for(lambda: all_running(sock, tenant_count), 120, "all tenants up")
            time.sleep(5)  # warm-up: first watchdog samples, settled pipes
            me = psutil.Process(proc.pid)
            before = me.cpu_times()
            time.sleep(seconds)
            after = me.cpu_times()
            cpu = (after.user + after.system) - (before.user + before.system)
            uss = [psutil.Process(t["pid"]).memory_full_info().uss for t in tenants(sock).values()]
            return {
                "supervisor_cpu_s_per_60s": cpu * 60 / seconds,
                "worker_uss_mb_median": statistics.median(uss) / 2**20,
                "worker_uss_mb_max": max(uss) / 2**20,
                "supervisor_rss_mb": me.memory_info().rss / 2**20,
            }
        finally:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(60)


def supervisord_conf(folder: Path, programs: int, port: int) -> Path:
    lines = [
        "[supervisord]",
        f"logfile={folder}/supervisord.log",
        f"pidfile={folder}/supervisord.pid",
        f"childlogdir={folder}",
        "nodaemon=true",
        "[inet_http_server]",
        f"port=127.0.0.1:{port}",
        "[rpcinterface:supervisor]",
        "supervisor.rpcinterface_factory = supervisor.rpcinterface:make_main_rpcinterface",
    ]
    for n in range(programs):
        lines += [
            f"[program:p{n:03d}]",
            f'command={sys.executable} -c "import time; time.sleep(10**6)"',
            "autorestart=true",
            "startsecs=0",
        ]
    path = folder / "supervisord.conf"
    path.write_text("\n".join(lines) + "\n")
    return path


def supervisord_restarts(binary: str, kills: int) -> list[float]:
    with tempfile.TemporaryDirectory() as tmp:
        port = 19_000 + os.getpid() % 1000
        proc = subprocess.Popen(
            [binary, "-c", str(supervisord_conf(Path(tmp), 3, port))],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        rpc: Any = xmlrpc.client.ServerProxy(f"http://127.0.0.1:{port}/RPC2").supervisor
        try:
            wait_for(lambda: all(p["pid"] for p in rpc.getAllProcessInfo()), 30, "supervisord")
            samples = []
            parent = psutil.Process(proc.pid)
            for n in range(kills):
                name = f"p{n % 3:03d}"
                old = rpc.getProcessInfo(name)["pid"]
                before = {child.pid for child in parent.children()}
                killed = time.monotonic()
                os.kill(old, signal.SIGKILL)
                # Watch /proc, not XML-RPC: a request would wake supervisord's
                # loop early and hide its 1 s poll.
                while not {child.pid for child in parent.children()} - before:
                    time.sleep(POLL)
                samples.append(time.monotonic() - killed)
                time.sleep(1.5)
            return samples
        finally:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(30)


def supervisord_idle(binary: str, programs: int, seconds: float) -> float:
    with tempfile.TemporaryDirectory() as tmp:
        port = 20_000 + os.getpid() % 1000
        proc = subprocess.Popen(
            [binary, "-c", str(supervisord_conf(Path(tmp), programs, port))],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        rpc: Any = xmlrpc.client.ServerProxy(f"http://127.0.0.1:{port}/RPC2").supervisor
        try:
            wait_for(lambda: all(p["pid"] for p in rpc.getAllProcessInfo()), 60, "supervisord")
            time.sleep(5)
            me = psutil.Process(proc.pid)
            before = me.cpu_times()
            time.sleep(seconds)
            after = me.cpu_times()
            return ((after.user + after.system) - (before.user + before.system)) * 60 / seconds
        finally:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(30)


def ms(values: list[float]) -> str:
    good = [v for v in values if not math.isnan(v)]  # NaN: a missed first beat
    if not good:
        return "n/a"
    low, mid, high = (f"{v * 1000:.0f}" for v in (min(good), statistics.median(good), max(good)))
    return f"median {mid} ms (min {low}, max {high}, n={len(good)})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kills", type=int, default=20)
    parser.add_argument("--tenants", type=int, default=50)
    parser.add_argument("--idle-seconds", type=float, default=60.0)
    parser.add_argument("--supervisord", default=None, help="path to a supervisord binary")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    result: dict[str, Any] = {"chatq_restart": chatq_restarts(args.kills)}
    if args.supervisord:
        result["supervisord_restart"] = supervisord_restarts(args.supervisord, args.kills)
    result["chatq_idle"] = idle_cost(args.tenants, args.idle_seconds)
    if args.supervisord:
        result["supervisord_idle_cpu_s_per_60s"] = supervisord_idle(
            args.supervisord, args.tenants, args.idle_seconds
        )
    if args.json:
        print(json.dumps(result, indent=2))
        return
    restart = result["chatq_restart"]
    print(f"chatq SIGKILL -> new pid known:   {ms(restart['pid'])}")
    print(f"chatq SIGKILL -> first heartbeat: {ms(restart['beat'])}")
    print(f"chatq SIGKILL -> running (Ready): {ms(restart['running'])}")
    if "supervisord_restart" in result:
        print(f"supervisord SIGKILL -> new pid:   {ms(result['supervisord_restart'])}")
    idle = result["chatq_idle"]
    print(
        f"chatq idle, {args.tenants} tenants: supervisor {idle['supervisor_cpu_s_per_60s']:.3f} "
        f"CPU-s per 60 s, rss {idle['supervisor_rss_mb']:.0f} MB; worker USS median "
        f"{idle['worker_uss_mb_median']:.1f} MB (max {idle['worker_uss_mb_max']:.1f})"
    )
    if "supervisord_idle_cpu_s_per_60s" in result:
        print(
            f"supervisord idle, {args.tenants} programs: "
            f"{result['supervisord_idle_cpu_s_per_60s']:.3f} CPU-s per 60 s"
        )


if __name__ == "__main__":
    main()
