"""The `whatsapp` transport at a number's throughput tier, through the fake Graph API.

    .venv/bin/python bench/whatsapp_bench.py [--tiers 80 1000] [--replies 2000] [--repeat 3]

Per tier: a real worker (``python -m chatq.tenant_worker``: echo handler, transport
``whatsapp`` with ``messages_per_second`` = the tier, pointed at the fake
Graph API of tests/fake_graph.py on 127.0.0.1) gets --replies messages from
as many different users, posted at once in batches of 100; each is answered
by one reply. From the times the fake received the sends:

* achieved / tier: the mean count per full second from the first send
  ([t0, t0+1), [t0+1, t0+2), ...), over the tier (target >= 0.95);
* busiest / tier: the most sends in any 1 s window (two pointers over the
  sorted times), over the tier (must never exceed 1.0);
* span: first to last send;
* worker CPU per reply: the worker's user+system CPU from the first post to
  the last send, over the replies (it includes ingest and the handler).

The fake runs on a thread of this process (the messages are posted from a
child process, so nothing else here competes for its GIL); its receive times
still carry the scheduling jitter of a 2-CPU machine running both sides.
With --repeat N each figure is the median of N runs.
"""

from __future__ import annotations

import argparse
import asyncio
import bisect
import contextlib
import gc
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import aiohttp

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))  # the fake Graph API lives with the tests

from fake_graph import FakeGraph, fake_graph_in_thread  # noqa: E402
from worker_bench import ResourceWatch, wait_healthy, worker_env  # noqa: E402

TENANT = "wa"
BATCH = 100
TOKEN = "bench-token-not-secret"
TARGET_RATIO = 0.95
WORKER = (sys.executable, "-m", "chatq.tenant_worker")

Result = dict[str, float]


def write_config(folder: Path, graph_url: str, tier: int) -> Path:
    """A one-tenant whatsapp config: the tier is the only limit that binds."""
    text = f"""
[supervisor]
run_dir = "run"
data_dir = "data"
log_level = "WARNING"

[[tenants]]
id = "{TENANT}"
handler = "echo"
transport = "whatsapp"
max_queue_size = 1000000
[tenants.whatsapp]
phone_number_id = "106540352242922"
access_token = "{TOKEN}"
graph_url = "{graph_url}"
messages_per_second = {tier}
"""
    path = folder / "tenants.toml"
    path.write_text(text)
    return path


@contextlib.contextmanager
def running_worker(folder: Path, config: Path) -> Iterator[subprocess.Popen[bytes]]:
    """`python -m chatq.tenant_worker` on `config`, healthy; SIGTERMed (then killed) on exit."""
    log = folder / "worker.log"
    with log.open("wb") as err:
        proc = subprocess.Popen(
            [*WORKER, "--config", str(config), "--tenant", TENANT],
            cwd=folder,
            env=worker_env(),
            stdout=subprocess.DEVNULL,
            stderr=err,
        )
    try:
        socket = folder / "run" / f"{TENANT}.sock"
        if not asyncio.run(wait_healthy(socket, proc, 30)):
            raise RuntimeError(f"worker not healthy:\n{log.read_text()[-2000:]}")
        yield proc
    finally:
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


async def post_all(socket: Path, replies: int) -> None:
    """`replies` messages from as many users, in batches of BATCH, all at once."""
    messages = [{"id": f"m{n}", "chat_id": f"1555{n:07d}", "text": "hi"} for n in range(replies)]
    batches = [messages[s : s + BATCH] for s in range(0, replies, BATCH)]
    connector = aiohttp.UnixConnector(path=str(socket))
    async with aiohttp.ClientSession(connector=connector) as client:

        async def one(batch: list[dict[str, str]]) -> None:
            async with client.post("http://worker/messages", json=batch) as answer:
                if answer.status != 202:
                    raise RuntimeError(f"POST /messages: {answer.status}")

        await asyncio.gather(*(one(batch) for batch in batches))


def post_from_a_child(socket: Path, replies: int) -> None:
    """Post from another process: this one's GIL stays with the fake, whose clock is measured."""
    command = [sys.executable, __file__, "--post", str(socket), "--replies", str(replies)]
    subprocess.run(command, check=True, timeout=60)


def wait_sent(graph: FakeGraph, replies: int, proc: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + replies / 10 + 60
    while len(graph.requests) < replies:
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"{len(graph.requests)} of {replies} sends arrived")
        time.sleep(0.02)


def busiest_second(times: Sequence[float]) -> int:
    """The most sends in any half-open 1 s window."""
    return max(bisect.bisect_left(times, t + 1.0) - n for n, t in enumerate(times))


def per_full_second(times: Sequence[float]) -> float:
    """The mean count per whole second from the first send (the last, partial one left out)."""
    seconds = max(1, math.floor(times[-1] - times[0]))
    return bisect.bisect_left(times, times[0] + seconds) / seconds


@contextlib.contextmanager
def no_gc() -> Iterator[None]:
    """No collections in this process while measuring: they would stall the fake's clock."""
    gc.collect()
    gc.disable()
    try:
        yield
    finally:
        gc.enable()


def one_run(tier: int, replies: int) -> Result:
    with no_gc(), fake_graph_in_thread() as graph, tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        with running_worker(folder, write_config(folder, graph.url, tier)) as proc:
            with ResourceWatch(proc.pid) as watch:
                post_from_a_child(folder / "run" / f"{TENANT}.sock", replies)
                wait_sent(graph, replies, proc)
            times = sorted(r.at for r in graph.requests)
            if len(graph.sent()) != replies:
                raise RuntimeError(f"only {len(graph.sent())} of {replies} sends succeeded")
    return {
        "achieved_ratio": per_full_second(times) / tier,
        "busiest_ratio": busiest_second(times) / tier,
        "span_s": times[-1] - times[0],
        "cpu_ms_per_reply": watch.cpu_s * 1000 / replies,
    }


def report(tier: int, result: Result, runs: Sequence[Result]) -> str:
    met = "met" if result["achieved_ratio"] >= TARGET_RATIO else "MISSED"
    over = max(run["busiest_ratio"] for run in runs)
    return (
        f"tier {tier:>5}/s: achieved/tier {result['achieved_ratio']:.3f} ({met} >= {TARGET_RATIO}),"
        f" busiest 1 s/tier {result['busiest_ratio']:.3f} (max of runs {over:.3f}"
        f"{', OVER' if over > 1.0 else ''}), span {result['span_s']:.2f} s,"
        f" worker CPU {result['cpu_ms_per_reply']:.3f} ms/reply"
        f"  runs: {[round(r['achieved_ratio'], 3) for r in runs]}"
    )


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--tiers", type=int, nargs="+", default=[80, 1000])
    parser.add_argument("--replies", type=int, default=2000, help="a multiple of 100")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--json", action="store_true", help="print the figures as JSON")
    parser.add_argument("--post", metavar="SOCKET", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.post:
        asyncio.run(post_all(Path(args.post), args.replies))
        return
    if args.replies < BATCH or args.replies % BATCH or args.repeat < 1:
        parser.error(f"--replies must be a positive multiple of {BATCH}; --repeat >= 1")
    print(
        f"CPython {platform.python_version()}, {os.cpu_count()} CPUs;"
        f" {args.replies} replies to {args.replies} users; medians of {args.repeat}",
        file=sys.stderr,
    )
    figures = {}
    for tier in args.tiers:
        runs = [one_run(tier, args.replies) for _ in range(args.repeat)]
        median = {key: statistics.median(run[key] for run in runs) for key in runs[0]}
        figures[tier] = {"median": median, "runs": runs}
        if not args.json:
            print(report(tier, median, runs), flush=True)
    if args.json:
        print(json.dumps(figures, indent=2))


if __name__ == "__main__":
    main()
