"""What pruning a large store costs ingest: p99 commit latency with and without it.

    .venv/bin/python bench/retention_bench.py [--rows 1000000] [--rate 500]
        [--writers 10] [--window 5] [--json]

1. A store (Store.open: the real schema and pragmas, WAL, synchronous=FULL,
   auto_vacuum=INCREMENTAL) is filled with --rows processed messages, each
   with one sent reply, received 40 days ago (plain sqlite3, in bulk).
2. Load: --writers tasks write new messages through `Store.add_messages`
   (the call ingest awaits before its 202), one message per call, paced to
   --rate messages/s in all, from start to end; each call's latency is kept.
3. Meanwhile windows of --window seconds alternate: pruning (Retention's own
   steps, retention_days 30: under this load, its `BUSY` pace, or --batch
   and --pause) and idle, until every old row is
   gone (or --max-prune-seconds of pruning: finding the oldest rows is an
   index range, so a window costs the same early or late in a long prune).
   Alternating makes both sides share the machine's drift and noise.

The figure is p99(latency in pruning windows) / p99(latency in idle
windows). Also: the prune's rows/s (in pruning windows) and the file size
before and after (checkpointed).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sqlite3
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from chatq.tenant_worker.messages import Message
from chatq.tenant_worker.retention import BUSY, DAY, Pace, Retention
from chatq.tenant_worker.store import Store

CHUNK = 50_000


def fill(path: Path, rows: int) -> None:
    """`rows` old processed messages with one sent reply each."""
    old = time.time() - 40 * DAY
    with sqlite3.connect(path, isolation_level=None) as conn:
        for start in range(0, rows, CHUNK):
            n = range(start, min(rows, start + CHUNK))
            conn.execute("BEGIN")
            conn.executemany(
                "INSERT INTO messages (id, chat_id, text, received_at, status, attempts,"
                " updated_at) VALUES (?, ?, ?, ?, 'processed', 1, ?)",
                ((f"old{i}", f"chat{i % 1000}", f"hello {i}", old + i * 1e-3, old) for i in n),
            )
            conn.executemany(
                "INSERT INTO replies (id, message_id, chat_id, text, status, attempts,"
                " next_attempt_at, created_at, sent_at) VALUES (?, ?, ?, ?, 'sent', 1, ?, ?, ?)",
                ((i + 1, f"old{i}", f"chat{i % 1000}", f"reply {i}", old, old, old) for i in n),
            )
            conn.execute("COMMIT")
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    conn.close()


async def load(
    store: Store, rate: float, writers: int, done: asyncio.Event, on: list[bool]
) -> dict[bool, list[float]]:
    """Paced single-message writes until `done`; latencies by whether a prune window was on."""
    latencies: dict[bool, list[float]] = {False: [], True: []}
    interval = writers / rate
    counter = iter(range(10**9))

    async def writer(w: int) -> None:
        next_at = time.perf_counter() + w * interval / writers
        while not done.is_set():
            await asyncio.sleep(max(0.0, next_at - time.perf_counter()))
            next_at += interval
            n = next(counter)
            message = Message(f"new{n}", f"c{n % 100}", "hi", "bench", received_at=time.time())
            pruning = on[0]
            started = time.perf_counter()
            await store.add_messages([message])
            latencies[pruning].append(time.perf_counter() - started)

    await asyncio.gather(*(writer(w) for w in range(writers)))
    return latencies


async def prune_in_windows(
    store: Store, args: argparse.Namespace, on: list[bool]
) -> tuple[int, float]:
    """Alternate --window s of pruning (Retention's batches and pauses) with as long idle.

    Returns the messages deleted and the seconds spent in pruning windows.
    """
    busy = Pace(args.batch, args.pause)
    retention = Retention(store, 30, busy=busy)
    deleted, pruning_s = 0, 0.0
    while True:
        on[0] = True
        started = time.perf_counter()
        window_end = started + args.window
        more = True
        while more and time.perf_counter() < window_end:
            gone, more = await retention.step()
            deleted += gone
        pruning_s += time.perf_counter() - started
        on[0] = False
        if not more or pruning_s >= args.max_prune_seconds:
            return deleted, pruning_s
        await asyncio.sleep(args.window)


def summary(latencies: list[float]) -> dict[str, float]:
    ordered = sorted(latencies)
    return {
        "calls": len(ordered),
        "p50_ms": statistics.median(ordered) * 1000,
        "p99_ms": ordered[int(len(ordered) * 0.99) - 1] * 1000,
        "p999_ms": ordered[int(len(ordered) * 0.999) - 1] * 1000,
    }


def size(path: Path) -> int:
    with sqlite3.connect(path) as conn:
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    conn.close()
    return path.stat().st_size


async def run(args: argparse.Namespace, folder: Path) -> dict[str, Any]:
    path = folder / "bench.sqlite3"
    store = await Store.open(path, "bench")
    await store.close()
    started = time.perf_counter()
    fill(path, args.rows)
    print(f"filled {args.rows:,} rows in {time.perf_counter() - started:.1f}s", file=sys.stderr)
    before = size(path)
    store = await Store.open(path, "bench")
    on = [False]
    done = asyncio.Event()
    try:
        loading = asyncio.create_task(load(store, args.rate, args.writers, done, on))
        await asyncio.sleep(args.window)  # warm up: an idle window first
        deleted, prune_s = await prune_in_windows(store, args, on)
        await asyncio.sleep(args.window)
        done.set()
        latencies = await loading
    finally:
        await store.close()
    result = {
        "rows": args.rows,
        "deleted": deleted,
        "prune_s": prune_s,
        "prune_rows_per_s": deleted / prune_s,
        "size_before_mb": before / 2**20,
        "size_after_mb": size(path) / 2**20,
        "idle": summary(latencies[False]),
        "pruning": summary(latencies[True]),
    }
    result["p99_ratio"] = result["pruning"]["p99_ms"] / result["idle"]["p99_ms"]
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--rate", type=float, default=500.0, help="messages/s, all writers")
    parser.add_argument("--writers", type=int, default=10)
    parser.add_argument("--window", type=float, default=5.0, help="seconds per window")
    parser.add_argument(
        "--max-prune-seconds",
        type=float,
        default=float("inf"),
        help="stop after this long pruning (the rest stays): a sample of a long prune",
    )
    parser.add_argument(
        "--batch", type=int, default=BUSY.batch, help="messages per prune under load"
    )
    parser.add_argument(
        "--pause", type=float, default=BUSY.pause, help="seconds between prunes under load"
    )
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        result = asyncio.run(run(args, Path(folder)))
    if args.json:
        print(json.dumps(result, indent=2))
        return
    print(
        f"pruned {result['deleted']:,} of {result['rows']:,} rows in {result['prune_s']:.1f}s"
        f" ({result['prune_rows_per_s']:,.0f} rows/s);"
        f" file {result['size_before_mb']:.0f} MB -> {result['size_after_mb']:.0f} MB"
    )
    for phase in ("idle", "pruning"):
        s = result[phase]
        print(
            f"{phase:>9}: {s['calls']:>6} calls  p50 {s['p50_ms']:.2f} ms  p99 {s['p99_ms']:.2f} ms"
            f"  p99.9 {s['p999_ms']:.2f} ms"
        )
    print(f"p99 while pruning / p99 between prunes: {result['p99_ratio']:.2f}")


if __name__ == "__main__":
    main()
