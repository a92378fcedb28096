"""Prometheus metrics: the collector over a snapshot, and the HTTP server, scraped for real.

The snapshots are made of real `TenantHandle.details()` dicts, so the metric
names stay tied to the keys the supervisor actually publishes.
"""

from __future__ import annotations

import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fakes import FakeClock
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from chatq.config import load_config
from chatq.shared import protocol
from chatq.shared.errors import ConfigError
from chatq.supervisor.metrics import STATES, TenantCollector, start_metrics_server
from chatq.supervisor.tenant import State, TenantHandle
from chatq.supervisor.watchdog import ProcStats

CONFIG = """\
[[tenants]]
id = "acme"

[[tenants]]
id = "globex"
"""
WORKER_METRICS = {
    "chatq_heartbeat_age_seconds",
    "chatq_queued",
    "chatq_in_flight",
    "chatq_processed",
    "chatq_failed",
    "chatq_rejected",
    "chatq_duplicates",
    "chatq_rate_limited",
    "chatq_replies_sent",
    "chatq_replies_failed",
    "chatq_replies_retried",
    "chatq_ingest_refused",
    "chatq_ingest_timeouts",
    "chatq_sending_paused",
}
Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


@pytest.fixture
def snapshot(tmp_path: Path) -> list[dict[str, Any]]:
    """acme running with a heartbeat and a process sample; globex never started."""
    path = tmp_path / "tenants.toml"
    path.write_text(CONFIG)
    config = load_config(path)
    clock = FakeClock(100.0)
    acme = TenantHandle(config, config.tenant("acme"), clock=clock)
    globex = TenantHandle(config, config.tenant("globex"), clock=clock)
    acme.state, acme.restarts = State.RUNNING, 2
    acme.on_frame(
        protocol.Heartbeat(
            seq=1,
            time=0.0,
            queued=5,
            in_flight=2,
            processed=40,
            failed=1,
            rejected=3,
            duplicates=4,
            rate_limited=6,
            busiest=[("c1", 3)],
            replies_sent=38,
            replies_failed=2,
            replies_retried=7,
            replies_pending=11,
            paused="190: Error validating access token",
            paused_since=50.0,
            ingest_refused=11,
            ingest_timeouts=12,
        )
    )
    acme.proc_stats = ProcStats(pid=4242, rss_bytes=41 * 2**20, cpu_percent=12.5, num_fds=9)
    clock.now += 0.25
    return [acme.details(), globex.details()]


def samples(text: str) -> Samples:
    """Every sample of an exposition, keyed by name and sorted labels."""
    found: Samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            found[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return found


def families(text: str) -> dict[str, str]:
    """Family name -> type."""
    return {family.name: family.type for family in text_string_to_metric_families(text)}


def exposition(rows: list[dict[str, Any]]) -> str:
    registry = CollectorRegistry()
    registry.register(TenantCollector(lambda: rows))
    return generate_latest(registry).decode()


def test_every_metric_with_its_type(snapshot: list[dict[str, Any]]) -> None:
    kinds = families(exposition(snapshot))
    assert kinds == {
        "chatq_up": "gauge",
        "chatq_state": "gauge",
        "chatq_restarts": "counter",
        "chatq_manual_restarts": "counter",
        "chatq_heartbeat_age_seconds": "gauge",
        "chatq_queued": "gauge",
        "chatq_replies_pending": "gauge",
        "chatq_in_flight": "gauge",
        "chatq_processed": "counter",
        "chatq_failed": "counter",
        "chatq_rejected": "counter",
        "chatq_duplicates": "counter",
        "chatq_rate_limited": "counter",
        "chatq_replies_sent": "counter",
        "chatq_replies_failed": "counter",
        "chatq_replies_retried": "counter",
        "chatq_ingest_refused": "counter",
        "chatq_ingest_timeouts": "counter",
        "chatq_sending_paused": "gauge",
        "chatq_rss_bytes": "gauge",
        "chatq_cpu_percent": "gauge",
    }


def test_values_of_a_running_tenant(snapshot: list[dict[str, Any]]) -> None:
    found = samples(exposition(snapshot))
    acme = (("tenant", "acme"),)
    assert found[("chatq_up", acme)] == 1.0
    assert found[("chatq_restarts_total", acme)] == 2.0
    assert found[("chatq_heartbeat_age_seconds", acme)] == pytest.approx(0.25)
    expected = {
        "chatq_queued": 5,
        "chatq_replies_pending": 11,
        "chatq_in_flight": 2,
        "chatq_processed_total": 40,
        "chatq_failed_total": 1,
        "chatq_rejected_total": 3,
        "chatq_duplicates_total": 4,
        "chatq_rate_limited_total": 6,
        "chatq_replies_sent_total": 38,
        "chatq_replies_failed_total": 2,
        "chatq_replies_retried_total": 7,
        "chatq_ingest_refused_total": 11,
        "chatq_ingest_timeouts_total": 12,
        "chatq_sending_paused": 1,
        "chatq_rss_bytes": 41 * 2**20,
        "chatq_cpu_percent": 12.5,
    }
    for name, value in expected.items():
        assert found[(name, acme)] == value, name


def test_state_is_one_hot(snapshot: list[dict[str, Any]]) -> None:
    found = samples(exposition(snapshot))
    for tenant, current in (("acme", "running"), ("globex", "stopped")):
        values = {s: found[("chatq_state", (("state", s), ("tenant", tenant)))] for s in STATES}
        assert values == {s: float(s == current) for s in STATES}


def test_unknown_figures_are_absent_not_zero(snapshot: list[dict[str, Any]]) -> None:
    """globex has no worker: up 0 and its restarts, but no worker or process figures."""
    found = samples(exposition(snapshot))
    globex = {name for name, labels in found if ("tenant", "globex") in labels}
    assert globex == {
        "chatq_up",
        "chatq_state",
        "chatq_restarts_total",
        "chatq_manual_restarts_total",
    }
    assert found[("chatq_up", (("tenant", "globex"),))] == 0.0


def test_a_stopped_tenant_has_no_heartbeat_age_but_keeps_its_figures(
    snapshot: list[dict[str, Any]],
) -> None:
    """An alert on heartbeat age must not fire for a tenant stopped on purpose."""
    stopped = dict(snapshot[0], state="stopped", last_heartbeat_age_s=None, pid=None)
    found = samples(exposition([stopped]))
    acme = (("tenant", "acme"),)
    assert ("chatq_heartbeat_age_seconds", acme) not in found
    assert found[("chatq_processed_total", acme)] == 40.0


def test_registering_does_not_call_the_snapshot() -> None:
    def explode() -> list[dict[str, Any]]:
        raise AssertionError("snapshot called at registration")

    CollectorRegistry().register(TenantCollector(explode))


@pytest.fixture
def server(snapshot: list[dict[str, Any]]) -> Iterator[tuple[int, list[list[dict[str, Any]]]]]:
    """A metrics server on a free port over a snapshot the test can replace."""
    published = [snapshot]
    running = start_metrics_server(0, lambda: published[0])
    try:
        yield running.port, published
    finally:
        running()


def scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        assert response.status == 200
        return str(response.read().decode())


def test_scrape_over_http(server: tuple[int, list[list[dict[str, Any]]]]) -> None:
    port, published = server
    found = samples(scrape(port))
    assert found[("chatq_processed_total", (("tenant", "acme"),))] == 40.0
    assert "chatq_up" in families(scrape(port))

    # Each scrape reads the snapshot afresh: the supervisor replaces the list.
    published[0] = [dict(published[0][0], processed=41)]
    found = samples(scrape(port))
    assert found[("chatq_processed_total", (("tenant", "acme"),))] == 41.0
    assert not any(("tenant", "globex") in labels for _, labels in found)


def test_stop_closes_the_port(snapshot: list[dict[str, Any]]) -> None:
    running = start_metrics_server(0, lambda: snapshot)
    scrape(running.port)
    running.stop()
    running.stop()  # twice is fine
    with pytest.raises(urllib.error.URLError):
        scrape(running.port)


def test_port_in_use_is_one_config_line(
    server: tuple[int, list[list[dict[str, Any]]]],
) -> None:
    port, _ = server
    with pytest.raises(ConfigError, match=rf"^metrics_port {port}: cannot listen on 127.0.0.1:"):
        start_metrics_server(port, list)
