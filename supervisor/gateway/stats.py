"""The gateway's own figures: Prometheus metrics on its ``GET /metrics`` and heartbeat counts.

    chatq_gateway_requests_total{code}              webhooks (and handshakes) by answer
    chatq_gateway_forwarded_messages_total{tenant}  messages committed by a tenant's worker
    chatq_gateway_forwarded_statuses_total{tenant}  statuses handed to a tenant's worker
    chatq_gateway_posts_total{tenant}               posts a tenant's worker committed (each
                                                    carries the parts of one or more webhooks)
    chatq_gateway_duplicates_total{tenant}          messages a worker already had (re-deliveries)
    chatq_gateway_unknown_statuses_total{tenant}    statuses for no known reply
    chatq_gateway_unknown_numbers_total             changes for a phone number no tenant has
    chatq_gateway_skipped_items_total               entries, changes, messages or statuses of an
                                                    unexpected shape, left out (and logged)
    chatq_gateway_request_seconds                   webhook received -> answered (histogram)

No label holds a secret, a phone number or anything a sender chose: only
answer codes and configured tenant ids.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest

from chatq.shared import protocol

__all__ = ["GatewayStats"]

_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


@dataclass
class GatewayStats:
    """Counters of one gateway process (since it started)."""

    registry: CollectorRegistry = field(default_factory=CollectorRegistry)
    in_flight: int = 0
    forwarded: int = 0
    refused: int = 0  # 4xx answers
    unavailable: int = 0  # 503 answers
    duplicates: int = 0

    def __post_init__(self) -> None:
        r = self.registry
        self.requests = Counter(
            "chatq_gateway_requests", "Requests by answer code", ["code"], registry=r
        )
        self.messages = Counter(
            "chatq_gateway_forwarded_messages", "Messages committed", ["tenant"], registry=r
        )
        self.statuses = Counter(
            "chatq_gateway_forwarded_statuses", "Statuses handed over", ["tenant"], registry=r
        )
        self.posts = Counter(
            "chatq_gateway_posts", "Posts committed by a worker", ["tenant"], registry=r
        )
        self.duplicate_messages = Counter(
            "chatq_gateway_duplicates", "Re-delivered messages", ["tenant"], registry=r
        )
        self.unknown_statuses = Counter(
            "chatq_gateway_unknown_statuses", "Statuses for no known reply", ["tenant"], registry=r
        )
        self.unknown_numbers = Counter(
            "chatq_gateway_unknown_numbers", "Changes for a number no tenant has", registry=r
        )
        self.skipped_items = Counter(
            "chatq_gateway_skipped_items", "Update items of an unexpected shape", registry=r
        )
        self.refused_connections = Counter(
            "chatq_gateway_refused_connections", "Connections over the cap (503)", registry=r
        )
        self.latency = Histogram(
            "chatq_gateway_request_seconds", "Webhook -> answer", buckets=_BUCKETS, registry=r
        )
        self._by_code: dict[int, Counter] = {}
        self._by_tenant: dict[str, tuple[Counter, ...]] = {}

    def answered(self, code: int, seconds: float | None = None) -> None:
        by_code = self._by_code.get(code)
        if by_code is None:  # labels() costs a lock and a tuple per call: look it up once
            by_code = self._by_code[code] = self.requests.labels(str(code))
        by_code.inc()
        if seconds is not None:
            self.latency.observe(seconds)
        if code == 503:
            self.unavailable += 1
        elif 400 <= code < 500:
            self.refused += 1

    def committed(self, tenant: str, messages: int, statuses: int, answer: dict[str, int]) -> None:
        """A tenant's post is committed; `answer` is its worker's counts."""
        self.forwarded += messages
        self.duplicates += answer.get("duplicates", 0)
        counters = self._by_tenant.get(tenant)
        if counters is None:
            counters = self._by_tenant[tenant] = tuple(
                metric.labels(tenant)
                for metric in (
                    self.posts,
                    self.messages,
                    self.statuses,
                    self.duplicate_messages,
                    self.unknown_statuses,
                )
            )
        counts = (
            1,
            messages,
            statuses,
            answer.get("duplicates", 0),
            answer.get("statuses_unknown", 0),
        )
        for counter, count in zip(counters, counts, strict=True):
            if count:
                counter.inc(count)

    def exposition(self) -> bytes:
        return generate_latest(self.registry)

    def heartbeat(self, seq: int, now: float) -> protocol.Heartbeat:
        """The gateway's beat: in_flight webhooks, processed = messages forwarded,
        failed = 503 answers, rejected = 4xx answers, duplicates = re-deliveries."""
        return protocol.Heartbeat(
            seq=seq,
            time=now,
            queued=0,
            in_flight=self.in_flight,
            processed=self.forwarded,
            failed=self.unavailable,
            rejected=self.refused,
            duplicates=self.duplicates,
            rate_limited=0,
        )
