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

from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator, model_validator

from chatq.shared.errors import NoSuchTenant

TENANT_ID_PATTERN = r"^[a-z0-9][a-z0-9_-]{0,62}$"
# Names of the other rows of `chatq list` and of the control socket's file.
RESERVED_IDS = ("gateway", "supervisor")
# Keys whose values are secrets: a literal, "env:NAME" or "file:PATH" (loader).
TENANT_SECRET_KEYS = ("ingest_token",)  # secrets that are a tenant's own keys
SECRET_KEYS = ("access_token", "app_secret", "verify_token", *TENANT_SECRET_KEYS)
# Tenant keys whose values are secrets too: errors never show them.
HTTP_SECRET_KEYS = ("handler_headers", "webhook_headers", "signing_secret")
# RFC 9110 token: what a header name may be.
_HEADER_NAME = re.compile(r"^[!#$%&'*+.^_`|~0-9A-Za-z-]+$")
# Headers chatq sets itself on every request.
_OWN_HEADERS = frozenset({"content-type", "content-length", "x-chatq-signature", "host"})
LOG_LEVELS = ("TRACE", "DEBUG", "INFO", "SUCCESS", "WARNING", "ERROR", "CRITICAL")
BUILTIN_HANDLERS = ("echo", "http")
# module.path:function, e.g. "mybot.handlers:reply"; importability is checked by the worker.
_HANDLER_REF = re.compile(r"^[A-Za-z_]\w*(\.[A-Za-z_]\w*)*:[A-Za-z_]\w*$")
_TENANT_ID = re.compile(TENANT_ID_PATTERN)

# TOML has no path type: paths arrive as strings, so these fields stay lax.
LaxPath = Annotated[Path, Field(strict=False)]
Port = Annotated[int, Field(ge=1, le=65535)]
Seconds = Annotated[float, Field(gt=0)]
_STRICT = ConfigDict(strict=True, extra="forbid", frozen=True, allow_inf_nan=False)


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


def _header_pairs(value: Any) -> Any:
    """A TOML table of headers as (name, value) pairs; anything else for the model to refuse."""
    return tuple(value.items()) if isinstance(value, dict) else value


def _check_headers(
    value: tuple[tuple[str, SecretStr], ...],
) -> tuple[tuple[str, SecretStr], ...]:
    for name, secret in value:
        if not _HEADER_NAME.fullmatch(name):
            raise ValueError(f"{name!r:.80} is not a header name")
        if name.lower() in _OWN_HEADERS:
            raise ValueError(f"{name}: chatq sets this header itself")
        if any(char in secret.get_secret_value() for char in "\r\n\0"):
            raise ValueError(f"{name}: a header value cannot hold a line break or NUL")
    return value


def _secret_not_empty(value: SecretStr | None) -> SecretStr | None:
    if value is not None and not value.get_secret_value():
        raise ValueError("must not be empty")
    return value


class WhatsAppSettings(BaseModel):
    """One tenant's WhatsApp business number on Meta's Cloud API ([tenants.whatsapp])."""

    model_config = _STRICT

    phone_number_id: Annotated[str, Field(pattern=r"^[0-9]{1,32}$")]
    access_token: SecretStr
    app_secret: SecretStr | None = None  # its own Meta app: webhooks on /whatsapp/<tenant>
    messages_per_second: Annotated[int, Field(ge=1, le=10_000)] = 80  # the number's tier
    graph_url: str = "https://graph.facebook.com"
    graph_version: Annotated[str, Field(pattern=r"^v[0-9]+\.[0-9]+$")] = "v23.0"
    request_timeout: Seconds = 20.0

    @field_validator("graph_url")
    @classmethod
    def _graph_url_syntax(cls, value: str) -> str:
        checked = _check_http_url(value)
        assert checked is not None
        return checked.rstrip("/")

    _not_empty = field_validator("access_token", "app_secret")(_secret_not_empty)


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
    transport: Literal["local", "webhook", "whatsapp"] = "local"
    webhook_url: str | None = None
    whatsapp: WhatsAppSettings | None = None
    port: Port | None = None
    ingest_token: SecretStr | None = None  # bearer token asked of requests on `port`
    drain_timeout: Annotated[float, Field(ge=0)] = 10.0
    memory_limit_mb: Annotated[int, Field(ge=1)] | None = None
    dedup_ttl_seconds: Seconds = 3600.0
    dedup_max_entries: Annotated[int, Field(ge=1)] = 10_000
    retention_days: Annotated[int, Field(ge=0)] = 30  # 0: keep every message
    # (name, value) pairs: a TOML table, kept as a tuple so the model hashes (reload diffs).
    handler_headers: tuple[tuple[str, SecretStr], ...] = ()
    webhook_headers: tuple[tuple[str, SecretStr], ...] = ()
    signing_secret: SecretStr | None = None  # X-Chatq-Signature on handler and webhook posts
    webhook_max_attempts: Annotated[int, Field(ge=1)] = 12
    webhook_retry_backoff: Seconds = 2.0  # doubling, at most 300 s: ~18 min in all

    _token_not_empty = field_validator("ingest_token")(_secret_not_empty)

    @field_validator("id")
    @classmethod
    def _not_reserved(cls, value: str) -> str:
        if value in RESERVED_IDS:
            raise ValueError(f"{value!r} is reserved (it names chatq's own {value})")
        return value

    _header_table = field_validator("handler_headers", "webhook_headers", mode="before")(
        _header_pairs
    )
    _headers = field_validator("handler_headers", "webhook_headers")(_check_headers)
    _signing_secret = field_validator("signing_secret")(_secret_not_empty)

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
        if self.transport == "whatsapp" and self.whatsapp is None:
            raise ValueError('whatsapp: required when transport = "whatsapp" ([tenants.whatsapp])')
        return self


class GatewayWhatsApp(BaseModel):
    """The gateway's Meta app ([gateway.whatsapp]): signature and handshake secrets."""

    model_config = _STRICT

    app_secret: SecretStr | None = None  # checks X-Hub-Signature-256 on POST /whatsapp
    verify_token: SecretStr  # answers the GET handshake

    _not_empty = field_validator("app_secret", "verify_token")(_secret_not_empty)


class GatewaySettings(BaseModel):
    """The public webhook endpoint ([gateway]): one process for every tenant's number."""

    model_config = _STRICT

    listen: str
    whatsapp: GatewayWhatsApp
    forward_timeout: Seconds = 10.0  # one tenant's commit; past it the answer is 503
    max_body_bytes: Annotated[int, Field(ge=1024)] = 4 * 1024 * 1024

    @field_validator("listen")
    @classmethod
    def _host_port(cls, value: str) -> str:
        split_listen(value)
        return value

    @property
    def host(self) -> str:
        """The address to bind."""
        return split_listen(self.listen)[0]

    @property
    def port(self) -> int:
        """The TCP port to bind."""
        return split_listen(self.listen)[1]


def split_listen(value: str) -> tuple[str, int]:
    """'127.0.0.1:8080' or '[::1]:8080' -> (host, port); ValueError naming the problem."""
    host, sep, port = value.rpartition(":")
    host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    if not sep or not host or not port.isdigit() or not 1 <= int(port) <= 65535:
        raise ValueError('must be "host:port", e.g. "127.0.0.1:8080"')
    return host, int(port)


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
    gateway: GatewaySettings | None = None

    def tenant(self, tenant_id: str) -> TenantConfig:
        """The tenant with this id; NoSuchTenant if there is none."""
        for tenant in self.tenants:
            if tenant.id == tenant_id:
                return tenant
        raise NoSuchTenant(tenant_id)

    def whatsapp_tenants(self) -> dict[str, TenantConfig]:
        """Enabled or not, every tenant with a WhatsApp number, by phone_number_id."""
        return {t.whatsapp.phone_number_id: t for t in self.tenants if t.whatsapp is not None}

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
    "HTTP_SECRET_KEYS",
    "LOG_LEVELS",
    "RESERVED_IDS",
    "SECRET_KEYS",
    "TENANT_ID_PATTERN",
    "TENANT_SECRET_KEYS",
    "ChatqConfig",
    "GatewaySettings",
    "GatewayWhatsApp",
    "SupervisorSettings",
    "TenantConfig",
    "WhatsAppSettings",
    "split_listen",
]
