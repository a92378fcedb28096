"""Throughput and memory of ChatQueueManager against two baselines.

Scenarios (an async no-op handler unless --handler yield):
  one_chat    1 chat x 200,000 messages, the producer keeping <= 50 pending
  chats_10k   10,000 chats x 20 messages, all enqueued up front
  chats_200k  200,000 chats x 1 message, all enqueued up front

Implementations:
  manager     tenant_worker.chat_queue.ChatQueueManager
  locks       a dict of asyncio.Lock per chat (``async def enqueue``), the
              straightforward port; its coroutines are wrapped in tasks so
              the producer can keep many in flight, as a caller must
  baseline    a plain loop creating and awaiting one Future per message

Each (scenario, implementation) runs in a fresh subprocess, so peak RSS is
its own; the baseline loop runs first in that same subprocess and the ratio
is msgs/s over the baseline's msgs/s of that run. Medians of --repeat runs.

    .venv/bin/python bench/queue_bench.py [--repeat 5] [--handler noop|yield] [--json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import resource
import statistics
import subprocess
import sys
import time
from collections import deque
from collections.abc import Awaitable, Callable
from typing import Any

from chatq.tenant_worker.chat_queue import ChatQueueManager

SCENARIOS: dict[str, tuple[int, int]] = {  # name: (chats, messages per chat)
    "one_chat": (1, 200_000),
    "chats_10k": (10_000, 20),
    "chats_200k": (200_000, 1),
}
IMPLS = ("manager", "locks")
WINDOW = 50
TARGETS = {"one_chat": 0.41, "chats_10k": 0.18, "chats_200k": 0.10}
RSS_TARGET_MB = 150.0

Handler = Callable[[], Awaitable[None]]


async def noop() -> None:
    return None


async def yielding() -> None:
    await asyncio.sleep(0)


class LockQueues:
    """The straightforward port: one asyncio.Lock per chat, freed when idle."""

    def __init__(self) -> None:
        self._locks: dict[str, tuple[asyncio.Lock, list[int]]] = {}

    async def enqueue(self, chat_id: str, execute: Handler) -> None:
        entry = self._locks.get(chat_id)
        if entry is None:
            entry = self._locks[chat_id] = (asyncio.Lock(), [0])
        lock, users = entry
        users[0] += 1
        try:
            async with lock:
                await execute()
        finally:
            users[0] -= 1
            if not users[0]:
                del self._locks[chat_id]


async def run_baseline(total: int) -> float:
    loop = asyncio.get_running_loop()
    start = time.perf_counter()
    for _ in range(total):
        fut: asyncio.Future[None] = loop.create_future()
        loop.call_soon(fut.set_result, None)
        await fut
    return total / (time.perf_counter() - start)


async def manager_one_chat(total: int, handler: Handler) -> None:
    manager = ChatQueueManager("bench", max_queue_size=WINDOW)
    window: deque[asyncio.Future[None]] = deque()
    for _ in range(total):
        window.append(manager.enqueue("chat", handler))
        if len(window) >= WINDOW:
            await window.popleft()
    while window:
        await window.popleft()


async def locks_one_chat(total: int, handler: Handler) -> None:
    queues = LockQueues()
    window: deque[asyncio.Task[None]] = deque()
    for _ in range(total):
        window.append(asyncio.create_task(queues.enqueue("chat", handler)))
        if len(window) >= WINDOW:
            await window.popleft()
    while window:
        await window.popleft()


async def manager_up_front(chats: int, per_chat: int, handler: Handler) -> None:
    manager = ChatQueueManager("bench", max_queue_size=max(per_chat, 1))
    ids = [f"chat-{n}" for n in range(chats)]
    futures = [manager.enqueue(chat, handler) for _ in range(per_chat) for chat in ids]
    for fut in futures:
        await fut


async def locks_up_front(chats: int, per_chat: int, handler: Handler) -> None:
    queues = LockQueues()
    ids = [f"chat-{n}" for n in range(chats)]
    tasks = [
        asyncio.create_task(queues.enqueue(chat, handler)) for _ in range(per_chat) for chat in ids
    ]
    for task in tasks:
        await task


async def one_run(scenario: str, impl: str, handler_name: str) -> dict[str, Any]:
    chats, per_chat = SCENARIOS[scenario]
    total = chats * per_chat
    handler = yielding if handler_name == "yield" else noop
    baseline = await run_baseline(total)
    start = time.perf_counter()
    if scenario == "one_chat":
        await (manager_one_chat if impl == "manager" else locks_one_chat)(total, handler)
    else:
        up_front = manager_up_front if impl == "manager" else locks_up_front
        await up_front(chats, per_chat, handler)
    rate = total / (time.perf_counter() - start)
    peak_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"msgs_per_s": rate, "baseline_per_s": baseline, "peak_rss_mb": peak_kb / 1024}


def child(argv: list[str]) -> None:
    scenario, impl, handler_name = argv
    print(json.dumps(asyncio.run(one_run(scenario, impl, handler_name))))


def spawn(scenario: str, impl: str, handler_name: str) -> dict[str, Any]:
    out = subprocess.run(
        [sys.executable, __file__, "--child", scenario, impl, handler_name],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    result: dict[str, Any] = json.loads(out)
    return result


def measure(repeat: int, handler_name: str) -> list[dict[str, Any]]:
    rows = []
    for scenario in SCENARIOS:
        for impl in IMPLS:
            runs = [spawn(scenario, impl, handler_name) for _ in range(repeat)]
            ratios = [r["msgs_per_s"] / r["baseline_per_s"] for r in runs]
            rows.append(
                {
                    "scenario": scenario,
                    "impl": impl,
                    "msgs_per_s": statistics.median(r["msgs_per_s"] for r in runs),
                    "baseline_per_s": statistics.median(r["baseline_per_s"] for r in runs),
                    "ratio": statistics.median(ratios),
                    "ratio_min": min(ratios),
                    "peak_rss_mb": statistics.median(r["peak_rss_mb"] for r in runs),
                }
            )
    return rows


def report(rows: list[dict[str, Any]], handler_name: str, repeat: int) -> str:
    lines = [
        f"python {platform.python_version()} on {platform.machine()}, handler={handler_name}, "
        f"medians of {repeat} runs",
        f"{'scenario':<11} {'impl':<8} {'msgs/s':>10} {'baseline/s':>11} "
        f"{'ratio':>6} {'min':>6} {'target':>7} {'peak MB':>8}",
    ]
    for row in rows:
        target = TARGETS[row["scenario"]] if row["impl"] == "manager" else None
        lines.append(
            f"{row['scenario']:<11} {row['impl']:<8} {row['msgs_per_s']:>10,.0f} "
            f"{row['baseline_per_s']:>11,.0f} {row['ratio']:>6.2f} {row['ratio_min']:>6.2f} "
            f"{'>=' + str(target) if target else '':>7} {row['peak_rss_mb']:>8.1f}"
        )
    lines.append(f"peak RSS target for manager in chats_200k: <= {RSS_TARGET_MB:.0f} MB")
    return "\n".join(lines)


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        child(sys.argv[2:])
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--handler", choices=("noop", "yield"), default="noop")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    rows = measure(args.repeat, args.handler)
    print(json.dumps(rows, indent=2) if args.json else report(rows, args.handler, args.repeat))


if __name__ == "__main__":
    main()
