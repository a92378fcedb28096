"""Tests for config/: the models, file + environment layering, one-line errors.

Every test runs in its own tmp_path as the current directory and passes the
environment explicitly, so neither the real environment nor a developer's
.env can leak in.
"""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest
from pydantic import ValidationError

from chatq.config import (
    DEFAULT_CONFIG_PATH,
    ChatqConfig,
    SupervisorSettings,
    TenantConfig,
    load_config,
)
from chatq.config.loader import read_env_overrides
from chatq.shared.errors import ConfigError, NoSuchTenant

REPO = Path(__file__).resolve().parent.parent
DEMO = REPO / "config" / "tenants.toml"

ONE_TENANT = """
[[tenants]]
id = "acme"
"""


@pytest.fixture(autouse=True)
def _in_tmp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)


def write(text: str, name: str = "tenants.toml") -> Path:
    """Write a config file (relative to the tmp cwd) and return its path."""
    path = Path(name)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(text), encoding="utf-8")
    return path


# --- loading what is valid -----------------------------------------------------


def test_demo_file_loads_three_echo_tenants_under_the_repo_root() -> None:
    config = load_config(DEMO, env={})

    assert [t.id for t in config.tenants] == ["acme", "globex", "initech"]
    assert {(t.handler, t.transport) for t in config.tenants} == {("echo", "local")}
    assert config.path == DEMO
    assert config.supervisor.run_dir == REPO / "run"
    assert config.supervisor.data_dir == REPO / "data"
    assert config.tenant("globex").max_queue_size == 100


def test_built_in_defaults_apply_to_a_minimal_file() -> None:
    config = load_config(write(ONE_TENANT), env={})

    tenant = config.tenant("acme")
    assert tenant == TenantConfig(id="acme")
    assert (tenant.max_queue_size, tenant.rate_limit_per_minute, tenant.handler) == (50, 10, "echo")
    assert tenant.wait_text == "Please wait…"
    sup = config.supervisor
    assert (sup.heartbeat_interval_ms, sup.log_level, sup.log_format) == (1000, "INFO", "text")
    assert sup.heartbeat_timeout_s == 5.0  # five missed intervals
    assert sup.log_file is None


def test_explicit_heartbeat_timeout_wins_over_five_intervals() -> None:
    settings = SupervisorSettings(heartbeat_interval_ms=200, heartbeat_timeout_ms=700)
    assert settings.heartbeat_timeout_s == 0.7
    assert SupervisorSettings(heartbeat_interval_ms=200).heartbeat_timeout_s == 1.0


def test_defaults_table_applies_to_every_tenant() -> None:
    path = write("""
        [defaults]
        handler = "mybot.handlers:reply"
        max_attempts = 5
        [[tenants]]
        id = "a"
        [[tenants]]
        id = "b"
        max_attempts = 1
    """)
    config = load_config(path, env={})

    assert [t.handler for t in config.tenants] == ["mybot.handlers:reply"] * 2
    assert [t.max_attempts for t in config.tenants] == [5, 1]


LAYERED = """
    [supervisor]
    heartbeat_interval_ms = 500
    log_level = "warning"
    [defaults]
    max_queue_size = 5
    rate_limit_per_minute = 7
    [[tenants]]
    id = "plain"
    [[tenants]]
    id = "own"
    max_queue_size = 3
"""


def test_file_tables_apply_without_environment() -> None:
    config = load_config(write(LAYERED), env={})

    plain = config.tenant("plain")
    assert (plain.max_queue_size, plain.rate_limit_per_minute) == (5, 7)
    assert config.supervisor.heartbeat_interval_ms == 500
    assert config.supervisor.log_level == "WARNING"


def test_per_tenant_key_beats_environment_beats_file_tables() -> None:
    env = {
        "MAX_QUEUE_SIZE": "20",
        "RATE_LIMIT_MAX_PER_MINUTE": "30",
        "HEARTBEAT_INTERVAL_MS": "200",
        "LOG_LEVEL": "debug",
        "LOG_FORMAT": "JSON",
    }
    config = load_config(write(LAYERED), env=env)

    plain, own = config.tenant("plain"), config.tenant("own")
    assert (plain.max_queue_size, plain.rate_limit_per_minute) == (20, 30)
    assert (own.max_queue_size, own.rate_limit_per_minute) == (3, 30)
    sup = config.supervisor
    assert (sup.heartbeat_interval_ms, sup.log_level, sup.log_format) == (200, "DEBUG", "json")


def test_empty_environment_variable_counts_as_unset() -> None:
    config = load_config(write(LAYERED), env={"MAX_QUEUE_SIZE": "", "LOG_LEVEL": ""})
    assert config.tenant("plain").max_queue_size == 5
    assert config.supervisor.log_level == "WARNING"


def test_dotenv_file_is_read_and_the_environment_beats_it(tmp_path: Path) -> None:
    dotenv = tmp_path / ".env"
    dotenv.write_text("MAX_QUEUE_SIZE=7\nLOG_LEVEL=error\nUNRELATED=x\n", encoding="utf-8")

    overrides = read_env_overrides({"LOG_LEVEL": "debug"}, env_file=dotenv)

    assert (overrides.MAX_QUEUE_SIZE, overrides.LOG_LEVEL) == (7, "debug")


def test_relative_paths_resolve_against_the_files_folder(tmp_path: Path) -> None:
    path = write(
        """
        [supervisor]
        run_dir = "sockets"
        data_dir = "../stores"
        log_file = "logs/chatq.log"
        [[tenants]]
        id = "acme"
        """,
        name="etc/chatq/tenants.toml",
    )
    config = load_config(path, env={})

    assert config.path == tmp_path / "etc" / "chatq" / "tenants.toml"
    assert config.supervisor.run_dir == tmp_path / "etc" / "chatq" / "sockets"
    assert config.supervisor.data_dir == tmp_path / "etc" / "stores"
    assert config.supervisor.log_file == tmp_path / "etc" / "chatq" / "logs" / "chatq.log"


def test_default_dirs_and_absolute_paths(tmp_path: Path) -> None:
    absolute = tmp_path / "elsewhere"
    path = write(
        f"""
        [supervisor]
        data_dir = "{absolute}"
        [[tenants]]
        id = "acme"
        """,
        name="conf/tenants.toml",
    )
    config = load_config(path, env={})

    assert config.supervisor.run_dir == tmp_path / "conf" / "run"
    assert config.supervisor.data_dir == absolute


def test_file_choice_default_then_chatq_config_then_argument(tmp_path: Path) -> None:
    write(ONE_TENANT, name=str(DEFAULT_CONFIG_PATH))
    write(ONE_TENANT.replace("acme", "from-env"), name="env.toml")
    write(ONE_TENANT.replace("acme", "from-arg"), name="arg.toml")

    assert load_config(env={}).path == tmp_path / "config" / "tenants.toml"
    assert load_config(env={"CHATQ_CONFIG": "env.toml"}).tenants[0].id == "from-env"
    assert load_config("arg.toml", env={"CHATQ_CONFIG": "env.toml"}).tenants[0].id == "from-arg"


def test_paths_derived_from_the_tenant_id(tmp_path: Path) -> None:
    config = load_config(write(ONE_TENANT), env={})

    assert config.store_path("acme") == tmp_path / "data" / "acme.sqlite3"
    assert config.socket_path("acme") == tmp_path / "run" / "acme.sock"
    assert config.control_socket == tmp_path / "run" / "supervisor.sock"


def test_unknown_tenant_and_unsafe_ids_raise_no_such_tenant() -> None:
    config = load_config(write(ONE_TENANT), env={})

    with pytest.raises(NoSuchTenant):
        config.tenant("globex")
    with pytest.raises(NoSuchTenant):
        config.store_path("../../etc/passwd")
    with pytest.raises(NoSuchTenant):
        config.socket_path("acme\n")


def test_configs_compare_and_hash_by_value_so_reload_can_diff() -> None:
    first = load_config(DEMO, env={})
    again = load_config(DEMO, env={})
    changed = load_config(DEMO, env={"RATE_LIMIT_MAX_PER_MINUTE": "99"})

    assert first == again
    assert hash(first) == hash(again)
    assert set(first.tenants) == set(again.tenants)
    assert first.tenant("acme") != changed.tenant("acme")
    with pytest.raises(ValidationError):
        first.tenant("acme").max_queue_size = 1  # type: ignore[misc]


def test_chatq_config_accepts_a_list_of_tenants() -> None:
    config = ChatqConfig(
        path=Path("/x/tenants.toml"),
        supervisor=SupervisorSettings(),
        tenants=[TenantConfig(id="a")],
    )
    assert config.tenants == (TenantConfig(id="a"),)


@pytest.mark.parametrize(
    ("field", "value"),
    [("max_queue_size", "5"), ("max_queue_size", 2.5), ("max_queue_size", True), ("enabled", 1)],
)
def test_models_are_strict(field: str, value: object) -> None:
    with pytest.raises(ValidationError):
        TenantConfig.model_validate({"id": "acme", field: value})


# --- refusing what is not ------------------------------------------------------

T = '[[tenants]]\nid = "acme"\n'  # one valid tenant, to make other mistakes stand alone
BAD_FILES = [
    ("not-found", None, "tenants.toml: not found"),
    (
        "syntax",
        '[supervisor]\nrun_dir = "r"\nmax_restarts = \n',
        "tenants.toml: line 3: TOML syntax error: invalid value (column 16)",
    ),
    ("no-tenants", '[supervisor]\nrun_dir = "r"\n', "tenants.toml: no tenants"),
    ("empty-file", "", "tenants.toml: no tenants"),
    ("unknown-table", "[extras]\nx = 1\n" + T, "tenants.toml: extras: unknown top-level key"),
    ("tenants-not-array", '[tenants]\nid = "acme"\n', "tenants.toml: tenants: must be an array"),
    (
        "tenant-field",
        T + '[[tenants]]\nid = "globex"\nmax_queue_size = 0\n',
        "tenants.toml: tenants[1] (globex): max_queue_size: must be >= 1 (got 0)",
    ),
    (
        "int-from-string",
        T + 'max_queue_size = "5"\n',
        "tenants.toml: tenants[0] (acme): max_queue_size: must be an integer (got '5')",
    ),
    (
        "int-with-fraction",
        T + "max_queue_size = 2.5\n",
        "tenants.toml: tenants[0] (acme): max_queue_size: must be an integer (got 2.5)",
    ),
    (
        "bool-from-int",
        T + "enabled = 1\n",
        "tenants.toml: tenants[0] (acme): enabled: must be true or false (got 1)",
    ),
    (
        "infinite-float",
        T + "handler_timeout = inf\n",
        "tenants.toml: tenants[0] (acme): handler_timeout: must be a finite number (got inf)",
    ),
    (
        "port-range",
        T + "port = 70000\n",
        "tenants.toml: tenants[0] (acme): port: must be <= 65535 (got 70000)",
    ),
    (
        "supervisor-field",
        "[supervisor]\nheartbeat_interval_ms = 5\n" + T,
        "tenants.toml: supervisor: heartbeat_interval_ms: must be >= 10 (got 5)",
    ),
    (
        "supervisor-log-level",
        '[supervisor]\nlog_level = "loud"\n' + T,
        "tenants.toml: supervisor: log_level: must be one of TRACE, DEBUG, INFO, SUCCESS,"
        " WARNING, ERROR, CRITICAL (got 'loud')",
    ),
    (
        "supervisor-cross-field",
        "[supervisor]\nheartbeat_interval_ms = 1000\nheartbeat_timeout_ms = 800\n" + T,
        "tenants.toml: supervisor: heartbeat_timeout_ms: must be greater than"
        " heartbeat_interval_ms",
    ),
    (
        "supervisor-gets-tenant-key",
        "[supervisor]\nmax_queue_size = 3\n" + T,
        "tenants.toml: supervisor: max_queue_size: unknown key"
        " (a tenant key: use [defaults] or [[tenants]])",
    ),
    (
        "defaults-handler",
        '[defaults]\nhandler = "not a handler"\n' + T,
        'tenants.toml: defaults: handler: must be "echo", "http" or "module.path:function"'
        " (got 'not a handler')",
    ),
    (
        "defaults-bad-even-if-overridden",
        "[defaults]\nmax_attempts = 0\n" + T + "max_attempts = 2\n",
        "tenants.toml: defaults: max_attempts: must be >= 1 (got 0)",
    ),
    (
        "defaults-id",
        '[defaults]\nid = "x"\n' + T,
        "tenants.toml: defaults: id: not allowed (each tenant names itself)",
    ),
    (
        "defaults-gets-supervisor-key",
        '[defaults]\nlog_level = "DEBUG"\n' + T,
        "tenants.toml: defaults: log_level: unknown key (it belongs in [supervisor])",
    ),
    ("missing-id", "[[tenants]]\nmax_queue_size = 5\n", "tenants.toml: tenants[0]: id: missing"),
    (
        "bad-id",
        '[[tenants]]\nid = "Acme Corp"\n',
        "tenants.toml: tenants[0]: id: must match ^[a-z0-9][a-z0-9_-]{0,62}$ (got 'Acme Corp')",
    ),
    (
        "duplicate-id",
        T + '[[tenants]]\nid = "globex"\n' + T,
        "tenants.toml: tenants[2] (acme): id: duplicate tenant id (also tenants[0] (acme))",
    ),
    ("unknown-key", T + 'colour = "red"\n', "tenants.toml: tenants[0] (acme): colour: unknown key"),
    (
        "unknown-key-with-newline",
        T + '"a\\nb" = 1\n',
        "tenants.toml: tenants[0] (acme): 'a\\nb': unknown key",
    ),
    (
        "http-handler-without-url",
        T + 'handler = "http"\n',
        'tenants.toml: tenants[0] (acme): handler_url: required when handler = "http"',
    ),
    (
        "handler-url-scheme",
        T + 'handler = "http"\nhandler_url = "ftp://bot"\n',
        "tenants.toml: tenants[0] (acme): handler_url: must be an http:// or https:// URL"
        " (got 'ftp://bot')",
    ),
    (
        "webhook-without-url",
        T + 'transport = "webhook"\n',
        'tenants.toml: tenants[0] (acme): webhook_url: required when transport = "webhook"',
    ),
    (
        "transport-choice",
        T + 'transport = "carrier-pigeon"\n',
        "tenants.toml: tenants[0] (acme): transport: must be 'local', 'webhook' or 'whatsapp'"
        " (got 'carrier-pigeon')",
    ),
    (
        "empty-wait-text",
        T + 'wait_text = ""\n',
        "tenants.toml: tenants[0] (acme): wait_text: must not be empty (got '')",
    ),
    (
        "shared-port",
        T + 'port = 8080\n[[tenants]]\nid = "globex"\nport = 8080\n',
        "tenants.toml: tenants[1] (globex): port: 8080 already used by tenants[0] (acme)",
    ),
    (
        "run-dir-too-deep",
        f'[supervisor]\nrun_dir = "/{"d" * 120}"\n' + T,
        "tenants.toml: supervisor: run_dir: too deep for unix sockets",
    ),
]
BAD_ENV = [
    ("MAX_QUEUE_SIZE", "0", "environment: MAX_QUEUE_SIZE: must be >= 1 (got 0)"),
    ("MAX_QUEUE_SIZE", "abc", "environment: MAX_QUEUE_SIZE: must be an integer (got 'abc')"),
    ("MAX_QUEUE_SIZE", "2.5", "environment: MAX_QUEUE_SIZE: must be an integer (got '2.5')"),
    (
        "RATE_LIMIT_MAX_PER_MINUTE",
        "-1",
        "environment: RATE_LIMIT_MAX_PER_MINUTE: must be >= 1 (got -1)",
    ),
    ("HEARTBEAT_INTERVAL_MS", "1", "environment: HEARTBEAT_INTERVAL_MS: must be >= 10 (got 1)"),
    ("LOG_LEVEL", "loud", "environment: LOG_LEVEL: must be one of TRACE, DEBUG, INFO,"),
    ("LOG_FORMAT", "xml", "environment: LOG_FORMAT: must be 'text' or 'json' (got 'xml')"),
]


def assert_one_line_error(error: pytest.ExceptionInfo[ConfigError], expected: str) -> None:
    message = str(error.value)
    assert "\n" not in message
    assert "pydantic" not in message
    assert message.startswith(expected), message


@pytest.mark.parametrize(
    ("text", "expected"),
    [pytest.param(text, expected, id=name) for name, text, expected in BAD_FILES],
)
def test_bad_file_is_refused_with_one_line(text: str | None, expected: str) -> None:
    if text is not None:
        write(text)
    with pytest.raises(ConfigError) as error:
        load_config("tenants.toml", env={})
    assert_one_line_error(error, expected)


@pytest.mark.parametrize(
    ("name", "value", "expected"),
    [pytest.param(*case, id=f"{case[0]}={case[1]}") for case in BAD_ENV],
)
def test_bad_environment_is_refused_even_when_tenants_override_it(
    name: str, value: str, expected: str
) -> None:
    # Both tenant-level variables are set per tenant: a bad value still counts.
    path = write(T + "max_queue_size = 5\nrate_limit_per_minute = 5\n")
    with pytest.raises(ConfigError) as error:
        load_config(path, env={name: value})
    assert_one_line_error(error, expected)


def test_error_names_the_file_as_given(tmp_path: Path) -> None:
    write("[[tenants]]\n", name="deploy/prod.toml")
    with pytest.raises(ConfigError) as error:
        load_config("deploy/prod.toml", env={})
    assert_one_line_error(error, "deploy/prod.toml: tenants[0]: id: missing")


def test_default_stop_grace_covers_the_default_drain_and_a_short_one_is_warned_of() -> None:
    from chatq.tenant_worker.worker import stop_grace_warning

    config = load_config(write(ONE_TENANT), env={})
    assert stop_grace_warning(config, config.tenant("acme")) is None
    demo = load_config(DEMO, env={})
    assert all(stop_grace_warning(demo, tenant) is None for tenant in demo.tenants)

    short = load_config(
        write('[supervisor]\nstop_grace = 11.0\n[[tenants]]\nid = "acme"\ndrain_timeout = 9.5\n'),
        env={},
    )
    warning = stop_grace_warning(short, short.tenant("acme"))
    assert warning is not None
    assert warning.startswith("stop_grace (11s) < drain_timeout (9.5s) + 2s: a stop may SIGKILL")
