"""Real workers with transport = "whatsapp" against the fake Graph API on 127.0.0.1.

The request Meta documents, the split, each error class, order under
retries, pause and resume across a restart, the number's throughput tier
measured on the fake's receive times, and the token never leaking.
"""

from __future__ import annotations

import json
import textwrap
import urllib.request
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import WorkerFactory, WorkerProcess, message, post, wait_until
from fake_graph import (
    HANG,
    HTTP_500,
    FakeGraph,
    documented_text_message,
    error,
    fake_graph,
    fake_graph_in_thread,
)
from http_fakes import free_port
from sandbox import wait_for
from supervisor_fixtures import SupervisorHarness

from chatq.supervisor import render

TOKEN = "EAAG-process-test-secret-token"
PHONE = "106540352242922"
EXPIRED = "(#190) Error validating access token: Session has expired"
LONG_HANDLER = """
async def reply(message, ctx):
    if message.text == "long":
        return " ".join(f"w{n:04d}" for n in range(1500))  # 8,999 characters
    return message.text
"""


@pytest.fixture
async def graph() -> AsyncIterator[FakeGraph]:
    async with fake_graph() as fake:
        yield fake


def whatsapp(url: str, **keys: Any) -> dict[str, Any]:
    return {"phone_number_id": PHONE, "access_token": TOKEN, "graph_url": url, **keys}


def wa_worker(factory: WorkerFactory, graph: FakeGraph, **keys: Any) -> WorkerProcess:
    tenant: dict[str, Any] = {"transport": "whatsapp", "retry_backoff": 0.05, "drain_timeout": 0.5}
    tenant["whatsapp"] = whatsapp(graph.url, **keys.pop("whatsapp", {}))
    return factory(**{**tenant, **keys})


def all_done(worker: WorkerProcess, count: int) -> bool:
    """`count` messages stored, none waiting, and no reply pending."""
    entries = worker.history()
    return len(entries) >= count and all(
        e["status"] not in ("queued", "processing")
        and all(r["status"] != "pending" for r in e["replies"])
        for e in entries
    )


def replies(worker: WorkerProcess) -> dict[str, dict[str, Any]]:
    """Each message's single reply, by message id."""
    return {e["id"]: e["replies"][0] for e in worker.history() if e["replies"]}


def no_token_in(*texts: str) -> None:
    for text in texts:
        assert TOKEN not in text


async def test_a_reply_leaves_as_meta_documents_and_a_long_one_in_parts(
    worker_factory: WorkerFactory, graph: FakeGraph, tmp_path: Path
) -> None:
    (tmp_path / "wa_long.py").write_text(textwrap.dedent(LONG_HANDLER))
    worker = wa_worker(worker_factory, graph, handler="wa_long:reply")
    await worker.started()
    async with worker.client() as session:
        assert (await post(session, message("m1", "15550001", "hello")))[0] == 202
        await wait_until(lambda: all_done(worker, 1), what="the first reply")
        assert (await post(session, message("m2", "15550001", "long")))[0] == 202
        await wait_until(lambda: all_done(worker, 2), what="the long reply")

    first, *parts = graph.requests
    assert first.path == f"/v23.0/{PHONE}/messages"
    assert first.headers["Authorization"] == f"Bearer {TOKEN}"
    assert first.body == documented_text_message("15550001", "hello")
    assert len(parts) == 3 and all(len(p.text) <= 4096 for p in parts)
    assert " ".join(p.text for p in parts) == " ".join(f"w{n:04d}" for n in range(1500))
    sent = replies(worker)
    assert (sent["m1"]["status"], sent["m1"]["provider_id"]) == ("sent", "wamid.fake1")
    assert (sent["m2"]["status"], sent["m2"]["provider_id"]) == ("sent", "wamid.fake4")
    assert await worker.stop() == 0
    no_token_in(worker.stderr())


async def test_every_error_class_and_order_under_retries(
    worker_factory: WorkerFactory, graph: FakeGraph
) -> None:
    graph.script("u_retry", error(130429), error(130429))
    graph.script("u_fail", error(131047, message="(#131047) Re-engagement message"))
    graph.script("u_500", HTTP_500)
    graph.script("u_hang", HANG)
    graph.script("u_pair", error(131056))
    worker = wa_worker(worker_factory, graph, whatsapp={"request_timeout": 0.5})
    await worker.started()
    batch = [
        message("r1", "u_retry", "one"),
        message("r2", "u_retry", "two"),
        message("r3", "u_retry", "three"),
        message("f1", "u_fail", "too late"),
        message("f2", "u_fail", "next one"),
        message("s1", "u_500", "server"),
        message("h1", "u_hang", "hang"),
        message("p1", "u_pair", "pair"),
        message("c1", "u_calm", "calm"),
    ]
    async with worker.client() as session:
        assert (await post(session, batch))[0] == 202
    await wait_until(lambda: all_done(worker, len(batch)), within=15, what="all replies")

    got = replies(worker)
    assert [r.text for r in graph.sent("u_retry")] == ["one", "two", "three"]
    assert (got["r1"]["status"], got["r1"]["attempts"]) == ("sent", 3)
    assert got["f1"]["status"] == "failed"
    assert got["f1"]["last_error"] == "131047: Re-engagement message (fake details)"
    assert got["f2"]["status"] == "sent"  # the chat goes on after a failed reply
    assert (got["s1"]["status"], got["s1"]["attempts"]) == ("sent", 2)
    assert (got["h1"]["status"], got["h1"]["attempts"]) == ("sent", 2)
    assert (got["p1"]["status"], got["p1"]["attempts"]) == ("sent", 2)
    first_pair, second_pair = (r.at for r in graph.requests if r.to == "u_pair")
    assert second_pair - first_pair >= 4 * 0.8  # 4^1 s, less the jitter
    (calm,) = graph.sent("u_calm")
    assert calm.at < first_pair + 1.0  # other chats did not wait for it
    assert await worker.stop() == 0
    no_token_in(worker.stderr(), json.dumps(worker.history()))


async def test_a_pause_holds_every_reply_until_a_restart(
    worker_factory: WorkerFactory, graph: FakeGraph
) -> None:
    graph.always = error(190, message=EXPIRED)
    worker = wa_worker(worker_factory, graph)
    await worker.started()
    batch = [message("a1", "ua", "a one"), message("b1", "ub", "b one")]
    async with worker.client() as session:
        assert (await post(session, batch))[0] == 202
        await wait_until(lambda: "sending paused" in worker.stderr(), what="the pause")
        assert (await post(session, message("a2", "ua", "a two")))[0] == 202
        await wait_until(lambda: len(worker.history()) == 3 and all_handled(worker))
    asked = len(graph.requests)
    assert asked <= 2  # at most each chat's first reply, raced with the pause
    assert {r["status"] for r in replies(worker).values()} == {"pending"}
    assert await worker.stop() == 0
    assert len(graph.requests) == asked  # nothing more was sent while paused
    first_run = worker.stderr()
    assert "190: Error validating access token: Session has expired" in first_run

    graph.always = None  # the operator fixed the token
    await worker.started()
    await wait_until(lambda: all_done(worker, 3), what="the held replies")
    assert [r.text for r in graph.sent("ua")] == ["a one", "a two"]
    assert [r.text for r in graph.sent("ub")] == ["b one"]
    no_token_in(first_run, worker.stderr(), json.dumps(worker.history()))


def all_handled(worker: WorkerProcess) -> bool:
    return all(e["status"] == "processed" for e in worker.history())


async def test_the_number_sends_at_its_tier_and_never_over_it(
    worker_factory: WorkerFactory, graph: FakeGraph
) -> None:
    worker = wa_worker(worker_factory, graph, whatsapp={"messages_per_second": 20})
    await worker.started()
    async with worker.client() as session:
        batch = [message(f"m{n}", f"user{n}", f"hi {n}") for n in range(30)]
        assert (await post(session, batch))[0] == 202
    await wait_until(lambda: all_done(worker, 30), within=10, what="30 replies")

    times = sorted(r.at for r in graph.requests)
    assert len(times) == 30
    assert max(sum(1 for t in times if s <= t < s + 1.0) for s in times) <= 20
    assert times[-1] - times[0] >= 29 * 1.03 / 20 - 0.03  # evenly paced, not in a burst


# --- with the supervisor: status, metrics, logs ----------------------------------------


@pytest.fixture
def harness(tmp_path: Path) -> Iterator[SupervisorHarness]:
    with SupervisorHarness(tmp_path) as harness:
        yield harness


def test_status_and_metrics_show_the_pause_and_never_the_token(
    harness: SupervisorHarness,
) -> None:
    port = free_port()
    with fake_graph_in_thread() as graph:
        graph.always = error(190, message=EXPIRED)
        tenant = {"transport": "whatsapp", "whatsapp": whatsapp(graph.url)}
        harness.write_config({"acme": tenant}, supervisor={"metrics_port": port})
        run = harness.start()
        assert run.post("acme", "hello", chat_id="15550001") == 202

        details = wait_for("the pause", lambda: (d := run.status("acme"))["paused"] and d)
        assert details["paused"].startswith("190: Error validating access token")
        assert run.tenants()["acme"]["paused"] == details["paused"]
        block = render.status_block(details)
        assert "Sending: paused: 190: Error validating access token" in block
        paused_line = 'chatq_sending_paused{tenant="acme"} 1.0'
        metrics = wait_for("the paused gauge", lambda: _scrape(port, paused_line))

        graph.always = None
        run.request("restart", tenant="acme")
        wait_for("the reply sent", lambda: _reply_status(harness) == "sent")
        resumed = wait_for("a beat of the resumed worker", lambda: _sent_one(run.status("acme")))
        assert resumed["paused"] is None and resumed["paused_since"] is None
        no_token_in(json.dumps(details), block, metrics, run.log(), _scrape(port) or "")


def _sent_one(details: dict[str, Any]) -> dict[str, Any] | None:
    return details if details["replies_sent"] == 1 else None


def _scrape(port: int, wanted: str = "") -> str | None:
    """The metrics text (None if it lacks `wanted`: the snapshot is up to 1 s old)."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as answer:
        text: str = answer.read().decode()
    return text if wanted in text else None


def _reply_status(harness: SupervisorHarness) -> str | None:
    from chatq.tenant_worker.history import read_history

    entries = read_history(harness.data_dir / "acme.sqlite3")
    return entries[0]["replies"][0]["status"] if entries and entries[0]["replies"] else None


def test_a_reload_resumes_a_paused_sending(harness: SupervisorHarness) -> None:
    """Meta lifted the block; the operator reloads (config unchanged): the held reply goes."""
    with fake_graph_in_thread() as graph:
        graph.always = error(368, message="Temporarily blocked for policies violations")
        tenant = {"transport": "whatsapp", "whatsapp": whatsapp(graph.url)}
        harness.write_config({"acme": tenant, "other": {}})
        run = harness.start()
        other_pid = run.pids()["other"]
        assert run.post("acme", "hello", chat_id="15550001") == 202
        wait_for("the pause", lambda: run.status("acme")["paused"])

        graph.always = None
        answer = run.request("reload")
        assert answer["changed"] == ["acme"] and "other" in answer["unchanged"]
        wait_for("the reply sent", lambda: _reply_status(harness) == "sent")
        assert run.pids()["other"] == other_pid  # only the paused tenant restarted
