"""The gateway with a real supervisor, real workers and a fake Meta on 127.0.0.1.

A `Meta` signs each webhook with HMAC-SHA256 as Meta does; what a 200
acknowledged is then read straight from the tenants' SQLite stores.
"""

from __future__ import annotations

import asyncio
import io
import json
import os
import shutil
import signal
import socket
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from conftest import wait_until
from fake_graph import fake_graph_in_thread
from sandbox import clean_env, short_run_dir, wait_for
from supervisor_fixtures import SupervisorHarness, SupervisorRun, toml_text
from whatsapp_payloads import change, status, text_message, update

from chatq.shared.errors import StoreError
from chatq.shared.whatsapp.webhook import sign
from chatq.supervisor import cli
from chatq.tenant_worker.history import read_history

APP_SECRET = "meta-app-secret-for-tests"
VERIFY = "verify-token-for-tests"
NUMBERS = {"acme": "111", "globex": "222"}


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def tenants(**extra: Any) -> dict[str, dict[str, Any]]:
    return {
        tenant: {"whatsapp": {"phone_number_id": number, "access_token": "tok"}, **extra}
        for tenant, number in NUMBERS.items()
    }


def gateway_table(port: int) -> dict[str, Any]:
    return {
        "listen": f"127.0.0.1:{port}",
        "forward_timeout": 3.0,
        "whatsapp": {"app_secret": APP_SECRET, "verify_token": VERIFY},
    }


class Meta:
    """A fake Meta: signs and posts webhooks to the gateway on 127.0.0.1."""

    def __init__(self, port: int) -> None:
        self.url = f"http://127.0.0.1:{port}"

    async def post(
        self, body: object, *, secret: str | None = APP_SECRET, path: str = "/whatsapp"
    ) -> tuple[int, dict[str, Any]]:
        raw = body if isinstance(body, bytes) else json.dumps(body).encode()
        headers = {"Content-Type": "application/json"}
        if secret is not None:
            headers["X-Hub-Signature-256"] = sign(raw, secret)
        timeout = aiohttp.ClientTimeout(total=20)
        async with (
            aiohttp.ClientSession(timeout=timeout) as session,
            session.post(self.url + path, data=io.BytesIO(raw), headers=headers) as response,
        ):
            return response.status, await response.json(content_type=None)

    async def get(self, path: str, **params: str) -> tuple[int, str]:
        async with (
            aiohttp.ClientSession() as session,
            session.get(self.url + path, params=params) as response,
        ):
            return response.status, await response.text()


def stored(run: SupervisorRun, tenant: str) -> dict[str, dict[str, Any]]:
    """The tenant's stored messages by id ({} before its store exists)."""
    path = run.config_path.parent / "data" / f"{tenant}.sqlite3"
    try:
        return {e["id"]: e for e in read_history(path, limit=1_000_000)}
    except StoreError:
        return {}


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[SupervisorRun, Meta]]:
    """One supervisor with two tenants and the gateway, shared by the tests that keep it up."""
    port = free_port()
    with SupervisorHarness(tmp_path_factory.mktemp("gateway")) as harness:
        harness.write_config(tenants(), gateway=gateway_table(port))
        run = harness.start()
        yield run, Meta(port)


def gateway_pid(run: SupervisorRun) -> int:
    return run.wait_running("gateway")


# -- the shared supervisor ------------------------------------------------------------


def test_list_shows_the_gateway_row(
    gateway: tuple[SupervisorRun, Meta], capsys: pytest.CaptureFixture[str]
) -> None:
    run, _ = gateway
    gateway_pid(run)
    assert cli.main(["--config", str(run.config_path), "list", "--json"]) == 0
    rows = {row["tenant"]: row for row in json.loads(capsys.readouterr().out)}
    assert rows["gateway"]["kind"] == "gateway"
    assert rows["gateway"]["state"] == "running"
    assert {rows[t]["kind"] for t in NUMBERS} == {"tenant"}
    assert cli.main(["--config", str(run.config_path), "status", "gateway", "--json"]) == 0
    assert APP_SECRET not in capsys.readouterr().out


async def test_handshake(gateway: tuple[SupervisorRun, Meta]) -> None:
    run, meta = gateway
    gateway_pid(run)
    good = {"hub.mode": "subscribe", "hub.verify_token": VERIFY, "hub.challenge": "4242"}
    assert await meta.get("/whatsapp", **good) == (200, "4242")
    assert (await meta.get("/whatsapp", **{**good, "hub.verify_token": "x"}))[0] == 403


async def test_unsigned_wrongly_signed_and_bad_json_are_refused_storing_nothing(
    gateway: tuple[SupervisorRun, Meta],
) -> None:
    run, meta = gateway
    body = update(change("111", messages=[text_message("wamid.refused")]))
    assert (await meta.post(body, secret=None))[0] == 401
    assert (await meta.post(body, secret="someone else"))[0] == 403
    assert (await meta.post(b'{"entry": [')) == (400, {"error": "body is not JSON"})
    assert "wamid.refused" not in stored(run, "acme")
    assert APP_SECRET not in run.log() and VERIFY not in run.log()


async def test_a_two_tenant_batch_is_in_both_stores_before_the_200_and_redelivery_is_absorbed(
    gateway: tuple[SupervisorRun, Meta],
) -> None:
    run, meta = gateway
    body = update(
        change("111", messages=[text_message("wamid.b1"), text_message("wamid.b2", sender="2")]),
        change("222", messages=[text_message("wamid.b3")]),
        entries=2,
    )
    code, answer = await meta.post(body)
    acme, globex = stored(run, "acme"), stored(run, "globex")  # read right after the 200
    assert (code, answer["messages"]) == (200, 3)
    assert {"wamid.b1", "wamid.b2"} <= set(acme) and "wamid.b3" in globex
    assert acme["wamid.b1"]["type"] == "text"
    assert acme["wamid.b1"]["from"] == "name-16315551181"
    assert (await meta.post(body))[0] == 200  # Meta re-delivers: duplicates, nothing new
    assert len(stored(run, "acme")) == len(acme)
    _, metrics = await meta.get("/metrics")
    assert 'chatq_gateway_duplicates_total{tenant="acme"} 2.0' in metrics


async def test_one_odd_item_does_not_hold_up_the_rest(gateway: tuple[SupervisorRun, Meta]) -> None:
    """A message of a shape Meta may add tomorrow: the others are committed, and a 200."""
    run, meta = gateway
    body = update(
        change("111", messages=[text_message("wamid.ok1"), {"id": "wamid.odd"}]),
        change("222", messages=[text_message("wamid.ok2")]),
    )
    code, answer = await meta.post(body)
    assert (code, answer["messages"]) == (200, 2)
    assert "wamid.ok1" in stored(run, "acme") and "wamid.ok2" in stored(run, "globex")
    assert "wamid.odd" not in stored(run, "acme")
    wait_for("the skip logged", lambda: "of an unexpected shape skipped" in run.log())


async def test_an_unknown_number_is_200_and_counted(gateway: tuple[SupervisorRun, Meta]) -> None:
    _, meta = gateway
    body = update(change("999", messages=[text_message("wamid.nobody")]))
    assert await meta.post(body) == (200, {"messages": 0, "statuses": 0, "unknown_numbers": 1})
    _, metrics = await meta.get("/metrics")
    assert "chatq_gateway_unknown_numbers_total 1.0" in metrics


async def test_statuses_out_of_order_end_read(gateway: tuple[SupervisorRun, Meta]) -> None:
    run, meta = gateway
    await meta.post(update(change("111", messages=[text_message("wamid.s1", sender="77")])))

    def sent_reply() -> dict[str, Any] | None:
        replies = stored(run, "acme").get("wamid.s1", {}).get("replies", [])
        return replies[0] if replies and replies[0]["status"] == "sent" else None

    provider_id = wait_for("the echo reply to be sent", sent_reply)["provider_id"]
    for state in ("read", "delivered", "sent"):  # read overtook the others
        code, _ = await meta.post(update(change("111", statuses=[status(provider_id, state)])))
        assert code == 200
    assert stored(run, "acme")["wamid.s1"]["replies"][0]["status"] == "read"


async def test_a_3_mb_batch_is_committed_whole(gateway: tuple[SupervisorRun, Meta]) -> None:
    run, meta = gateway
    items = [
        text_message(f"wamid.big{n}", sender=f"3{n % 100}", body="x" * 2000) for n in range(1500)
    ]
    body = json.dumps(update(change("111", messages=items))).encode()
    assert len(body) > 3_000_000
    code, answer = await meta.post(body)
    assert (code, answer["messages"]) == (200, 1500)
    assert sum(1 for mid in stored(run, "acme") if mid.startswith("wamid.big")) == 1500


async def test_a_gateway_sigkilled_under_load_loses_nothing_acknowledged(
    gateway: tuple[SupervisorRun, Meta],
) -> None:
    run, meta = gateway
    old = gateway_pid(run)
    acked: list[str] = []
    stop = asyncio.Event()

    async def sender(n: int) -> None:
        i = 0
        while not stop.is_set():
            i += 1
            wamid, number = f"wamid.k{n}.{i}", "111" if i % 2 else "222"
            body = update(change(number, messages=[text_message(wamid, sender=f"5{n}")]))
            try:
                code, _ = await meta.post(body)
            except (aiohttp.ClientError, OSError):
                await asyncio.sleep(0.01)
                continue
            if code == 200:
                acked.append(wamid)

    senders = [asyncio.create_task(sender(n)) for n in range(8)]
    await wait_until_count(acked, 100)
    os.kill(old, signal.SIGKILL)
    await asyncio.to_thread(run.wait_running, "gateway", not_pid=old)
    before = len(acked)
    await wait_until_count(acked, before + 100)
    stop.set()
    await asyncio.gather(*senders)
    committed = set(stored(run, "acme")) | set(stored(run, "globex"))
    assert not [wamid for wamid in acked if wamid not in committed]


async def wait_until_count(items: list[str], count: int, within: float = 20.0) -> None:
    deadline = time.monotonic() + within
    while len(items) < count:
        assert time.monotonic() < deadline, f"only {len(items)} of {count} acknowledged"
        await asyncio.sleep(0.02)


async def test_restart_stop_and_start_gateway(gateway: tuple[SupervisorRun, Meta]) -> None:
    run, meta = gateway
    old = gateway_pid(run)
    run.request("restart", tenant="gateway")
    run.wait_running("gateway", not_pid=old)
    run.request("stop", tenant="gateway")
    run.wait_state("gateway", "stopped")
    with pytest.raises(aiohttp.ClientError):
        await meta.get("/whatsapp")
    run.request("start", tenant="gateway")
    gateway_pid(run)
    assert (await meta.post(update(change("222", messages=[text_message("wamid.r1")]))))[0] == 200


# -- a supervisor of its own ------------------------------------------------------------------


async def test_a_stopped_tenant_gets_a_503_then_a_200_after_start(tmp_path: Path) -> None:
    port = free_port()
    with SupervisorHarness(tmp_path) as harness:
        harness.write_config(tenants(), gateway=gateway_table(port))
        run = harness.start()
        meta = Meta(port)
        gateway_pid(run)
        run.request("stop", tenant="acme")
        run.wait_state("acme", "stopped")
        body = update(
            change("111", messages=[text_message("wamid.w1")]),
            change("222", messages=[text_message("wamid.w2")]),
        )
        code, answer = await meta.post(body)
        assert (code, answer["tenants"]) == (503, ["acme"])
        assert "wamid.w2" in stored(run, "globex")  # committed: a duplicate when re-delivered
        run.request("start", tenant="acme")
        run.wait_running("acme")
        assert (await meta.post(body))[0] == 200
        assert "wamid.w1" in stored(run, "acme")

        harness.write_config(tenants())  # [gateway] removed: reload stops it
        run.request("reload")
        wait_for("the gateway row to go", lambda: "gateway" not in run.tenants())


def test_a_listen_address_in_use_is_retried_not_fatal(tmp_path: Path) -> None:
    with socket.socket() as squatter:  # e.g. the last gateway, orphaned, still draining
        squatter.bind(("127.0.0.1", 0))
        squatter.listen()
        port = squatter.getsockname()[1]
        with SupervisorHarness(tmp_path) as harness:
            restarts = {"max_restarts": 1000}  # the test, not the policy, decides how long
            harness.write_config(tenants(), gateway=gateway_table(port), supervisor=restarts)
            run = harness.start(wait_running=False)
            run.wait_log("in use; exiting to be restarted")
            squatter.close()
            gateway_pid(run)
            assert run.status("gateway")["boot_error"] is None


async def test_a_stop_lets_webhooks_in_progress_finish(tmp_path: Path) -> None:
    """SIGTERM while a forward waits on a slow commit: that webhook still gets its 200."""
    port, run_dir = free_port(), short_run_dir()
    config = tmp_path / "tenants.toml"
    settings = {"run_dir": run_dir, "data_dir": tmp_path / "data"}
    config.write_text(toml_text(settings, {}, tenants(), gateway_table(port)))
    arrived, release = asyncio.Event(), asyncio.Event()

    async def slow_commit(request: web.Request) -> web.Response:
        await request.read()
        arrived.set()
        await release.wait()
        return web.json_response({"accepted": 1, "duplicates": 0})

    app = web.Application()
    app.router.add_post("/whatsapp/updates", slow_commit)
    runner = web.AppRunner(app)
    await runner.setup()
    await web.UnixSite(runner, str(run_dir / "acme.sock")).start()
    proc = await asyncio.create_subprocess_exec(
        *(sys.executable, "-m", "chatq.supervisor.gateway", "--config", str(config)),
        cwd=tmp_path,
        env=clean_env(),
        stderr=asyncio.subprocess.DEVNULL,
    )
    try:
        meta = Meta(port)
        await wait_until(lambda: _answers(port), what="the gateway to listen")
        webhook = asyncio.create_task(
            meta.post(update(change("111", messages=[text_message("wamid.d1")])))
        )
        await asyncio.wait_for(arrived.wait(), 10)
        proc.send_signal(signal.SIGTERM)
        await wait_until(lambda: not _answers(port), what="the gateway to stop listening")
        release.set()
        assert (await webhook)[0] == 200
        assert await asyncio.wait_for(proc.wait(), 10) == 0
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
        await runner.cleanup()
        shutil.rmtree(run_dir, ignore_errors=True)


def _answers(port: int) -> bool:
    with socket.socket() as probe:
        return probe.connect_ex(("127.0.0.1", port)) == 0


async def test_the_whole_whatsapp_path_webhook_to_graph_to_read(tmp_path: Path) -> None:
    """Meta's webhook for two numbers -> both stores -> replies through the Graph API
    (the whatsapp transport) -> delivery statuses move each reply to read."""
    port = free_port()
    with fake_graph_in_thread() as graph, SupervisorHarness(tmp_path) as harness:
        wa = {"graph_url": graph.url, "access_token": "graph-token-for-tests"}
        harness.write_config(
            {
                tenant: {"transport": "whatsapp", "whatsapp": {"phone_number_id": number, **wa}}
                for tenant, number in NUMBERS.items()
            },
            gateway=gateway_table(port),
        )
        run = harness.start()
        meta = Meta(port)
        gateway_pid(run)
        body = update(
            change("111", messages=[text_message("wamid.in1", sender="4911", body="hallo")]),
            change("222", messages=[text_message("wamid.in2", sender="4922", body="hej")]),
        )
        assert (await meta.post(body))[0] == 200
        assert "wamid.in1" in stored(run, "acme") and "wamid.in2" in stored(run, "globex")

        sent = wait_for("both replies at the Graph API", lambda: len(graph.sent()) == 2 or None)
        assert sent
        by_user = {request.to: request for request in graph.sent()}
        assert by_user["4911"].path == "/v23.0/111/messages" and by_user["4911"].text == "hallo"
        assert by_user["4922"].path == "/v23.0/222/messages" and by_user["4922"].text == "hej"
        for tenant, message in (("acme", "wamid.in1"), ("globex", "wamid.in2")):
            wait_for(  # Meta's statuses come after the send is recorded (ms, not seconds)
                f"{tenant}'s reply recorded as sent",
                lambda t=tenant, m=message: stored(run, t)[m]["replies"][0]["status"] == "sent",
            )
        for number, user in (("111", "4911"), ("222", "4922")):
            wamid = by_user[user].wamid
            assert wamid is not None
            for state in ("delivered", "read"):
                statuses = [status(wamid, state)]
                assert (await meta.post(update(change(number, statuses=statuses))))[0] == 200
        for tenant, message in (("acme", "wamid.in1"), ("globex", "wamid.in2")):
            (reply,) = stored(run, tenant)[message]["replies"]
            assert reply["status"] == "read"
            assert reply["provider_id"] == by_user["4911" if tenant == "acme" else "4922"].wamid
        assert "graph-token-for-tests" not in run.log()
