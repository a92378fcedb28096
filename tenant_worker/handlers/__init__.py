"""Handlers: what turns a tenant's message into replies.

`load_handler(tenant)` builds the one the tenant's config names:

- ``"echo"``: replies with the message text (`EchoHandler`);
- ``"http"``: POSTs the message to ``handler_url`` (`HttpHandler`);
- ``"module.path:function"``: the tenant's own ``async def f(message, ctx)``
  (`ModuleHandler`); `chatq.tenant_worker.handlers.demo` has examples.

Every handler returns a list of reply texts and fails only with
`HandlerError` (retryable) or `PermanentHandlerError`.
"""

from __future__ import annotations

from chatq.config.settings import TenantConfig
from chatq.shared.errors import ConfigError
from chatq.tenant_worker.handlers.base import (
    REPLY_TYPES,
    Handler,
    HandlerContext,
    normalise_replies,
)
from chatq.tenant_worker.handlers.echo import EchoHandler
from chatq.tenant_worker.handlers.http import HttpHandler
from chatq.tenant_worker.handlers.module import HandlerFunction, ModuleHandler
from chatq.tenant_worker.http_client import reveal, reveal_one

__all__ = [
    "REPLY_TYPES",
    "EchoHandler",
    "Handler",
    "HandlerContext",
    "HandlerFunction",
    "HttpHandler",
    "ModuleHandler",
    "load_handler",
    "normalise_replies",
]


def load_handler(tenant: TenantConfig) -> Handler:
    """The handler `tenant.handler` names; ConfigError (one line) if it cannot be built.

    Called by the worker at boot, after fork: it may import tenant code, but
    opens no connection (the http handler connects on first use).
    """
    if tenant.handler == "echo":
        return EchoHandler()
    if tenant.handler == "http":
        if tenant.handler_url is None:  # the settings model already refuses this
            raise ConfigError(f"tenant {tenant.id}: handler 'http': handler_url is required")
        return HttpHandler(
            tenant.handler_url,
            timeout=tenant.handler_timeout,
            headers=reveal(tenant.handler_headers),
            signing_secret=reveal_one(tenant.signing_secret),
        )
    return ModuleHandler.load(tenant.handler, tenant_id=tenant.id)
