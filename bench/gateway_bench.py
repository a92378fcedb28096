"""The gateway end to end: signed webhooks -> gateway -> 4 tenants' workers -> 200.

    .venv/bin/python bench/gateway_bench.py [--repeat 3] [--quick] [--json]
        [--webhooks 20000] [--clients 32] [--seconds 20]

Four real workers (``python -m chatq.tenant_worker``: echo handler, local
transport, limits out of the way) and the gateway (``python -m
chatq.supervisor.gateway``) run in a temporary folder. Bodies are built and
signed (HMAC-SHA256, as Meta does) before any clock starts; the numbers are
spread round-robin over the four tenants. The client runs on the same 2
cores as what it measures, so it is a lean one (`Client`): keep-alive
HTTP/1.1 connections over asyncio protocols, each request's bytes (head with
the signature, body) built before the clock, each answer's status line and
Content-Length read (about a third of aiohttp's client CPU per webhook).

1. single: --clients concurrent senders post --webhooks webhooks of one
   message each as fast as they are answered: webhooks/s (= messages/s), each
   side's CPU per webhook, and webhooks per post to a worker (the gateway's
   coalescing; a worker's cost is mostly per post), and a fixed Python loop
   timed before and after (the host's speed then: it swings). Then the same
   with twice the senders: at --clients the box is not saturated (the rate is
   the senders over a tenant's round trip), so this shows what the same code
   does when the load, not the round trip, sets the rate.
2. batch: the same with 50 messages per webhook (one tenant each): webhooks/s
   and messages/s.
3. latency: open loop at 500 single-message webhooks/s for --seconds: p50 and
   p99 webhook -> 200 as the client sees it, and the worst post lateness.
4. gateway RSS: peak over the run.
5. gateway alone: phase 1 again with stand-ins that answer 200 at once in
   place of the workers (nothing committed): what the gateway itself costs.
6. ceiling: a bare aiohttp app (TCP, reads the body, answers 200) with the
   same client, bodies and concurrency: webhooks/s, and the gateway's ratios.

Every answer must be 200 (anything else aborts the run), and at the end of
phases 1-3 the stores must hold every message sent: a 200 means committed.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import signal
import socket
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import aiohttp
from aiohttp import web
from worker_bench import ResourceWatch, percentile, wait_healthy, worker_env

from chatq.shared.whatsapp.webhook import sign

TENANTS = ("t1", "t2", "t3", "t4")
NUMBERS = {tenant: f"10000000000{n}" for n, tenant in enumerate(TENANTS)}
SECRET = "bench-app-secret"
BATCH = 50
LATENCY_RATE = 500.0
TARGETS = {"single_webhooks_per_s": 3000.0, "p99_ms": 50.0, "rss_mb": 60.0}
Result = dict[str, float]


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def write_config(folder: Path, port: int) -> Path:
    tenants = "".join(
        f"""
[[tenants]]
id = "{tenant}"
[tenants.whatsapp]
phone_number_id = "{number}"
access_token = "unused"
"""
        for tenant, number in NUMBERS.items()
    )
    text = f"""
[supervisor]
run_dir = "run"
data_dir = "data"
log_level = "WARNING"

[defaults]
handler = "echo"
rate_limit_per_minute = 100000000
max_queue_size = 1000000

[gateway]
listen = "127.0.0.1:{port}"
[gateway.whatsapp]
app_secret = "{SECRET}"
verify_token = "bench"
{tenants}"""
    path = folder / "tenants.toml"
    path.write_text(text)
    return path


def spawn(folder: Path, name: str, *args: str) -> subprocess.Popen[bytes]:
    with (folder / f"{name}.log").open("wb") as log:
        return subprocess.Popen(
            [sys.executable, *args],
            cwd=folder,
            env=worker_env(),
            stdout=subprocess.DEVNULL,
            stderr=log,
        )


def stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


async def wait_http(url: str, proc: subprocess.Popen[bytes], within: float = 30.0) -> None:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline and proc.poll() is None:
        with contextlib.suppress(aiohttp.ClientError, OSError):
            async with aiohttp.ClientSession() as s, s.get(url) as response:
                if response.status < 500:
                    return
        await asyncio.sleep(0.05)
    raise RuntimeError(f"{url} did not answer within {within:g} s")


@contextlib.contextmanager
def running_gateway(
    folder: Path, *, instant: bool = False
) -> Iterator[tuple[str, list[int], Path]]:
    """Four workers and the gateway; yields (url, [gateway pid, worker pids], data folder).

    `instant`: stand-ins that answer 200 at once replace the workers (the gateway alone).
    """
    port = free_port()
    config = str(write_config(folder, port))
    (folder / "run").mkdir(exist_ok=True)
    procs = [
        spawn(folder, t, __file__, "--serve-instant-worker", str(folder / "run" / f"{t}.sock"))
        if instant
        else spawn(folder, t, "-m", "chatq.tenant_worker", "--config", config, "--tenant", t)
        for t in TENANTS
    ]
    try:
        for tenant, proc in zip(TENANTS, procs, strict=True):
            socket_path = folder / "run" / f"{tenant}.sock"
            if not asyncio.run(wait_healthy(socket_path, proc, 30)):
                raise RuntimeError(f"worker {tenant} not healthy; see {folder}/{tenant}.log")
        procs.append(spawn(folder, "gateway", "-m", "chatq.supervisor.gateway", "--config", config))
        url = f"http://127.0.0.1:{port}"
        asyncio.run(wait_http(url + "/metrics", procs[-1]))
        yield url + "/whatsapp", [procs[-1].pid, *(p.pid for p in procs[:-1])], folder / "data"
    finally:
        for proc in reversed(procs):
            stop(proc)


def serve_instant_worker(socket_path: str) -> None:
    """A worker stand-in that commits nothing: reads the body, answers 200 at once."""

    async def updates(request: web.Request) -> web.Response:
        body = json.loads(await request.read())
        return web.json_response({"accepted": len(body["messages"]), "duplicates": 0})

    async def health(_request: web.Request) -> web.Response:
        return web.json_response({"status": "running"})

    app = web.Application(client_max_size=32 << 20)
    app.router.add_post("/whatsapp/updates", updates)
    app.router.add_get("/health", health)
    web.run_app(app, path=socket_path, access_log=None, print=None)


def serve_bare(port: int) -> None:
    """The ceiling: reads the body, answers 200 (run in its own process)."""

    async def webhook(request: web.Request) -> web.Response:
        await request.read()
        return web.json_response({"messages": 1, "statuses": 0, "unknown_numbers": 0})

    async def metrics(_request: web.Request) -> web.Response:
        return web.Response(text="")

    app = web.Application(client_max_size=4 << 20)
    app.router.add_post("/whatsapp", webhook)
    app.router.add_get("/metrics", metrics)
    web.run_app(app, host="127.0.0.1", port=port, access_log=None, print=None)


# -- bodies and the client -----------------------------------------------------------


def webhook(prefix: str, start: int, count: int, number: str) -> bytes:
    messages = [
        {
            "from": f"1555{n % 1000:04d}",
            "id": f"wamid.{prefix}.{n}",
            "timestamp": "1700000000",
            "type": "text",
            "text": {"body": f"hello {n}"},
        }
        for n in range(start, start + count)
    ]
    contacts = [{"profile": {"name": "Bench"}, "wa_id": m["from"]} for m in messages]
    value = {
        "messaging_product": "whatsapp",
        "metadata": {"display_phone_number": "15550000000", "phone_number_id": number},
        "contacts": contacts,
        "messages": messages,
    }
    body = {
        "object": "whatsapp_business_account",
        "entry": [{"id": "1", "changes": [{"value": value, "field": "messages"}]}],
    }
    return json.dumps(body).encode()


def signed(prefix: str, webhooks: int, per_webhook: int) -> list[tuple[bytes, str]]:
    numbers = list(NUMBERS.values())
    out = []
    for n in range(webhooks):
        body = webhook(prefix, n * per_webhook, per_webhook, numbers[n % len(numbers)])
        out.append((body, sign(body, SECRET)))
    return out


class _Connection(asyncio.Protocol):
    """One keep-alive HTTP/1.1 connection: writes pre-built request bytes, reads a sized answer.

    The load generator shares the 2 cores with what it measures, so it is kept
    cheap: no headers built or parsed per request beyond the status line and
    Content-Length (every answer here, aiohttp's, has one).
    """

    def __init__(self) -> None:
        self._buffer = bytearray()
        self._waiter: asyncio.Future[tuple[int, bytes]] | None = None
        self._transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self._transport = transport

    def data_received(self, data: bytes) -> None:
        self._buffer += data
        end = self._buffer.find(b"\r\n\r\n")
        if end < 0 or self._waiter is None:
            return
        head = bytes(self._buffer[:end]).lower()
        at = head.find(b"\r\ncontent-length:")
        if at < 0:
            self._fail(RuntimeError(f"answer without Content-Length: {head[:200]!r}"))
            return
        line_end = head.find(b"\r\n", at + 2)
        length = int(head[at + 17 : line_end if line_end >= 0 else len(head)])
        if len(self._buffer) < end + 4 + length:
            return
        body = bytes(self._buffer[end + 4 : end + 4 + length])
        del self._buffer[: end + 4 + length]
        waiter, self._waiter = self._waiter, None
        waiter.set_result((int(head[9:12]), body))

    def connection_lost(self, exc: Exception | None) -> None:
        self._fail(ConnectionError(f"connection closed mid-answer ({exc})"))

    def _fail(self, exc: Exception) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_exception(exc)

    async def exchange(self, request: bytes) -> tuple[int, bytes]:
        assert self._transport is not None and self._waiter is None
        self._waiter = asyncio.get_running_loop().create_future()
        self._transport.write(request)
        return await self._waiter

    def close(self) -> None:
        if self._transport is not None:
            self._transport.close()


class Client:
    """Keep-alive connections to one host:port, opened as needed and reused."""

    def __init__(self, url: str) -> None:
        rest = url.removeprefix("http://")
        self._host, _, port_path = rest.partition(":")
        port, _, self._path = port_path.partition("/")
        self._port = int(port)
        self._idle: list[_Connection] = []
        self._all: list[_Connection] = []

    def request(self, item: tuple[bytes, str]) -> bytes:
        """The whole request of one signed webhook (built before any clock starts)."""
        body, signature = item
        head = (
            f"POST /{self._path} HTTP/1.1\r\nHost: {self._host}:{self._port}\r\n"
            f"Content-Type: application/json\r\nX-Hub-Signature-256: {signature}\r\n"
            f"Content-Length: {len(body)}\r\n\r\n"
        )
        return head.encode() + body

    async def post(self, request: bytes) -> float:
        """Send one pre-built request; its seconds to the answer, which must be 200."""
        start = time.perf_counter()
        conn = self._idle.pop() if self._idle else await self._connect()
        status, answer = await conn.exchange(request)
        if status != 200:
            raise RuntimeError(f"webhook answered {status}: {answer[:200]!r}")
        self._idle.append(conn)
        return time.perf_counter() - start

    async def warm(self, connections: int) -> None:
        """Open `connections` before the clock, as a warm keep-alive pool would be."""
        for _ in range(connections):
            self._idle.append(await self._connect())

    async def _connect(self) -> _Connection:
        loop = asyncio.get_running_loop()
        _, conn = await loop.create_connection(_Connection, self._host, self._port)
        self._all.append(conn)
        return conn

    def close(self) -> None:
        for conn in self._all:
            conn.close()


async def closed_loop(url: str, items: Sequence[tuple[bytes, str]], clients: int) -> float:
    """Seconds for `clients` senders, one connection each, to get every item answered 200."""
    client = Client(url)
    requests = iter([client.request(item) for item in items])
    try:
        await client.warm(clients)

        async def sender() -> None:
            for request in requests:
                await client.post(request)

        started = time.perf_counter()
        await asyncio.gather(*(sender() for _ in range(clients)))
        return time.perf_counter() - started
    finally:
        client.close()


async def open_loop(
    url: str, items: Sequence[tuple[bytes, str]], rate: float
) -> tuple[list[float], float]:
    """Post at `rate`/s whatever the answers; each post's seconds and the worst lateness."""
    client = Client(url)
    requests = [client.request(item) for item in items]
    late = 0.0
    try:
        tasks = []
        start = time.perf_counter()
        for n, request in enumerate(requests):
            due = start + n / rate
            delay = due - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            late = max(late, time.perf_counter() - due)
            tasks.append(asyncio.create_task(client.post(request)))
        latencies = list(await asyncio.gather(*tasks))
    finally:
        client.close()
    return latencies, late


def python_loop_ms() -> float:
    """A fixed pure-Python loop's milliseconds (median of 5): the host's and the
    interpreter's speed in the minute the rates were measured (this host's swings)."""
    times = []
    for _ in range(5):
        start = time.perf_counter()
        total = 0
        for i in range(300_000):
            total += i
        times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times)


def interpreter() -> str:
    """The CPython this runs on: its version, its executable and how libpython is linked."""
    with open("/proc/self/maps") as maps:
        shared = "libpython" in maps.read()
    base = getattr(sys, "_base_executable", sys.executable)  # a venv's: the one it was made from
    executable = os.path.realpath(base)
    linked = "shared libpython" if shared else "libpython linked in"
    return f"CPython {platform.python_version()} ({executable}, {linked})"


def process_cpu() -> float:
    """This process's CPU seconds (the client; its sampling threads are a small part)."""
    times = os.times()
    return times.user + times.system


async def posts_to_workers(url: str) -> float:
    """The gateway's chatq_gateway_posts_total, all tenants (0 if it has no such metric)."""
    metrics = url.removesuffix("/whatsapp") + "/metrics"
    async with aiohttp.ClientSession() as session, session.get(metrics) as response:
        text = await response.text()
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith("chatq_gateway_posts_total{")
    )


def stored_messages(data: Path) -> int:
    total = 0
    for tenant in TENANTS:
        db = sqlite3.connect(f"file:{data / f'{tenant}.sqlite3'}?mode=ro", uri=True)
        try:
            total += db.execute("SELECT COUNT(*) FROM messages").fetchone()[0]
        finally:
            db.close()
    return total


# -- one run ---------------------------------------------------------------------------


def gateway_phases(args: argparse.Namespace) -> Result:
    singles = signed("s", args.webhooks, 1)
    doubles = signed("d", args.webhooks, 1)
    batches = signed("b", max(1, args.webhooks // 10), BATCH)
    paced = signed("p", int(LATENCY_RATE * args.seconds), 1)
    result: Result = {}
    with tempfile.TemporaryDirectory() as tmp, running_gateway(Path(tmp)) as (url, pids, data):
        pid = pids[0]
        asyncio.run(closed_loop(url, signed("w", 500, 1), args.clients))  # warm-up
        peak = 0
        workers = [ResourceWatch(worker) for worker in pids[1:]]
        with ResourceWatch(pid) as watch, contextlib.ExitStack() as stack:
            for worker_watch in workers:
                stack.enter_context(worker_watch)
            loop_ms = python_loop_ms()
            client_cpu = process_cpu()
            posts = asyncio.run(posts_to_workers(url))
            seconds = asyncio.run(closed_loop(url, singles, args.clients))
            client_cpu = process_cpu() - client_cpu
            loop_ms = (loop_ms + python_loop_ms()) / 2
        posts = asyncio.run(posts_to_workers(url)) - posts
        result["webhooks_per_post"] = len(singles) / posts if posts else 0.0
        result["python_loop_ms"] = loop_ms
        result["single_webhooks_per_s"] = len(singles) / seconds
        result["single_cpu_pct"] = 100 * watch.cpu_s / seconds
        result["workers_cpu_pct"] = 100 * sum(w.cpu_s for w in workers) / seconds
        per_webhook = 1e6 / len(singles)  # CPU seconds -> us per webhook
        result["client_us"] = client_cpu * per_webhook
        result["gateway_us"] = watch.cpu_s * per_webhook
        result["workers_us"] = sum(w.cpu_s for w in workers) * per_webhook
        peak = max(peak, watch.peak_rss)
        seconds = asyncio.run(closed_loop(url, doubles, 2 * args.clients))
        result["double_webhooks_per_s"] = len(doubles) / seconds
        with ResourceWatch(pid) as watch:
            seconds = asyncio.run(closed_loop(url, batches, args.clients))
        result["batch_webhooks_per_s"] = len(batches) / seconds
        result["batch_msgs_per_s"] = len(batches) * BATCH / seconds
        peak = max(peak, watch.peak_rss)
        with ResourceWatch(pid) as watch:
            latencies, late = asyncio.run(open_loop(url, paced, LATENCY_RATE))
        result["p50_ms"] = 1000 * percentile(latencies, 50)
        result["p99_ms"] = 1000 * percentile(latencies, 99)
        result["late_max_ms"] = 1000 * late
        result["latency_cpu_pct"] = 100 * watch.cpu_s / args.seconds
        result["rss_mb"] = max(peak, watch.peak_rss) / 2**20
        expected = 500 + len(singles) + len(doubles) + len(batches) * BATCH + len(paced)
        if stored_messages(data) != expected:
            raise RuntimeError(f"stores hold {stored_messages(data)} messages, sent {expected}")
    return result


def gateway_alone(args: argparse.Namespace) -> Result:
    """1-message webhooks/s through the gateway to instant stand-ins, and its CPU."""
    items = signed("i", args.webhooks, 1)
    with tempfile.TemporaryDirectory() as tmp, running_gateway(Path(tmp), instant=True) as run:
        url, pids, _ = run
        asyncio.run(closed_loop(url, signed("w", 500, 1), args.clients))
        with ResourceWatch(pids[0]) as watch:
            seconds = asyncio.run(closed_loop(url, items, args.clients))
    return {
        "alone_webhooks_per_s": len(items) / seconds,
        "alone_cpu_pct": 100 * watch.cpu_s / seconds,
    }


def ceiling(args: argparse.Namespace) -> float:
    port = free_port()
    proc = subprocess.Popen([sys.executable, __file__, "--serve-bare", str(port)], env=worker_env())
    try:
        asyncio.run(wait_http(f"http://127.0.0.1:{port}/metrics", proc))
        url = f"http://127.0.0.1:{port}/whatsapp"
        asyncio.run(closed_loop(url, signed("w", 500, 1), args.clients))
        items = signed("c", args.webhooks, 1)
        return len(items) / asyncio.run(closed_loop(url, items, args.clients))
    finally:
        stop(proc)


def one_run(args: argparse.Namespace) -> Result:
    result = gateway_phases(args)
    result.update(gateway_alone(args))
    result["bare_webhooks_per_s"] = ceiling(args)
    result["vs_bare"] = result["single_webhooks_per_s"] / result["bare_webhooks_per_s"]
    result["alone_vs_bare"] = result["alone_webhooks_per_s"] / result["bare_webhooks_per_s"]
    return result


ROWS: tuple[tuple[str, str, str], ...] = (
    ("single_webhooks_per_s", "gateway: 1-message webhooks (= msgs/s)", "{:,.0f} /s"),
    ("single_cpu_pct", "gateway CPU during the 1-message phase", "{:.0f} %"),
    ("workers_cpu_pct", "4 workers' CPU during the 1-message phase", "{:.0f} %"),
    ("client_us", "CPU per 1-message webhook: the bench's client", "{:.0f} us"),
    ("gateway_us", "CPU per 1-message webhook: the gateway", "{:.0f} us"),
    ("workers_us", "CPU per 1-message webhook: the 4 workers", "{:.0f} us"),
    ("webhooks_per_post", "1-message webhooks per post to a worker", "{:.1f}"),
    ("python_loop_ms", "host speed then: a fixed Python loop (less is faster)", "{:.1f} ms"),
    ("double_webhooks_per_s", "1-message webhooks, twice the senders", "{:,.0f} /s"),
    ("batch_webhooks_per_s", "gateway: 50-message webhooks", "{:,.0f} /s"),
    ("batch_msgs_per_s", "gateway: messages in 50-message webhooks", "{:,.0f} /s"),
    ("p50_ms", "p50 webhook -> 200 @500 webhooks/s", "{:.1f} ms"),
    ("p99_ms", "p99 webhook -> 200 @500 webhooks/s", "{:.1f} ms"),
    ("late_max_ms", "client: worst post lateness @500/s", "{:.1f} ms"),
    ("latency_cpu_pct", "gateway CPU @500 webhooks/s", "{:.0f} %"),
    ("rss_mb", "gateway peak RSS", "{:.1f} MB"),
    (
        "alone_webhooks_per_s",
        "gateway alone (workers answer at once): 1-msg webhooks",
        "{:,.0f} /s",
    ),
    ("alone_cpu_pct", "gateway CPU, alone", "{:.0f} %"),
    ("bare_webhooks_per_s", "ceiling: bare aiohttp app answering 200", "{:,.0f} /s"),
    ("vs_bare", "gateway end to end / bare app", "{:.2f}x"),
    ("alone_vs_bare", "gateway alone / bare app", "{:.2f}x"),
)


def meets(key: str, value: float) -> str:
    if key not in TARGETS:
        return ""
    ok = value >= TARGETS[key] if key.endswith("_per_s") else value <= TARGETS[key]
    sign_text = ">=" if key.endswith("_per_s") else "<="
    return f"{sign_text} {TARGETS[key]:,.0f} {'met' if ok else 'MISSED'}"


def report(result: Result, args: argparse.Namespace) -> str:
    lines = [
        f"{interpreter()}, {os.cpu_count()} CPUs; {args.webhooks:,} webhooks,"
        f" {args.clients} clients, {len(TENANTS)} tenants; medians of {args.repeat} run(s)"
    ]
    for key, label, fmt in ROWS:
        lines.append(f"{label:<56} {fmt.format(result[key]):>12}  {meets(key, result[key])}")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--webhooks", type=int, default=20_000)
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--repeat", type=int, default=1)
    parser.add_argument("--quick", action="store_true", help="a short smoke run")
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--serve-bare", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--serve-instant-worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.serve_bare:
        serve_bare(args.serve_bare)
        return
    if args.serve_instant_worker:
        serve_instant_worker(args.serve_instant_worker)
        return
    if args.quick:
        args.webhooks, args.seconds = 2_000, 2.0
    runs: list[Result] = []
    for n in range(args.repeat):
        runs.append(one_run(args))
        print(
            f"run {n + 1}: {json.dumps({k: round(v, 2) for k, v in runs[-1].items()})}",
            file=sys.stderr,
        )
    result = {key: statistics.median(run[key] for run in runs) for key in runs[0]}
    if args.json:
        print(json.dumps({"median": result, "runs": runs}, indent=2))
    else:
        print(report(result, args))


if __name__ == "__main__":
    main()
