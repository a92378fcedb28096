"""The settings models: what a valid chatq configuration looks like.

Three frozen pydantic models. `SupervisorSettings` holds the parent's knobs,
`TenantConfig` one tenant's, `ChatqConfig` the whole loaded file. They are
strict: TOML already gives real ints, floats and bools, so a quoted number or
a 1 where a bool belongs is a mistake to report, not to coerce. (Paths are
the exception: TOML has no path type, so they come in as strings.)

Frozen models compare and hash by value, which is what lets the supervisor
diff the tenant list on reload with plain equality.

Cross-field problems are raised as ``ValueError("field: detail")`` so the
loader can still name the field in its one-line message.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Any, Literal, Self
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from chatq.shared.errors import NoSuchTenant

TENANT_ID_PATTERN = r"^[a-z0-9][a-z0-9_-]{0,62}$"
LOG_LEVELS = ("TRACE", "DEBUG", "INFO", "SUCCESS", "WARNING", "ERROR", "CRITICAL")
BUILTIN_HANDLERS = ("echo", "http")
# module.path:function, e.g. "mybot.handlers:reply"; importability is checked by the worker.
_HANDLER_REF = re.compile(r"^[A-Za-z_]\w*(\.[A-Za-z_]\w*)*:[A-Za-z_]\w*$")
_TENANT_ID = re.compile(TENANT_ID_PATTERN)

# TOML has no path type: paths arrive as strings, so these fields stay lax.
LaxPath = Annotated[Path, Field(strict=False)]
Port = Annotated[int, Field(ge=1, le=65535)]
Seconds = Annotated[float, Field(gt=0)]


def _check_http_url(value: str | None) -> str | None:
    """Accept only absolute http(s) URLs with a host."""
    if value is None:
        return None
    parts = urlsplit(value)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise ValueError("must be an http:// or https:// URL")
    return value


class SupervisorSettings(BaseModel):
    """The supervisor's settings: where files go, heartbeats, restarts, logging."""

    model_config = ConfigDict(strict=True, extra="forbid", frozen=True, allow_inf_nan=False)

    run_dir: LaxPath = Path("run")
    data_dir: LaxPath = Path("data")
    heartbeat_interval_ms: Annotated[int, Field(ge=10)] = 1000
    # None means five missed intervals; see heartbeat_timeout_s.
    heartbeat_timeout_ms: Annotated[int, Field(ge=10)] | None = None
    stop_grace: Seconds = 15.0  # above drain_timeout (10) + what exiting takes
    backoff_initial: Seconds = 0.1
    backoff_max: Seconds = 30.0
    healthy_after: Annotated[float, Field(ge=0)] = 10.0
    max_restarts: Annotated[int, Field(ge=0)] = 10
    restart_window: Seconds = 60.0
    log_level: str = "INFO"
    log_format: Literal["text", "json"] = "text"
    log_file: LaxPath | None = None
    metrics_port: Port | None = None
    watchdog_interval: Seconds = 5.0

    @field_validator("log_level")
    @classmethod
    def _known_level(cls, value: str) -> str:
        level = value.upper()
        if level not in LOG_LEVELS:
            raise ValueError(f"must be one of {', '.join(LOG_LEVELS)}")
        return level

    @field_validator("log_format", mode="before")
    @classmethod
    def _lower_format(cls, value: Any) -> Any:
        return value.lower() if isinstance(value, str) else value

    @model_validator(mode="after")
    def _coherent(self) -> Self:
        if self.heartbeat_timeout_ms is not None and (
            self.heartbeat_timeout_ms <= self.heartbeat_interval_ms
        ):
            raise ValueError("heartbeat_timeout_ms: must be greater than heartbeat_interval_ms")
        if self.backoff_max < self.backoff_initial:
            raise ValueError("backoff_max: must be >= backoff_initial")
        return self

    @property
    def heartbeat_interval_s(self) -> float:
        """Seconds between two heartbeats of a worker."""
        return self.heartbeat_interval_ms / 1000

    @property
    def heartbeat_timeout_s(self) -> float:
        """Seconds of silence after which a worker counts as hung."""
        timeout_ms = self.heartbeat_timeout_ms
        if timeout_ms is None:
            timeout_ms = 5 * self.heartbeat_interval_ms
        return timeout_ms / 1000


class TenantConfig(BaseModel):
    """One tenant: its handler, limits, transport and ingest settings."""

    model_config = ConfigDict(strict=True, extra="forbid", frozen=True, allow_inf_nan=False)

    id: Annotated[str, Field(pattern=TENANT_ID_PATTERN)]
    enabled: bool = True
    handler: str = "echo"
    handler_url: str | None = None
    handler_timeout: Seconds = 30.0
    max_attempts: Annotated[int, Field(ge=1)] = 3
    retry_backoff: Seconds = 1.0
    max_queue_size: Annotated[int, Field(ge=1)] = 50
    rate_limit_per_minute: Annotated[int, Field(ge=1)] = 10
    tenant_rate_limit_per_minute: Annotated[int, Field(ge=1)] | None = None
    wait_text: Annotated[str, Field(min_length=1)] = "Please wait…"
    transport: Literal["local", "webhook"] = "local"
    webhook_url: str | None = None
    port: Port | None = None
    drain_timeout: Annotated[float, Field(ge=0)] = 10.0
    memory_limit_mb: Annotated[int, Field(ge=1)] | None = None
    dedup_ttl_seconds: Seconds = 3600.0
    dedup_max_entries: Annotated[int, Field(ge=1)] = 10_000

    @field_validator("handler")
    @classmethod
    def _handler_syntax(cls, value: str) -> str:
        if value in BUILTIN_HANDLERS or _HANDLER_REF.fullmatch(value):
            return value
        raise ValueError('must be "echo", "http" or "module.path:function"')

    @field_validator("handler_url", "webhook_url")
    @classmethod
    def _url_syntax(cls, value: str | None) -> str | None:
        return _check_http_url(value)

    @model_validator(mode="after")
    def _urls_present(self) -> Self:
        if self.handler == "http" and self.handler_url is None:
            raise ValueError('handler_url: required when handler = "http"')
        if self.transport == "webhook" and self.webhook_url is None:
            raise ValueError('webhook_url: required when transport = "webhook"')
        return self


class ChatqConfig(BaseModel):
    """A loaded configuration file: supervisor settings and the tenant list.

    Built by `config.loader.load_config`, which makes every path absolute.
    """

    # Built by code from already-validated parts, so not strict (a list of
    # tenants is fine and becomes a tuple, keeping the model hashable).
    model_config = ConfigDict(extra="forbid", frozen=True)

    path: Path
    supervisor: SupervisorSettings
    tenants: tuple[TenantConfig, ...]

    def tenant(self, tenant_id: str) -> TenantConfig:
        """The tenant with this id; NoSuchTenant if there is none."""
        for tenant in self.tenants:
            if tenant.id == tenant_id:
                return tenant
        raise NoSuchTenant(tenant_id)

    def store_path(self, tenant_id: str) -> Path:
        """The tenant's SQLite file (the tenant need not be configured any more)."""
        return self.supervisor.data_dir / f"{_file_stem(tenant_id)}.sqlite3"

    def socket_path(self, tenant_id: str) -> Path:
        """The unix socket the tenant's worker serves ingest on."""
        return self.supervisor.run_dir / f"{_file_stem(tenant_id)}.sock"

    @property
    def control_socket(self) -> Path:
        """The unix socket the supervisor answers the ops CLI on."""
        return self.supervisor.run_dir / "supervisor.sock"


def _file_stem(tenant_id: str) -> str:
    """Guard file names built from ids that may come from the CLI ("../x")."""
    if not _TENANT_ID.fullmatch(tenant_id):
        raise NoSuchTenant(tenant_id)
    return tenant_id


__all__ = [
    "LOG_LEVELS",
    "TENANT_ID_PATTERN",
    "ChatqConfig",
    "SupervisorSettings",
    "TenantConfig",
]
