"""Transports: how a stored reply reaches the chat provider.

`make_transport(tenant)` builds the one the tenant's config names:

- ``"local"`` (default): logs the reply and counts it sent (`LocalTransport`);
- ``"webhook"``: POSTs it to ``webhook_url`` (`WebhookTransport`);
- ``"whatsapp"``: sends it through Meta's Cloud API (`WhatsAppTransport`).

`MemoryTransport` is the fake for tests and benchmarks. Every transport fails
only with `RetryableTransportError` or `PermanentTransportError` (or their
WhatsApp refinements, `PairRateLimitError` and `SendingPausedError`).
"""

from __future__ import annotations

from chatq.config.settings import TenantConfig
from chatq.shared.errors import ConfigError
from chatq.tenant_worker.http_client import reveal, reveal_one
from chatq.tenant_worker.transports.base import Transport
from chatq.tenant_worker.transports.local import LocalTransport
from chatq.tenant_worker.transports.memory import FailWith, MemoryTransport
from chatq.tenant_worker.transports.webhook import WebhookTransport
from chatq.tenant_worker.transports.whatsapp import WhatsAppTransport

__all__ = [
    "FailWith",
    "LocalTransport",
    "MemoryTransport",
    "Transport",
    "WebhookTransport",
    "WhatsAppTransport",
    "make_transport",
]


def make_transport(tenant: TenantConfig) -> Transport:
    """The transport `tenant.transport` names; opens no connection yet (workers fork)."""
    if tenant.transport == "webhook":
        if tenant.webhook_url is None:  # the settings model already refuses this
            raise ConfigError(f"tenant {tenant.id}: transport 'webhook': webhook_url is required")
        return WebhookTransport(
            tenant.webhook_url,
            tenant_id=tenant.id,
            headers=reveal(tenant.webhook_headers),
            signing_secret=reveal_one(tenant.signing_secret),
        )
    if tenant.transport == "whatsapp":
        if tenant.whatsapp is None:  # the settings model already refuses this
            raise ConfigError(
                f"tenant {tenant.id}: transport 'whatsapp': [tenants.whatsapp] is required"
            )
        return WhatsAppTransport(tenant.whatsapp)
    return LocalTransport()
