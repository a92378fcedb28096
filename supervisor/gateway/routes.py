"""Where a webhook's parts go: phone numbers to tenants, paths to secrets (pure).

POST /whatsapp            the gateway's Meta app: its app_secret; any tenant's number
POST /whatsapp/<tenant>   that tenant's own app (its app_secret, else the gateway's);
                          only the numbers of tenants with that same secret (one Meta
                          app may hold several of them), so one tenant's secret can
                          never write into another tenant's store
"""

from __future__ import annotations

from dataclasses import dataclass, field

from chatq.config import ChatqConfig
from chatq.shared.whatsapp.webhook import Routed

__all__ = ["Path", "Routes", "Split"]


@dataclass(frozen=True, slots=True)
class Path:
    """One webhook path: the secret that signs it and the numbers it may carry."""

    secret: str | None  # None: no app_secret configured, nothing verifies
    numbers: frozenset[str] | None  # None: every configured number


@dataclass(slots=True)
class Split:
    """An update's parts by tenant, and the phone numbers no tenant has."""

    parts: dict[str, Routed] = field(default_factory=dict)
    unknown: list[str] = field(default_factory=list)
    foreign: dict[str, str] = field(default_factory=dict)  # number -> tenant of another app


class Routes:
    """The routing table of one config (the gateway restarts when it changes)."""

    def __init__(self, config: ChatqConfig) -> None:
        assert config.gateway is not None
        gateway_secret = config.gateway.whatsapp.app_secret
        self._default = gateway_secret.get_secret_value() if gateway_secret else None
        self.tenant_of = {number: t.id for number, t in config.whatsapp_tenants().items()}
        secret_of: dict[str, str | None] = {}
        for number, tenant in config.whatsapp_tenants().items():
            assert tenant.whatsapp is not None
            own = tenant.whatsapp.app_secret
            secret_of[number] = own.get_secret_value() if own is not None else self._default
        self._paths: dict[str, Path] = {}
        for number, tenant_id in self.tenant_of.items():
            secret = secret_of[number]
            same_app = {n for n, s in secret_of.items() if s is not None and s == secret}
            self._paths[tenant_id] = Path(secret, frozenset(same_app | {number}))

    def path(self, tenant_id: str | None) -> Path | None:
        """The rules of ``/whatsapp`` (None) or ``/whatsapp/<tenant>``; None if no such path."""
        if tenant_id is None:
            return Path(self._default, None)
        return self._paths.get(tenant_id)

    def split(self, routed: dict[str, Routed], path: Path) -> Split:
        """Each known number's part under its tenant; the other numbers as unknown."""
        split = Split()
        for number, part in routed.items():
            tenant_id = self.tenant_of.get(number)
            if tenant_id is None:
                split.unknown.append(number)
            elif path.numbers is not None and number not in path.numbers:
                split.foreign[number] = tenant_id
            else:
                split.parts[tenant_id] = part
        return split
