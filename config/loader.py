"""Load and validate a chatq configuration file.

`load_config` picks the file (argument, else ``CHATQ_CONFIG``, else
``config/tenants.toml``), parses it with tomllib and layers the values, most
specific last::

    built-in default < [defaults] / [supervisor] < environment (.env) < [[tenants]] entry

A tenant's ``[tenants.whatsapp]`` table is laid key by key over
``[defaults.whatsapp]``. Secret values (`SECRET_KEYS`) may be a literal,
``env:NAME`` (the environment, then ``.env``) or ``file:PATH`` (relative to
the config's folder; one trailing newline stripped, as systemd's
``LoadCredential`` files have); they are resolved here and held as
`SecretStr`, so no error text or repr shows them.

Every problem becomes one `ConfigError` line that names the file, the tenant
and the field, e.g. ``tenants.toml: tenants[1] (globex): max_queue_size: must
be >= 1``. Partial layers ([defaults], the environment) are checked on their
own first, so a bad value is reported where it was written even when every
tenant happens to override it.
"""

from __future__ import annotations

import os
import re
import tomllib
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, TypeVar

from dotenv import dotenv_values
from pydantic import BaseModel, ConfigDict, ValidationError
from pydantic_core import ErrorDetails

from chatq.config.settings import (
    HTTP_SECRET_KEYS,
    SECRET_KEYS,
    TENANT_ID_PATTERN,
    TENANT_SECRET_KEYS,
    ChatqConfig,
    GatewaySettings,
    SupervisorSettings,
    TenantConfig,
    WhatsAppSettings,
)
from chatq.shared.errors import ConfigError

DEFAULT_CONFIG_PATH = Path("config") / "tenants.toml"
DOTENV_PATH = Path(".env")
# sun_path is 108 bytes on Linux, including the terminating NUL.
UNIX_SOCKET_MAX_BYTES = 107

_TABLES = ("supervisor", "defaults", "tenants", "gateway")
UNRESOLVED = "<unresolved>"  # a secret's stand-in under load_config(secrets=False)
_PATH_KEYS = ("run_dir", "data_dir", "log_file")
# Environment variable -> the model field it overrides.
_ENV_SUPERVISOR = {
    "HEARTBEAT_INTERVAL_MS": "heartbeat_interval_ms",
    "LOG_LEVEL": "log_level",
    "LOG_FORMAT": "log_format",
}
_ENV_TENANT = {
    "MAX_QUEUE_SIZE": "max_queue_size",
    "RATE_LIMIT_MAX_PER_MINUTE": "rate_limit_per_minute",
}
_TOML_POSITION = re.compile(r"^(?P<what>.*) \(at line (?P<line>\d+), column (?P<col>\d+)\)$")

M = TypeVar("M", bound=BaseModel)


class EnvOverrides(BaseModel):
    """The variables chatq reads from the environment and from ``.env``.

    Only parsing happens here; the values are checked against the models they
    override by `load_config`. Empty variables count as unset. (A plain model
    and python-dotenv, not pydantic-settings: that one cost every worker
    process ~1 MB of memory and 75 ms of start-up for six variables.)
    """

    model_config = ConfigDict(extra="ignore", frozen=True)

    CHATQ_CONFIG: str | None = None
    MAX_QUEUE_SIZE: int | None = None
    RATE_LIMIT_MAX_PER_MINUTE: int | None = None
    HEARTBEAT_INTERVAL_MS: int | None = None
    LOG_LEVEL: str | None = None
    LOG_FORMAT: str | None = None


# Every variable chatq reads (tests and benchmarks clear them for a known setup).
ENV_VARIABLES: tuple[str, ...] = tuple(EnvOverrides.model_fields)


def load_config(
    path: str | Path | None = None,
    env: Mapping[str, str] | None = None,
    *,
    secrets: bool = True,
) -> ChatqConfig:
    """Load, layer and validate a configuration; ConfigError (one line) if it is bad.

    `env` replaces the process environment *and* the ``.env`` file (for
    tests); by default both are read, the process environment winning.
    ``secrets=False`` leaves ``env:``/``file:`` secrets unresolved (a
    placeholder stands in): for the CLI commands that need no secret, run
    from an operator's shell that lacks the service's variables.
    """
    overrides = read_env_overrides(env, env_file=DOTENV_PATH if env is None else None)
    variables = _environment(env, env_file=DOTENV_PATH if env is None else None)
    env_supervisor = _env_layer(overrides, _ENV_SUPERVISOR, SupervisorSettings, {})
    env_tenant = _env_layer(overrides, _ENV_TENANT, TenantConfig, {"id": "env"})
    shown = str(path if path is not None else overrides.CHATQ_CONFIG or DEFAULT_CONFIG_PATH)
    file = Path(os.path.normpath(Path(shown).expanduser().absolute()))
    document = _read_toml(file, shown)
    supervisor_table, defaults, entries = _split_tables(document, shown)
    resolver = _Secrets(variables, file.parent, resolve=secrets)

    supervisor = _validate(
        SupervisorSettings, supervisor_table | env_supervisor, f"{shown}: supervisor"
    )
    supervisor = _anchor_paths(supervisor, file.parent)
    defaults = resolver.resolve_table(defaults, "whatsapp", f"{shown}: defaults")
    defaults = resolver.resolve_keys(defaults, TENANT_SECRET_KEYS, f"{shown}: defaults")
    defaults = resolver.resolve_http(defaults, f"{shown}: defaults")
    _check_defaults(defaults, shown)
    tenants = _build_tenants(entries, defaults | env_tenant, shown, resolver)
    gateway = _build_gateway(document, shown, resolver)
    config = ChatqConfig(path=file, supervisor=supervisor, tenants=tenants, gateway=gateway)
    _check_ports(config, entries, shown)
    _check_whatsapp(config, entries, shown)
    _check_socket_lengths(config, shown)
    return config


def read_env_overrides(
    env: Mapping[str, str] | None = None, env_file: str | Path | None = DOTENV_PATH
) -> EnvOverrides:
    """Parse the chatq variables from `env` (default: the process) over `env_file`."""
    from_file = dotenv_values(env_file, encoding="utf-8") if env_file else {}
    layers = (from_file, os.environ if env is None else env)
    values = {
        name: value
        for layer in layers
        for name, value in layer.items()
        if name in EnvOverrides.model_fields and value  # empty (or valueless) is unset
    }
    try:
        return EnvOverrides.model_validate(values)
    except ValidationError as exc:
        error = exc.errors(include_url=False)[0]
        raise _config_error(f"environment: {_describe(error, EnvOverrides)}") from None


def _environment(env: Mapping[str, str] | None, env_file: Path | None) -> dict[str, str]:
    """Every variable `env:NAME` secrets may name: `env` (or the process) over `env_file`."""
    from_file = dotenv_values(env_file, encoding="utf-8") if env_file else {}
    variables = {name: value for name, value in from_file.items() if value is not None}
    variables.update(os.environ if env is None else env)
    return variables


class _Secrets:
    """Resolves ``env:NAME`` and ``file:PATH`` secret values; errors never show a value."""

    def __init__(self, variables: Mapping[str, str], folder: Path, *, resolve: bool) -> None:
        self._variables = variables
        self._folder = folder
        self._resolve = resolve

    def resolve_table(self, table: dict[str, Any], key: str, where: str) -> dict[str, Any]:
        """`table` with the secrets of its sub-table `key` resolved (a new dict)."""
        sub = table.get(key)
        if not isinstance(sub, dict):
            return table
        resolved = {
            name: self.resolve(value, f"{where}: {key}.{name}") if name in SECRET_KEYS else value
            for name, value in sub.items()
        }
        return {**table, key: resolved}

    def resolve_keys(
        self, table: dict[str, Any], keys: tuple[str, ...], where: str
    ) -> dict[str, Any]:
        """`table` with its own secret `keys` resolved (a new dict)."""
        found = [key for key in keys if key in table]
        return {**table, **{key: self.resolve(table[key], f"{where}: {key}") for key in found}}

    def resolve_http(self, table: dict[str, Any], where: str) -> dict[str, Any]:
        """`table` with `signing_secret` and every header value resolved (a new dict)."""
        resolved = dict(table)
        if "signing_secret" in table:
            resolved["signing_secret"] = self.resolve(
                table["signing_secret"], f"{where}: signing_secret"
            )
        for key in ("handler_headers", "webhook_headers"):
            headers = table.get(key)
            if isinstance(headers, dict):
                resolved[key] = {
                    name: self.resolve(value, f"{where}: {key}.{name}")
                    for name, value in headers.items()
                }
        return resolved

    def resolve(self, value: Any, where: str) -> Any:
        """The secret a literal, ``env:NAME`` or ``file:PATH`` stands for."""
        if not isinstance(value, str):
            return value  # the model reports the type, without showing a string
        scheme, _, rest = value.partition(":")
        if scheme in ("env", "file") and rest and not self._resolve:
            return UNRESOLVED
        if scheme == "env" and rest:
            if not self._variables.get(rest):
                raise _config_error(f"{where}: environment variable {rest} is not set")
            return self._variables[rest]
        if scheme == "file" and rest:
            return self._read(Path(rest).expanduser(), where)
        return value

    def _read(self, path: Path, where: str) -> str:
        full = path if path.is_absolute() else self._folder / path
        try:
            text = full.read_text(encoding="utf-8")
        except FileNotFoundError:
            raise _config_error(f"{where}: secret file {full} not found") from None
        except (OSError, UnicodeDecodeError) as exc:
            reason = exc.strerror if isinstance(exc, OSError) else "not UTF-8 text"
            raise _config_error(f"{where}: cannot read secret file {full}: {reason}") from None
        return text.removesuffix("\n").removesuffix("\r")


# --- reading -----------------------------------------------------------------


def _read_toml(file: Path, shown: str) -> dict[str, Any]:
    """The parsed document; file-level problems become one-line errors."""
    try:
        text = file.read_bytes().decode("utf-8")
    except FileNotFoundError:
        raise _config_error(f"{shown}: not found") from None
    except UnicodeDecodeError:
        raise _config_error(f"{shown}: not UTF-8 text") from None
    except OSError as exc:
        raise _config_error(f"{shown}: cannot read: {exc.strerror or exc}") from None
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise _config_error(f"{shown}: {_toml_problem(str(exc))}") from None


def _toml_problem(message: str) -> str:
    """'Invalid value (at line 3, column 7)' -> 'line 3: TOML syntax error: ...'."""
    found = _TOML_POSITION.match(message)
    if found is None:
        return f"TOML syntax error: {_lower_first(message)}"
    what = _lower_first(found["what"])
    return f"line {found['line']}: TOML syntax error: {what} (column {found['col']})"


def _split_tables(
    document: dict[str, Any], shown: str
) -> tuple[dict[str, Any], dict[str, Any], list[dict[str, Any]]]:
    """Check the top-level shape: [supervisor], [defaults], one or more [[tenants]]."""
    for key in document:
        if key not in _TABLES:
            raise _config_error(
                f"{shown}: {_key(key)}: unknown top-level key"
                " (expected [supervisor], [defaults], [gateway] or [[tenants]])"
            )
    supervisor = _table(document, "supervisor", shown)
    defaults = _table(document, "defaults", shown)
    entries = document.get("tenants", [])
    if not isinstance(entries, list):
        raise _config_error(f"{shown}: tenants: must be an array of tables ([[tenants]])")
    if not entries:
        raise _config_error(f"{shown}: no tenants (add at least one [[tenants]] entry)")
    for index, entry in enumerate(entries):
        if not isinstance(entry, dict):
            raise _config_error(f"{shown}: tenants[{index}]: must be a table ([[tenants]])")
    return supervisor, defaults, entries


def _table(document: dict[str, Any], name: str, shown: str) -> dict[str, Any]:
    table = document.get(name, {})
    if not isinstance(table, dict):
        raise _config_error(f"{shown}: {name}: must be a table ([{name}])")
    return table


# --- layering ----------------------------------------------------------------


def _env_layer(
    overrides: EnvOverrides,
    names: Mapping[str, str],
    model: type[BaseModel],
    filler: dict[str, Any],
) -> dict[str, Any]:
    """The set variables as model fields, each checked against that field."""
    layer = {
        field: getattr(overrides, var)
        for var, field in names.items()
        if getattr(overrides, var) is not None
    }
    variable = {field: var for var, field in names.items()}
    _check_layer(model, layer, filler, lambda field: f"environment: {variable[field]}")
    return layer


def _check_defaults(defaults: dict[str, Any], shown: str) -> None:
    """[defaults] holds any tenant key but `id`, each valid on its own."""
    if "id" in defaults:
        raise _config_error(f"{shown}: defaults: id: not allowed (each tenant names itself)")
    whatsapp = defaults.get("whatsapp")
    if isinstance(whatsapp, dict):  # partial: a tenant's own table supplies the rest
        filler = {"phone_number_id": "0", "access_token": "x"}
        _check_layer(
            WhatsAppSettings, whatsapp, filler, lambda f: f"{shown}: defaults: whatsapp.{f}"
        )
        defaults = {k: v for k, v in defaults.items() if k != "whatsapp"}
    _check_layer(
        TenantConfig, defaults, {"id": "defaults"}, lambda field: f"{shown}: defaults: {field}"
    )


def _check_layer(
    model: type[BaseModel],
    layer: dict[str, Any],
    filler: dict[str, Any],
    where: Callable[[str], str],
) -> None:
    """Validate a partial layer: report only errors on keys the layer sets.

    Cross-field rules (handler = "http" needs handler_url) are left to the
    merged tenant, where another layer may supply the missing half.
    """
    try:
        model.model_validate(filler | layer)
    except ValidationError as exc:
        for error in exc.errors(include_url=False):
            field = error["loc"][0] if error["loc"] else None
            if isinstance(field, str) and field in layer:
                raise _config_error(f"{where(field)}: {_explain(error, model)}") from None


def _build_tenants(
    entries: list[dict[str, Any]], inherited: dict[str, Any], shown: str, secrets: _Secrets
) -> tuple[TenantConfig, ...]:
    """Validate every [[tenants]] entry over the inherited layers; ids unique."""
    first_seen: dict[str, str] = {}
    tenants = []
    for index, entry in enumerate(entries):
        where = f"{shown}: {_tenant_label(index, entry)}"
        resolved = secrets.resolve_table(entry, "whatsapp", where)
        resolved = secrets.resolve_keys(resolved, TENANT_SECRET_KEYS, where)
        resolved = secrets.resolve_http(resolved, where)
        tenant = _validate(TenantConfig, _layered(inherited, resolved), where)
        if tenant.id in first_seen:
            raise _config_error(f"{where}: id: duplicate tenant id (also {first_seen[tenant.id]})")
        first_seen[tenant.id] = _tenant_label(index, entry)
        tenants.append(tenant)
    return tuple(tenants)


def _layered(inherited: dict[str, Any], entry: dict[str, Any]) -> dict[str, Any]:
    """`entry` over `inherited`; [tenants.whatsapp] key by key over [defaults.whatsapp].

    The defaults' table is used only by tenants that have a number: their own
    table, or transport = "whatsapp".
    """
    values = inherited | entry
    shared = inherited.get("whatsapp")
    own = entry.get("whatsapp")
    if isinstance(shared, dict) and (own is not None or values.get("transport") == "whatsapp"):
        values["whatsapp"] = shared | own if isinstance(own, dict) else own or dict(shared)
    elif own is None:
        values.pop("whatsapp", None)
    return values


def _build_gateway(
    document: dict[str, Any], shown: str, secrets: _Secrets
) -> GatewaySettings | None:
    """[gateway], if the file has one, with its secrets resolved."""
    if "gateway" not in document:
        return None
    table = _table(document, "gateway", shown)
    table = secrets.resolve_table(table, "whatsapp", f"{shown}: gateway")
    return _validate(GatewaySettings, table, f"{shown}: gateway")


def _tenant_label(index: int, entry: Mapping[str, Any]) -> str:
    """'tenants[1] (globex)', or 'tenants[1]' while the id is missing or invalid."""
    tenant_id = entry.get("id")
    if isinstance(tenant_id, str) and re.fullmatch(TENANT_ID_PATTERN, tenant_id):
        return f"tenants[{index}] ({tenant_id})"
    return f"tenants[{index}]"


def _anchor_paths(settings: SupervisorSettings, folder: Path) -> SupervisorSettings:
    """Make run_dir, data_dir and log_file absolute, relative ones under `folder`."""
    update: dict[str, Path] = {}
    for key in _PATH_KEYS:
        value = getattr(settings, key)
        if value is not None:
            update[key] = Path(os.path.normpath(folder / value.expanduser()))
    return settings.model_copy(update=update)


# --- whole-file checks -------------------------------------------------------


def _check_ports(config: ChatqConfig, entries: list[dict[str, Any]], shown: str) -> None:
    """Two listeners cannot share a TCP port."""
    owners: dict[int, str] = {}
    if config.supervisor.metrics_port is not None:
        owners[config.supervisor.metrics_port] = "supervisor metrics_port"
    if config.gateway is not None:
        if config.gateway.port in owners:
            raise _config_error(
                f"{shown}: gateway: listen: port {config.gateway.port} already used by"
                f" {owners[config.gateway.port]}"
            )
        owners[config.gateway.port] = "gateway listen"
    for index, tenant in enumerate(config.tenants):
        if tenant.port is None:
            continue
        label = _tenant_label(index, entries[index])
        if tenant.port in owners:
            raise _config_error(
                f"{shown}: {label}: port: {tenant.port} already used by {owners[tenant.port]}"
            )
        owners[tenant.port] = label


def _check_whatsapp(config: ChatqConfig, entries: list[dict[str, Any]], shown: str) -> None:
    """One tenant per phone number; every number's webhooks can be checked."""
    owners: dict[str, str] = {}
    gateway_secret = config.gateway is not None and config.gateway.whatsapp.app_secret
    for index, tenant in enumerate(config.tenants):
        if tenant.whatsapp is None:
            continue
        label = _tenant_label(index, entries[index])
        number = tenant.whatsapp.phone_number_id
        if number in owners:
            raise _config_error(
                f"{shown}: {label}: whatsapp.phone_number_id: {number} already used by"
                f" {owners[number]}"
            )
        owners[number] = label
        if config.gateway is not None and not gateway_secret and not tenant.whatsapp.app_secret:
            raise _config_error(
                f"{shown}: {label}: whatsapp.app_secret: required when [gateway.whatsapp]"
                " has no app_secret (webhooks for this number could not be checked)"
            )


def _check_socket_lengths(config: ChatqConfig, shown: str) -> None:
    """Refuse a run_dir too deep for unix socket paths now rather than at bind()."""
    sockets = [config.control_socket, *(config.socket_path(t.id) for t in config.tenants)]
    longest = max(sockets, key=lambda p: len(os.fsencode(p)))
    size = len(os.fsencode(longest))
    if size > UNIX_SOCKET_MAX_BYTES:
        raise _config_error(
            f"{shown}: supervisor: run_dir: too deep for unix sockets"
            f" ({longest} is {size} bytes, limit {UNIX_SOCKET_MAX_BYTES})"
        )


# --- messages ----------------------------------------------------------------


def _validate(model: type[M], values: dict[str, Any], where: str) -> M:
    """model_validate, with the first problem as a ConfigError prefixed by `where`."""
    try:
        return model.model_validate(values)
    except ValidationError as exc:
        error = exc.errors(include_url=False)[0]
        raise _config_error(f"{where}: {_describe(error, model)}") from None


_PLAIN = {
    "missing": "missing",
    "extra_forbidden": "unknown key",
    "int_type": "must be an integer",
    "int_parsing": "must be an integer",
    "int_from_float": "must be an integer",
    "float_type": "must be a number",
    "float_parsing": "must be a number",
    "finite_number": "must be a finite number",
    "bool_type": "must be true or false",
    "bool_parsing": "must be true or false",
    "string_type": "must be a string",
    "path_type": "must be a path (a string)",
    "string_too_short": "must not be empty",
}
_BOUNDS = {
    "greater_than": (">", "gt"),
    "greater_than_equal": (">=", "ge"),
    "less_than": ("<", "lt"),
    "less_than_equal": ("<=", "le"),
}
_NO_INPUT = ("missing", "extra_forbidden")
_MISPLACED: dict[type[BaseModel], tuple[type[BaseModel], str]] = {
    TenantConfig: (SupervisorSettings, "it belongs in [supervisor]"),
    SupervisorSettings: (TenantConfig, "a tenant key: use [defaults] or [[tenants]]"),
}


def _describe(error: ErrorDetails, model: type[BaseModel]) -> str:
    """'field: short human detail (got 'x')' for one pydantic error."""
    loc = ".".join(_key(part) for part in error["loc"])
    detail = _explain(error, model)
    return f"{loc}: {detail}" if loc else detail


def _explain(error: ErrorDetails, model: type[BaseModel]) -> str:
    """The detail, with the offending input or a hint where one helps."""
    detail = _detail(error)
    if error["type"] == "extra_forbidden":
        return detail + _misplaced_hint(str(error["loc"][-1]), model)
    if error["loc"] and error["type"] not in _NO_INPUT and _showable(error):
        return f"{detail} (got {_short_repr(error['input'])})"
    return detail


def _showable(error: ErrorDetails) -> bool:
    """Never echo a secret, or a whole table that may hold one."""
    if any(part in SECRET_KEYS or part in HTTP_SECRET_KEYS for part in error["loc"]):
        return False
    return not isinstance(error["input"], dict | list)


def _detail(error: ErrorDetails) -> str:
    kind, ctx = error["type"], error.get("ctx", {})
    if kind in _PLAIN:
        return _PLAIN[kind]
    if kind in _BOUNDS:
        sign, key = _BOUNDS[kind]
        return f"must be {sign} {ctx[key]}"
    if kind == "literal_error":
        return f"must be {ctx['expected']}"
    if kind == "string_pattern_mismatch":
        return f"must match {ctx['pattern']}"
    if kind == "value_error":
        return str(ctx["error"])
    return _lower_first(error["msg"])


def _misplaced_hint(key: str, model: type[BaseModel]) -> str:
    if model not in _MISPLACED:
        return ""
    other, hint = _MISPLACED[model]
    return f" ({hint})" if key in other.model_fields else ""


def _short_repr(value: Any, limit: int = 40) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _key(part: int | str) -> str:
    """A key as written in TOML: bare when it can be, quoted otherwise."""
    text = str(part)
    return text if re.fullmatch(r"[A-Za-z0-9_-]+", text) else repr(text)


def _lower_first(text: str) -> str:
    return text[:1].lower() + text[1:]


def _config_error(message: str) -> ConfigError:
    """The promise is one line, whatever ended up in the message."""
    return ConfigError(message.replace("\r", "\\r").replace("\n", "\\n"))


__all__ = [
    "DEFAULT_CONFIG_PATH",
    "DOTENV_PATH",
    "EnvOverrides",
    "load_config",
    "read_env_overrides",
]
