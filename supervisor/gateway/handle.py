"""The gateway as the supervisor sees it: a `ProgramHandle` named "gateway"."""

from __future__ import annotations

from multiprocessing.connection import Connection
from multiprocessing.context import ForkServerContext
from multiprocessing.process import BaseProcess
from typing import Any

from chatq.config import ChatqConfig
from chatq.supervisor.program import ProgramHandle
from chatq.supervisor.spawn import spawn_gateway

__all__ = ["GATEWAY_ID", "GatewayHandle", "gateway_view"]

GATEWAY_ID = "gateway"  # a reserved id (config.settings.RESERVED_IDS): no tenant has it


def gateway_view(config: ChatqConfig) -> tuple[Any, ...] | None:
    """What a running gateway depends on: a change restarts it (None: no gateway)."""
    if config.gateway is None:
        return None
    numbers = {
        number: (tenant.id, tenant.whatsapp.app_secret if tenant.whatsapp else None)
        for number, tenant in config.whatsapp_tenants().items()
    }
    return (config.gateway, tuple(sorted(numbers.items())))


class GatewayHandle(ProgramHandle):
    """The gateway process, restarted per the supervisor's policy like a worker."""

    kind = "gateway"

    @property
    def id(self) -> str:
        return GATEWAY_ID

    @property
    def enabled(self) -> bool:
        return self.config.gateway is not None

    @property
    def memory_limit_mb(self) -> int | None:
        return None

    def spawn(self, ctx: ForkServerContext) -> tuple[BaseProcess, Connection]:
        return spawn_gateway(ctx, self.config)
