"""One tenant worker end to end, beside the limits it is measured against.

    .venv/bin/python bench/worker_bench.py [--repeat 3] [--quick] [--json]
        [--messages 100000] [--clients 8] [--seconds 30] [--log-level WARNING]

A real worker (``python -m chatq.tenant_worker``: echo handler, local transport,
``rate_limit_per_minute`` far out of reach, 1,000 chats) is fed batches of
100 messages over its unix socket by aiohttp clients:

1. latency: open loop at a fixed 1,000 msg/s (one batch every 100 ms) for
   --seconds; per message, from the store, ingest-to-processed
   (``updated_at - received_at``) and ingest-to-sent (the reply's
   ``sent_at``), plus the client's post-to-202 time per request. Peak RSS,
   after a warm-up of 2,000 messages at the same rate.
2. throughput: --clients concurrent clients post --messages as fast as they
   are acknowledged; msgs/s = messages / (first post -> last reply ``sent_at``).
   The worker's CPU use and peak RSS over the same span.

Limits, measured in the same run:

* sqlite insert: plain ``sqlite3``, same schema and pragmas (WAL,
  synchronous=FULL), 100 rows per transaction: rows/s.
* sqlite lifecycle: the writes the worker made per message before issue #15
  (insert, mark processing, mark processed + insert reply, mark sent), each
  kind 100 rows per transaction, as four transactions: msgs/s at perfect
  batching.
* sqlite 2-write lifecycle (issue #15's anchor): insert 100 messages; then,
  in one transaction, mark them processed and insert their replies.
* aiohttp hello: an aiohttp app on a unix socket in its own process that
  reads the body and answers 202 with a fixed JSON; the same client,
  concurrency and bodies: requests/s (the worker's is msgs/s / 100).

Every run starts a fresh worker and store in a temporary folder (its log
goes to worker.log there; --log-level INFO makes the local transport log
every reply). With --repeat N each figure is the median of N runs.
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
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import aiohttp
import psutil
from aiohttp import web

from chatq.config.loader import ENV_VARIABLES
from chatq.config.settings import LOG_LEVELS
from chatq.tenant_worker.store import MIGRATIONS

ROOT = Path(__file__).resolve().parent.parent

TENANT = "bench"
BATCH = 100  # messages per request, as the issue asks
CHATS = 1000
LATENCY_RATE = 1000.0  # msg/s, the WhatsApp Cloud API's cap per number
TARGETS = {
    "e2e_msgs_per_s": 10_000.0,
    "vs_sqlite_two_writes": 0.8,  # issue #15 item 5
    "p99_processed_ms": 50.0,
    "rss_latency_mb": 60.0,
}
AT_LEAST = ("e2e_msgs_per_s", "vs_sqlite_two_writes")

Result = dict[str, float]


@dataclass(frozen=True)
class Plan:
    """What one run does."""

    messages: int
    clients: int
    seconds: float
    warmup: int
    hello_requests: int
    log_level: str


# -- the worker ---------------------------------------------------------------


def write_config(folder: Path, log_level: str) -> Path:
    """A one-tenant config whose limits stay out of the way of the measurement."""
    text = f"""
[supervisor]
run_dir = "run"
data_dir = "data"
log_level = "{log_level}"

[[tenants]]
id = "{TENANT}"
handler = "echo"
transport = "local"
rate_limit_per_minute = 100000000  # the outbox limiter is not what is measured
max_queue_size = 1000000           # a backlog of 100k must not turn into QUEUE_FULL
"""
    path = folder / "tenants.toml"
    path.write_text(text)
    return path


def worker_env() -> dict[str, str]:
    """This environment, less chatq's overrides."""
    return {k: v for k, v in os.environ.items() if k not in ENV_VARIABLES}


class ResourceWatch:
    """Samples a process's RSS in a thread; reports the peak and CPU seconds used."""

    def __init__(self, pid: int, every: float = 0.05) -> None:
        self._proc = psutil.Process(pid)
        self._every = every
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self.peak_rss = 0
        self.cpu_s = 0.0
        self._cpu0 = 0.0

    def __enter__(self) -> ResourceWatch:
        self._cpu0 = self._cpu()
        self._thread.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self._done.set()
        self._thread.join()
        self.cpu_s = self._cpu() - self._cpu0

    def _cpu(self) -> float:
        times = self._proc.cpu_times()
        return float(times.user + times.system)

    def _sample(self) -> None:
        while not self._done.wait(self._every):
            self.peak_rss = max(self.peak_rss, self._proc.memory_info().rss)


class Worker:
    """A `python -m chatq.tenant_worker` subprocess in `folder`; stderr goes to a file."""

    def __init__(self, folder: Path, log_level: str) -> None:
        config = write_config(folder, log_level)
        self.socket = folder / "run" / f"{TENANT}.sock"
        self.db = folder / "data" / f"{TENANT}.sqlite3"
        self.log = folder / "worker.log"
        with self.log.open("wb") as log:
            self.proc = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "chatq.tenant_worker",
                    "--config",
                    str(config),
                    "--tenant",
                    TENANT,
                ],
                cwd=folder,  # no stray .env is read
                env=worker_env(),
                stdout=subprocess.DEVNULL,
                stderr=log,
            )

    def fail(self, what: str) -> RuntimeError:
        tail = self.log.read_text(errors="replace")[-2000:]
        return RuntimeError(f"worker: {what}; its log ends with:\n{tail}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


async def wait_healthy(socket: Path, proc: subprocess.Popen[bytes], within: float) -> bool:
    """Poll GET /health on the socket until 200; False if the process died or time ran out."""
    deadline = time.monotonic() + within
    while time.monotonic() < deadline and proc.poll() is None:
        with contextlib.suppress(aiohttp.ClientError, OSError):
            async with (
                aiohttp.ClientSession(connector=aiohttp.UnixConnector(path=str(socket))) as s,
                s.get("http://worker/health") as response,
            ):
                if response.status == 200:
                    return True
        await asyncio.sleep(0.05)
    return False


@contextlib.contextmanager
def running_worker(folder: Path, log_level: str) -> Iterator[Worker]:
    worker = Worker(folder, log_level)
    try:
        if not asyncio.run(wait_healthy(worker.socket, worker.proc, 30)):
            raise worker.fail("not healthy within 30 s")
        yield worker
    finally:
        worker.stop()


# -- the client ---------------------------------------------------------------


def bodies(prefix: str, count: int) -> list[bytes]:
    """JSON bodies of BATCH messages each; ids time-ordered, chats round-robin."""
    out = []
    for start in range(0, count, BATCH):
        batch = [
            {"id": f"{prefix}-{n:09d}", "chat_id": f"chat-{n % CHATS}", "text": f"hello {n}"}
            for n in range(start, min(start + BATCH, count))
        ]
        out.append(json.dumps(batch).encode())
    return out


def session(socket: Path, limit: int) -> aiohttp.ClientSession:
    connector = aiohttp.UnixConnector(path=str(socket), limit=limit)
    return aiohttp.ClientSession(connector=connector, headers={"Content-Type": "application/json"})


async def post(client: aiohttp.ClientSession, body: bytes) -> float:
    """POST one batch; the seconds until its 202. Anything else is an error."""
    start = time.perf_counter()
    async with client.post("http://worker/messages", data=body) as response:
        answer = await response.read()
        if response.status != 202:
            raise RuntimeError(f"POST /messages: {response.status} {answer[:200]!r}")
    return time.perf_counter() - start


async def closed_loop(socket: Path, batches: Sequence[bytes], clients: int) -> tuple[float, float]:
    """`clients` posters share the batches; (wall time of first post, seconds to last 202)."""
    todo = iter(batches)

    async def poster(client: aiohttp.ClientSession) -> None:
        for body in todo:  # one shared iterator: each batch is posted once
            await post(client, body)

    async with session(socket, clients) as client:
        started_wall, started = time.time(), time.perf_counter()
        await asyncio.gather(*(poster(client) for _ in range(clients)))
        return started_wall, time.perf_counter() - started


async def open_loop(
    socket: Path, batches: Sequence[bytes], interval: float
) -> tuple[list[float], float]:
    """Post one batch every `interval` s whatever the answers.

    Returns each request's seconds to its 202 and the worst lateness of a post
    against its schedule (the client keeping up is part of the measurement).
    """
    loop = asyncio.get_running_loop()
    async with session(socket, 0) as client:
        start = loop.time()
        tasks = []
        late = 0.0
        for k, body in enumerate(batches):
            due = start + k * interval
            await asyncio.sleep(max(0.0, due - loop.time()))
            late = max(late, loop.time() - due)
            tasks.append(asyncio.create_task(post(client, body)))
        return list(await asyncio.gather(*tasks)), late


# -- reading the store ----------------------------------------------------------


def read_only(db: Path) -> sqlite3.Connection:
    return sqlite3.connect(f"{db.resolve().as_uri()}?mode=ro", uri=True, timeout=5.0)


def wait_drained(worker: Worker, timeout: float = 600.0) -> None:
    """Until no message is unfinished and no reply pending (the store's partial indexes)."""
    deadline = time.monotonic() + timeout
    with contextlib.closing(read_only(worker.db)) as db:
        while time.monotonic() < deadline:
            if worker.proc.poll() is not None:
                raise worker.fail(f"exited with {worker.proc.returncode}")
            left = db.execute(
                "SELECT (SELECT COUNT(*) FROM messages WHERE status IN ('queued', 'processing'))"
                " + (SELECT COUNT(*) FROM replies WHERE status = 'pending')"
            ).fetchone()[0]
            if not left:
                return
            time.sleep(0.02)
    raise worker.fail(f"not drained within {timeout:.0f} s")


def timings(db_path: Path, prefix: str, expected: int) -> list[tuple[float, float, float]]:
    """(received_at, processed at, reply sent_at) per message of `prefix`; all must be done."""
    with contextlib.closing(read_only(db_path)) as db:
        rows = db.execute(
            "SELECT m.received_at, m.updated_at, r.sent_at FROM messages m"
            " JOIN replies r ON r.message_id = m.id"
            " WHERE m.id >= ? AND m.id < ? AND m.status = 'processed' AND r.status = 'sent'",
            (f"{prefix}-", f"{prefix}."),  # '.' sorts right after '-': the prefix's range
        ).fetchall()
    if len(rows) != expected:
        raise RuntimeError(f"{prefix}: {len(rows)} of {expected} messages processed and sent")
    return [(float(a), float(b), float(c)) for a, b, c in rows]


def percentile(values: Sequence[float], pct: int) -> float:
    return statistics.quantiles(values, n=100, method="inclusive")[pct - 1]


# -- the two worker phases -----------------------------------------------------


def latency_phase(worker: Worker, plan: Plan) -> Result:
    count = int(LATENCY_RATE * plan.seconds) // BATCH * BATCH
    batches = bodies("lat", count)
    with ResourceWatch(worker.proc.pid) as watch:
        acks, late = asyncio.run(open_loop(worker.socket, batches, BATCH / LATENCY_RATE))
        wait_drained(worker)
    rows = timings(worker.db, "lat", count)
    processed = [(done - received) * 1000 for received, done, _ in rows]
    sent = [(sent - received) * 1000 for received, _, sent in rows]
    ack_ms = [a * 1000 for a in acks]
    return {
        "p50_processed_ms": percentile(processed, 50),
        "p99_processed_ms": percentile(processed, 99),
        "max_processed_ms": max(processed),
        "p50_sent_ms": percentile(sent, 50),
        "p99_sent_ms": percentile(sent, 99),
        "p50_ack_ms": percentile(ack_ms, 50),
        "p99_ack_ms": percentile(ack_ms, 99),
        "rss_latency_mb": watch.peak_rss / 2**20,
        "cpu_latency_pct": 100 * watch.cpu_s / plan.seconds,
        "post_late_max_ms": late * 1000,
    }


def throughput_phase(worker: Worker, plan: Plan) -> Result:
    batches = bodies("tput", plan.messages)
    with ResourceWatch(worker.proc.pid) as watch:
        started_wall, acked = asyncio.run(closed_loop(worker.socket, batches, plan.clients))
        wait_drained(worker)
    last_sent = max(sent for _, _, sent in timings(worker.db, "tput", plan.messages))
    elapsed = last_sent - started_wall
    return {
        "e2e_msgs_per_s": plan.messages / elapsed,
        "ack_msgs_per_s": plan.messages / acked,
        "worker_req_per_s": plan.messages / BATCH / elapsed,
        "cpu_throughput_pct": 100 * watch.cpu_s / elapsed,
        "rss_throughput_mb": watch.peak_rss / 2**20,
        # Drained, with the dedup cache full (default 10k ids): the steady state
        # that hours at 1,000 msg/s reach.
        "rss_after_mb": rss_mb(worker),
    }


def rss_mb(worker: Worker) -> float:
    return float(psutil.Process(worker.proc.pid).memory_info().rss) / 2**20


def worker_phases(plan: Plan) -> Result:
    with tempfile.TemporaryDirectory() as tmp, running_worker(Path(tmp), plan.log_level) as worker:
        idle = rss_mb(worker)
        if plan.warmup:  # first requests pay imports and caches; not what is measured
            # At the latency phase's rate: a burst here would leave its own
            # high-water mark in the RSS the latency phase reports as "@1,000
            # msg/s" (memory freed after a burst mostly stays with the
            # process); full-speed RSS is the throughput phase's figure.
            warm = bodies("warm", plan.warmup)
            asyncio.run(open_loop(worker.socket, warm, BATCH / LATENCY_RATE))
            wait_drained(worker)
        result = {"rss_idle_mb": idle, **latency_phase(worker, plan)}
        result.update(throughput_phase(worker, plan))
        return result


# -- the limits -----------------------------------------------------------------


def new_store_file(path: Path) -> sqlite3.Connection:
    """A plain sqlite3 connection to a new file with the worker's schema and pragmas."""
    db = sqlite3.connect(path, isolation_level=None)
    db.execute("PRAGMA journal_mode = WAL")
    db.execute("PRAGMA synchronous = FULL")
    db.execute("PRAGMA foreign_keys = ON")
    for statement in MIGRATIONS[0]:
        db.execute(statement)
    return db


def in_transaction(db: sqlite3.Connection, sql: str, rows: list[tuple[Any, ...]]) -> None:
    db.execute("BEGIN IMMEDIATE")
    db.executemany(sql, rows)
    db.execute("COMMIT")


INSERT_MESSAGE = (
    "INSERT INTO messages (id, chat_id, text, received_at, status, updated_at)"
    " VALUES (?, ?, ?, ?, 'queued', ?)"
)


def message_rows(start: int, now: float) -> list[tuple[Any, ...]]:
    return [
        (f"m-{n:09d}", f"chat-{n % CHATS}", f"hello {n}", now, now)
        for n in range(start, start + BATCH)
    ]


def sqlite_insert(rows: int) -> float:
    """Rows/s of batched inserts (BATCH rows per transaction)."""
    with (
        tempfile.TemporaryDirectory() as tmp,
        contextlib.closing(new_store_file(Path(tmp) / "raw.sqlite3")) as db,
    ):
        start = time.perf_counter()
        for first in range(0, rows, BATCH):
            in_transaction(db, INSERT_MESSAGE, message_rows(first, time.time()))
        return rows / (time.perf_counter() - start)


def lifecycle_batch(db: sqlite3.Connection, first: int) -> None:
    """The worker's four writes for BATCH messages, each one transaction."""
    now = time.time()
    ids = [(f"m-{n:09d}",) for n in range(first, first + BATCH)]
    in_transaction(db, INSERT_MESSAGE, message_rows(first, now))
    in_transaction(
        db,
        "UPDATE messages SET status = 'processing', attempts = 1, updated_at = ? WHERE id = ?",
        [(now, i) for (i,) in ids],
    )
    db.execute("BEGIN IMMEDIATE")
    db.executemany(
        "UPDATE messages SET status = 'processed', updated_at = ? WHERE id = ?",
        [(now, i) for (i,) in ids],
    )
    db.executemany(
        "INSERT INTO replies (id, message_id, chat_id, text, status, next_attempt_at, created_at)"
        " VALUES (?, ?, ?, 'echo', 'pending', ?, ?)",
        [(first + k + 1, i, f"chat-{(first + k) % CHATS}", now, now) for k, (i,) in enumerate(ids)],
    )
    db.execute("COMMIT")
    in_transaction(
        db,
        "UPDATE replies SET status = 'sent', attempts = 1, provider_id = 'x', sent_at = ?"
        " WHERE id = ?",
        [(now, first + k + 1) for k in range(BATCH)],
    )


def two_write_batch(db: sqlite3.Connection, first: int) -> None:
    """The least a worker must write for BATCH messages: insert; processed + replies."""
    now = time.time()
    ids = [f"m-{n:09d}" for n in range(first, first + BATCH)]
    in_transaction(db, INSERT_MESSAGE, message_rows(first, now))
    db.execute("BEGIN IMMEDIATE")
    db.executemany(
        "UPDATE messages SET status = 'processed', attempts = 1, updated_at = ? WHERE id = ?",
        [(now, i) for i in ids],
    )
    db.executemany(
        "INSERT INTO replies (id, message_id, chat_id, text, status, next_attempt_at, created_at)"
        " VALUES (?, ?, ?, 'echo', 'pending', ?, ?)",
        [(first + k + 1, i, f"chat-{(first + k) % CHATS}", now, now) for k, i in enumerate(ids)],
    )
    db.execute("COMMIT")


def sqlite_batches(messages: int, batch: Callable[[sqlite3.Connection, int], None]) -> float:
    """Msgs/s of `batch` run over `messages` in a fresh store file, BATCH at a time."""
    with (
        tempfile.TemporaryDirectory() as tmp,
        contextlib.closing(new_store_file(Path(tmp) / "life.sqlite3")) as db,
    ):
        start = time.perf_counter()
        for first in range(0, messages, BATCH):
            batch(db, first)
        return messages / (time.perf_counter() - start)


def serve_hello(socket: str) -> None:
    """The hello-world baseline server (run in its own process by `hello_world`)."""

    async def messages(request: web.Request) -> web.Response:
        await request.read()
        return web.json_response({"accepted": BATCH, "duplicates": 0, "rejected": 0}, status=202)

    async def health(_request: web.Request) -> web.Response:
        return web.json_response({"status": "running"})

    app = web.Application(client_max_size=1 << 20)
    app.router.add_post("/messages", messages)
    app.router.add_get("/health", health)
    web.run_app(app, path=socket, access_log=None, print=None)


def hello_world(plan: Plan) -> float:
    """Requests/s of the hello-world server with the worker's client, body size and concurrency."""
    batches = bodies("hello", BATCH) * plan.hello_requests  # it never reads the ids
    with tempfile.TemporaryDirectory() as tmp:
        socket = Path(tmp) / "hello.sock"
        proc = subprocess.Popen(
            [sys.executable, __file__, "--serve-hello", str(socket)], env=worker_env()
        )
        try:
            if not asyncio.run(wait_healthy(socket, proc, 30)):
                raise RuntimeError("hello-world server did not start")
            _, seconds = asyncio.run(closed_loop(socket, batches, plan.clients))
        finally:
            proc.terminate()
            proc.wait(30)
    return len(batches) / seconds


def limits(plan: Plan) -> Result:
    return {
        "sqlite_insert_rows_per_s": sqlite_insert(plan.messages),
        "sqlite_lifecycle_msgs_per_s": sqlite_batches(plan.messages, lifecycle_batch),
        "sqlite_two_writes_msgs_per_s": sqlite_batches(plan.messages, two_write_batch),
        "hello_req_per_s": hello_world(plan),
    }


# -- running and reporting ------------------------------------------------------


def one_run(plan: Plan) -> Result:
    result = limits(plan)
    result.update(worker_phases(plan))
    result["vs_sqlite_insert"] = result["e2e_msgs_per_s"] / result["sqlite_insert_rows_per_s"]
    result["vs_sqlite_lifecycle"] = result["e2e_msgs_per_s"] / result["sqlite_lifecycle_msgs_per_s"]
    result["vs_sqlite_two_writes"] = (
        result["e2e_msgs_per_s"] / result["sqlite_two_writes_msgs_per_s"]
    )
    result["vs_hello"] = result["worker_req_per_s"] / result["hello_req_per_s"]
    return result


def medians(runs: Sequence[Result]) -> Result:
    return {key: statistics.median(run[key] for run in runs) for key in runs[0]}


ROWS: tuple[tuple[str, str, str], ...] = (  # key, label, format
    ("e2e_msgs_per_s", "worker end to end (first post -> last reply sent)", "{:,.0f} msgs/s"),
    ("ack_msgs_per_s", "worker ingest (first post -> last 202)", "{:,.0f} msgs/s"),
    ("worker_req_per_s", "worker requests (e2e / 100)", "{:,.0f} req/s"),
    ("cpu_throughput_pct", "worker CPU while at full speed", "{:.0f} %"),
    ("rss_throughput_mb", "worker peak RSS at full speed", "{:.1f} MB"),
    ("p50_processed_ms", "p50 ingest -> processed @1,000 msg/s", "{:.1f} ms"),
    ("p99_processed_ms", "p99 ingest -> processed @1,000 msg/s", "{:.1f} ms"),
    ("max_processed_ms", "max ingest -> processed @1,000 msg/s", "{:.1f} ms"),
    ("p50_sent_ms", "p50 ingest -> reply sent @1,000 msg/s", "{:.1f} ms"),
    ("p99_sent_ms", "p99 ingest -> reply sent @1,000 msg/s", "{:.1f} ms"),
    ("p50_ack_ms", "p50 post -> 202 (100 msgs) @1,000 msg/s", "{:.1f} ms"),
    ("p99_ack_ms", "p99 post -> 202 (100 msgs) @1,000 msg/s", "{:.1f} ms"),
    ("post_late_max_ms", "client: worst post lateness @1,000 msg/s", "{:.1f} ms"),
    ("cpu_latency_pct", "worker CPU @1,000 msg/s", "{:.0f} %"),
    ("rss_idle_mb", "worker RSS idle, after boot", "{:.1f} MB"),
    ("rss_latency_mb", "worker peak RSS @1,000 msg/s", "{:.1f} MB"),
    ("rss_after_mb", "worker RSS after the run, drained", "{:.1f} MB"),
    ("sqlite_insert_rows_per_s", "limit: sqlite3 insert, 100 rows/txn", "{:,.0f} rows/s"),
    ("sqlite_lifecycle_msgs_per_s", "limit: sqlite3 worker writes, 100/txn", "{:,.0f} msgs/s"),
    ("sqlite_two_writes_msgs_per_s", "limit: sqlite3 2-write lifecycle, 100/txn", "{:,.0f} msgs/s"),
    ("hello_req_per_s", "limit: aiohttp hello-world, unix socket", "{:,.0f} req/s"),
    ("vs_sqlite_insert", "worker e2e / sqlite insert", "{:.2f}x"),
    ("vs_sqlite_lifecycle", "worker e2e / sqlite worker writes", "{:.2f}x"),
    ("vs_sqlite_two_writes", "worker e2e / sqlite 2-write lifecycle", "{:.2f}x"),
    ("vs_hello", "worker req/s / hello-world req/s", "{:.2f}x"),
)
TARGET_TEXT = {
    "e2e_msgs_per_s": ">= 10,000",
    "vs_sqlite_two_writes": ">= 0.8x",
    "p99_processed_ms": "<= 50",
    "rss_latency_mb": "<= 60",
}


def meets(key: str, value: float) -> str:
    if key not in TARGETS:
        return ""
    ok = value >= TARGETS[key] if key in AT_LEAST else value <= TARGETS[key]
    return f"{TARGET_TEXT[key]} {'met' if ok else 'MISSED'}"


def report(result: Result, plan: Plan, repeat: int) -> str:
    lines = [
        f"CPython {platform.python_version()}, {os.cpu_count()} CPUs; {plan.messages:,} messages,"
        f" {plan.clients} clients, {BATCH}/request, {CHATS} chats, worker log {plan.log_level};"
        f" medians of {repeat} run(s)",
    ]
    for key, label, fmt in ROWS:
        lines.append(f"{label:<52} {fmt.format(result[key]):>16}  {meets(key, result[key])}")
    return "\n".join(lines)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--messages", type=int, default=100_000, help="throughput phase size")
    parser.add_argument("--clients", type=int, default=8, help="concurrent posting clients")
    parser.add_argument("--seconds", type=float, default=30.0, help="latency phase length")
    parser.add_argument("--repeat", type=int, default=1, help="runs; figures are medians")
    parser.add_argument(
        "--log-level", type=str.upper, choices=LOG_LEVELS, default="WARNING", help="worker's"
    )
    parser.add_argument("--quick", action="store_true", help="a short smoke run")
    parser.add_argument("--json", action="store_true", help="print the figures as JSON")
    parser.add_argument("--serve-hello", metavar="SOCKET", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.quick:
        args.messages, args.seconds = 5_000, 2.0
    if args.messages < BATCH or args.messages % BATCH:
        parser.error(f"--messages must be a positive multiple of {BATCH}")
    if args.clients < 1 or args.repeat < 1 or args.seconds < 1:
        parser.error("--clients and --repeat must be >= 1, --seconds >= 1")
    return args


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    if args.serve_hello:
        serve_hello(args.serve_hello)
        return
    plan = Plan(
        messages=args.messages,
        clients=args.clients,
        seconds=args.seconds,
        warmup=min(2_000, args.messages),
        hello_requests=500 if args.quick else 5_000,
        log_level=args.log_level,
    )
    runs = []
    for n in range(args.repeat):
        runs.append(one_run(plan))
        if not args.json and args.repeat > 1:
            print(
                f"run {n + 1}: {json.dumps({k: round(v, 3) for k, v in runs[-1].items()})}",
                file=sys.stderr,
            )
    result = medians(runs)
    if args.json:
        machine = {"python": platform.python_version(), "cpus": os.cpu_count()}
        print(
            json.dumps({"plan": asdict(plan), **machine, "median": result, "runs": runs}, indent=2)
        )
    else:
        print(report(result, plan, args.repeat))


if __name__ == "__main__":
    main()
