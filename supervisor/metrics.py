"""Prometheus metrics of every tenant, served on 127.0.0.1 from a daemon thread.

    stop = start_metrics_server(9100, lambda: supervisor.published)
    ...
    stop()

A scrape never touches the supervisor loop's objects: `TenantCollector` only
calls the snapshot callable, which returns the list of `TenantHandle.details()`
dicts the loop publishes about once a second (a new list each time, never
changed after). So a scrape sees values up to a second old, and a slow
scraper cannot slow the loop down.

Per tenant (label ``tenant``):

    chatq_up                      1 while the worker is running (ready), else 0
    chatq_state{state}            1 for the current state, 0 for the other four
    chatq_restarts_total          restarts after failures (crash, hang, memory)
    chatq_manual_restarts_total   restarts asked for (`chatq restart`, a reload's change)
    chatq_heartbeat_age_seconds   since the last heartbeat (only while a worker runs)
    chatq_queued                  messages waiting in the worker's chat queues
    chatq_replies_pending         replies waiting to be sent (rate limiter, retry, pause)
    chatq_in_flight               messages in a handler now
    chatq_processed_total         messages handled (from the store: survives restarts)
    chatq_failed_total            messages given up on (idem)
    chatq_rejected_total          messages refused by a full chat queue (idem)
    chatq_duplicates_total        duplicate messages dropped (since the worker started)
    chatq_rate_limited_total      replies that waited for the rate limiter (idem)
    chatq_replies_sent_total      replies handed to the provider (idem)
    chatq_replies_failed_total    replies given up on (idem)
    chatq_replies_retried_total   reply attempts that failed and were rescheduled (idem)
    chatq_ingest_refused_total    ingest connections past the cap, answered 503 (idem)
    chatq_ingest_timeouts_total   ingest bodies too slow to arrive, answered 408 (idem)
    chatq_sending_paused          1 while the provider refuses the tenant's sending, else 0
    chatq_rss_bytes               the worker's resident memory
    chatq_cpu_percent             the worker's CPU use (100 = one core)

The worker's own figures (queued to sending_paused) are left out while the
tenant's current worker has sent no heartbeat yet (a stopped tenant keeps its
last worker's), the heartbeat age whenever no worker runs (stopped on purpose,
fatal, in backoff: an alert on the age must not fire for those; `chatq_state`
tells them apart), and rss/cpu while the worker has not been sampled: an
absent series says "unknown", where a 0 would look like a counter reset or an
idle worker.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from prometheus_client import CollectorRegistry, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from chatq.shared.errors import ConfigError

__all__ = ["STATES", "MetricsServer", "Snapshot", "TenantCollector", "start_metrics_server"]

Snapshot = Callable[[], list[dict[str, Any]]]

STATES = ("starting", "running", "hung", "backoff", "stopped", "fatal")
LISTEN_ADDRESS = "127.0.0.1"  # metrics are for a local agent; put a proxy in front for more
_STOP_TIMEOUT = 5.0

# Figures that come from the worker's heartbeat: (summary key, name, help, is a counter).
_AGE = ("chatq_heartbeat_age_seconds", "Since the last heartbeat of the running worker")
_WORKER_FIGURES: tuple[tuple[str, str, str, bool], ...] = (
    ("queued", "chatq_queued", "Messages waiting in the worker's chat queues", False),
    ("replies_pending", "chatq_replies_pending", "Replies waiting to be sent", False),
    ("in_flight", "chatq_in_flight", "Messages being handled now", False),
    ("processed", "chatq_processed", "Messages handled, over the store's life", True),
    ("failed", "chatq_failed", "Messages given up on, over the store's life", True),
    ("rejected", "chatq_rejected", "Messages refused by a full chat queue", True),
    ("duplicates", "chatq_duplicates", "Duplicate messages dropped since the worker started", True),
    ("rate_limited", "chatq_rate_limited", "Replies that waited for the rate limiter", True),
    ("replies_sent", "chatq_replies_sent", "Replies sent since the worker started", True),
    ("replies_failed", "chatq_replies_failed", "Replies given up on since the start", True),
    ("replies_retried", "chatq_replies_retried", "Failed reply attempts rescheduled", True),
    ("ingest_refused", "chatq_ingest_refused", "Ingest connections past the cap (503)", True),
    ("ingest_timeouts", "chatq_ingest_timeouts", "Ingest bodies too slow to arrive (408)", True),
)
_PAUSED = ("chatq_sending_paused", "1 while the provider refuses the tenant's sending, else 0")
_PROCESS_FIGURES: tuple[tuple[str, str, str], ...] = (
    ("rss_bytes", "chatq_rss_bytes", "Resident memory of the worker process"),
    ("cpu_percent", "chatq_cpu_percent", "CPU use of the worker process (100 = one core)"),
)


class TenantCollector:
    """A prometheus_client collector over a snapshot of per-tenant dicts."""

    def __init__(self, snapshot: Snapshot) -> None:
        self._snapshot = snapshot

    def describe(self) -> list[Metric]:
        """The metric families, without samples (so registering never calls the snapshot)."""
        return list(self._families().values())

    def collect(self) -> Iterator[Metric]:
        """One sample per tenant and metric, from one call of the snapshot."""
        families = self._families()
        for row in self._snapshot():
            _add_tenant(families, row)
        yield from families.values()

    @staticmethod
    def _families() -> dict[str, Metric]:
        families: dict[str, Metric] = {
            "up": GaugeMetricFamily(
                "chatq_up", "1 while the tenant's worker is running, else 0", labels=["tenant"]
            ),
            "state": GaugeMetricFamily(
                "chatq_state", "1 for the tenant's current state", labels=["tenant", "state"]
            ),
            "restarts": CounterMetricFamily(
                "chatq_restarts", "Worker restarts after failures", labels=["tenant"]
            ),
            "manual_restarts": CounterMetricFamily(
                "chatq_manual_restarts", "Worker restarts asked for", labels=["tenant"]
            ),
            "age": GaugeMetricFamily(*_AGE, labels=["tenant"]),
        }
        for key, name, doc, counter in _WORKER_FIGURES:
            kind = CounterMetricFamily if counter else GaugeMetricFamily
            families[key] = kind(name, doc, labels=["tenant"])
        families["paused"] = GaugeMetricFamily(*_PAUSED, labels=["tenant"])
        for key, name, doc in _PROCESS_FIGURES:
            families[key] = GaugeMetricFamily(name, doc, labels=["tenant"])
        return families


def _add_tenant(families: Mapping[str, Metric], row: Mapping[str, Any]) -> None:
    tenant = str(row["tenant"])
    state = row.get("state")
    _add(families["up"], [tenant], 1.0 if state == "running" else 0.0)
    for name in STATES:
        _add(families["state"], [tenant, name], 1.0 if state == name else 0.0)
    _add(families["restarts"], [tenant], row.get("restarts", 0))
    _add(families["manual_restarts"], [tenant], row.get("manual_restarts", 0))
    if row.get("last_heartbeat_age_s") is not None:
        _add(families["age"], [tenant], row["last_heartbeat_age_s"])
    if row.get("heartbeat_seq") is not None:
        for key, *_ in _WORKER_FIGURES:
            _add(families[key], [tenant], row.get(key, 0))
        _add(families["paused"], [tenant], 1.0 if row.get("paused") else 0.0)
    for key, *_ in _PROCESS_FIGURES:
        if row.get(key) is not None:
            _add(families[key], [tenant], row[key])


def _add(family: Metric, labels: list[str], value: Any) -> None:
    assert isinstance(family, GaugeMetricFamily | CounterMetricFamily)
    family.add_metric(labels, float(value))


@dataclass(frozen=True, slots=True)
class MetricsServer:
    """A running metrics server; calling it (or `stop()`) shuts it down."""

    port: int
    _stop: Callable[[], None]

    def stop(self) -> None:
        """Stop serving and wait for the thread; safe to call twice."""
        self._stop()

    def __call__(self) -> None:
        self._stop()


def start_metrics_server(
    port: int, snapshot: Snapshot, host: str = LISTEN_ADDRESS
) -> MetricsServer:
    """Serve the tenants' metrics on http://host:port/metrics from a daemon thread.

    `port` 0 picks a free port (see `.port`). ConfigError if it cannot
    listen, e.g. the port is taken: the fix is another ``metrics_port``.
    """
    registry = CollectorRegistry(auto_describe=False)
    registry.register(TenantCollector(snapshot))
    try:
        server, thread = start_http_server(port, addr=host, registry=registry)
    except OSError as exc:
        raise ConfigError(
            f"metrics_port {port}: cannot listen on {host}:{port}: {exc.strerror or exc}"
        ) from None
    stopped = threading.Event()

    def stop() -> None:
        if stopped.is_set():
            return
        stopped.set()
        server.shutdown()
        server.server_close()
        thread.join(_STOP_TIMEOUT)

    return MetricsServer(port=int(server.server_port), _stop=stop)
