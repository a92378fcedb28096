"""One tenant against four, under the real supervisor, at its default log level.

    .venv/bin/python bench/tenants_bench.py [--repeat 3] [--messages 40000]
        [--clients 8] [--log-level INFO] [--json]

`chatq run` (supervisor, fork server, one worker per tenant; echo handler,
local transport, rate limit and queue size out of the way; the supervisor's
stderr, where it relays every worker's log lines, to a file) with 1 tenant,
then with 4. Each tenant gets --messages messages, 100 per request, over
1,000 chats, from --clients concurrent aiohttp clients on its own unix
socket, all tenants at once. msgs/s = all messages / (first post -> the last
reply's `sent_at` in any store). The figure that matters is the ratio: four
tenants on two cores should do close to twice one tenant's work, and a log
line per reply, written by the worker and relayed by the supervisor, is what
used to eat that (issue #15).

Each figure is the median of --repeat runs; 1 and 4 tenants alternate.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import signal
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

from worker_bench import bodies, closed_loop, read_only, wait_healthy, worker_env

from chatq.config.settings import LOG_LEVELS

TARGET_RATIO = 1.9  # four tenants / one, issue #15 item 5


def write_config(folder: Path, tenants: int, log_level: str) -> Path:
    lines = [
        "[supervisor]",
        'run_dir = "run"',
        'data_dir = "data"',
        f'log_level = "{log_level}"',
        "[defaults]",
        'handler = "echo"',
        'transport = "local"',
        "rate_limit_per_minute = 100000000",
        "max_queue_size = 1000000",
    ]
    for n in range(tenants):
        lines += ["[[tenants]]", f'id = "t{n}"']
    path = folder / "tenants.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


def drained(db: sqlite3.Connection) -> bool:
    left = db.execute(
        "SELECT (SELECT COUNT(*) FROM messages WHERE status IN ('queued', 'processing'))"
        " + (SELECT COUNT(*) FROM replies WHERE status = 'pending')"
    ).fetchone()[0]
    return not left


def last_sent(db: sqlite3.Connection, expected: int) -> float:
    count, last = db.execute(
        "SELECT COUNT(*), MAX(sent_at) FROM replies WHERE status = 'sent'"
    ).fetchone()
    if count != expected:
        raise RuntimeError(f"{count} of {expected} replies sent")
    return float(last)


async def drive(sockets: Sequence[Path], messages: int, clients: int) -> float:
    """All tenants at once; the wall time of the first post."""
    batches = bodies("m", messages)
    started = time.time()
    await asyncio.gather(*(closed_loop(sock, batches, clients) for sock in sockets))
    return started


def one_run(tenants: int, messages: int, clients: int, log_level: str) -> float:
    """Msgs/s of `tenants` tenants under one supervisor."""
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        config = write_config(folder, tenants, log_level)
        with (folder / "supervisor.log").open("wb") as log:
            proc = subprocess.Popen(
                [sys.executable, "-m", "chatq.supervisor.cli", "run", "--config", str(config)],
                cwd=folder,
                env=worker_env(),
                stdout=subprocess.DEVNULL,
                stderr=log,
                start_new_session=True,
            )
        try:
            sockets = [folder / "run" / f"t{n}.sock" for n in range(tenants)]
            for sock in sockets:
                if not asyncio.run(wait_healthy(sock, proc, 60)):
                    raise RuntimeError(f"{sock.name} not healthy within 60 s")
            started = asyncio.run(drive(sockets, messages, clients))
            stores = [read_only(folder / "data" / f"t{n}.sqlite3") for n in range(tenants)]
            with contextlib.ExitStack() as closing:
                for db in stores:
                    closing.callback(db.close)
                deadline = time.monotonic() + 600
                while not all(drained(db) for db in stores):
                    if time.monotonic() > deadline or proc.poll() is not None:
                        raise RuntimeError("not drained (or the supervisor died)")
                    time.sleep(0.02)
                end = max(last_sent(db, messages) for db in stores)
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
    return tenants * messages / (end - started)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--messages", type=int, default=40_000, help="per tenant")
    parser.add_argument("--clients", type=int, default=8, help="per tenant")
    parser.add_argument("--repeat", type=int, default=1)
    parser.add_argument("--log-level", type=str.upper, choices=LOG_LEVELS, default="INFO")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    if args.messages < 100 or args.messages % 100:
        parser.error("--messages must be a positive multiple of 100")
    runs: dict[int, list[float]] = {1: [], 4: []}
    for n in range(args.repeat):
        for tenants in (1, 4):
            runs[tenants].append(one_run(tenants, args.messages, args.clients, args.log_level))
        print(
            f"run {n + 1}: 1 tenant {runs[1][-1]:,.0f} msgs/s, 4 tenants {runs[4][-1]:,.0f}",
            file=sys.stderr,
        )
    one, four = statistics.median(runs[1]), statistics.median(runs[4])
    ratios = [f / o for o, f in zip(runs[1], runs[4], strict=True)]
    ratio = statistics.median(ratios)
    if args.json:
        print(json.dumps({"one": one, "four": four, "ratio": ratio, "runs": runs}, indent=2))
        return
    verdict = "met" if ratio >= TARGET_RATIO else "MISSED"
    print(
        f"CPython {platform.python_version()}, {os.cpu_count()} CPUs; log level"
        f" {args.log_level}; {args.messages:,} messages per tenant, {args.clients} clients"
        f" each; medians of {args.repeat}\n"
        f"1 tenant   {one:>10,.0f} msgs/s  {[round(r) for r in runs[1]]}\n"
        f"4 tenants  {four:>10,.0f} msgs/s  {[round(r) for r in runs[4]]}\n"
        f"4 / 1      {ratio:>10.2f}x        {[round(r, 2) for r in ratios]}"
        f"  >= {TARGET_RATIO}x {verdict}"
    )


if __name__ == "__main__":
    main()
