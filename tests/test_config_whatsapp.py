"""config/: the WhatsApp keys, the [gateway] table, secrets and reserved ids."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from chatq.config import ChatqConfig, load_config
from chatq.shared.errors import ConfigError

TOKEN = "EAAG-very-secret-token"
APP_SECRET = "s3cr3t-app"
VERIFY = "verify-me"


@pytest.fixture(autouse=True)
def _in_tmp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)


def load(text: str, env: dict[str, str] | None = None) -> ChatqConfig:
    Path("tenants.toml").write_text(textwrap.dedent(text), encoding="utf-8")
    return load_config("tenants.toml", env=env or {})


def refused(text: str, env: dict[str, str] | None = None) -> str:
    with pytest.raises(ConfigError) as error:
        load(text, env)
    message = str(error.value)
    assert "\n" not in message
    for secret in (TOKEN, APP_SECRET, VERIFY):
        assert secret not in message
    return message


WA_TENANT = f"""
[[tenants]]
id = "acme"
transport = "whatsapp"
[tenants.whatsapp]
phone_number_id = "106540352242922"
access_token = "{TOKEN}"
"""


def test_a_whatsapp_tenant_gets_meta_defaults() -> None:
    config = load(WA_TENANT)
    wa = config.tenant("acme").whatsapp
    assert wa is not None
    assert wa.phone_number_id == "106540352242922"
    assert wa.access_token.get_secret_value() == TOKEN
    assert (wa.messages_per_second, wa.graph_url, wa.graph_version) == (
        80,
        "https://graph.facebook.com",
        "v23.0",
    )
    assert config.gateway is None


def test_secrets_come_from_env_and_files(tmp_path: Path) -> None:
    (tmp_path / "creds").mkdir()
    (tmp_path / "creds" / "app").write_text(APP_SECRET + "\n")  # LoadCredential style
    config = load(
        """
        [[tenants]]
        id = "acme"
        transport = "whatsapp"
        [tenants.whatsapp]
        phone_number_id = "1"
        access_token = "env:ACME_WA_TOKEN"
        app_secret = "file:creds/app"
        """,
        env={"ACME_WA_TOKEN": TOKEN},
    )
    wa = config.tenant("acme").whatsapp
    assert wa.access_token.get_secret_value() == TOKEN
    assert wa.app_secret.get_secret_value() == APP_SECRET


def test_secrets_never_show_in_reprs() -> None:
    config = load(WA_TENANT)
    for text in (repr(config), str(config), repr(config.tenant("acme"))):
        assert TOKEN not in text


def test_a_missing_variable_or_file_names_the_tenant_and_key() -> None:
    text = WA_TENANT.replace(TOKEN, "env:ACME_WA_TOKEN")
    assert refused(text) == (
        "tenants.toml: tenants[0] (acme): whatsapp.access_token:"
        " environment variable ACME_WA_TOKEN is not set"
    )
    message = refused(WA_TENANT.replace(TOKEN, "file:nope/token"))
    assert message.startswith("tenants.toml: tenants[0] (acme): whatsapp.access_token: secret file")
    assert message.endswith("nope/token not found")


def test_defaults_whatsapp_merges_key_by_key() -> None:
    config = load(
        f"""
        [defaults.whatsapp]
        graph_url = "http://127.0.0.1:9999/"
        access_token = "{TOKEN}"
        messages_per_second = 20
        [[tenants]]
        id = "acme"
        transport = "whatsapp"
        [tenants.whatsapp]
        phone_number_id = "1"
        messages_per_second = 1000
        [[tenants]]
        id = "plain"
        """
    )
    acme = config.tenant("acme").whatsapp
    assert acme.graph_url == "http://127.0.0.1:9999"
    assert acme.messages_per_second == 1000
    assert acme.access_token.get_secret_value() == TOKEN
    assert config.tenant("plain").whatsapp is None


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (
            '[[tenants]]\nid = "acme"\ntransport = "whatsapp"\n',
            'tenants.toml: tenants[0] (acme): whatsapp: required when transport = "whatsapp"',
        ),
        (
            WA_TENANT.replace('"106540352242922"', '"+1 555"'),
            "tenants.toml: tenants[0] (acme): whatsapp.phone_number_id: must match",
        ),
        (
            WA_TENANT + "messages_per_second = 0\n",
            "tenants.toml: tenants[0] (acme): whatsapp.messages_per_second: must be >= 1",
        ),
        (
            WA_TENANT + 'colour = "red"\n',
            "tenants.toml: tenants[0] (acme): whatsapp.colour: unknown key",
        ),
        (
            WA_TENANT.replace(f'"{TOKEN}"', '""'),
            "tenants.toml: tenants[0] (acme): whatsapp.access_token: must not be empty",
        ),
        (
            WA_TENANT + WA_TENANT.replace('"acme"', '"globex"'),
            "tenants.toml: tenants[1] (globex): whatsapp.phone_number_id: 106540352242922"
            " already used by tenants[0] (acme)",
        ),
        (
            '[[tenants]]\nid = "gateway"\n',
            "tenants.toml: tenants[0] (gateway): id: 'gateway' is reserved",
        ),
        (
            '[[tenants]]\nid = "supervisor"\n',
            "tenants.toml: tenants[0] (supervisor): id: 'supervisor' is reserved",
        ),
        (
            '[defaults.whatsapp]\nmessages_per_second = "fast"\n[[tenants]]\nid = "a"\n',
            "tenants.toml: defaults: whatsapp.messages_per_second: must be an integer",
        ),
    ],
)
def test_bad_whatsapp_config_is_one_line(text: str, expected: str) -> None:
    assert refused(text).startswith(expected)


GATEWAY = f"""
[gateway]
listen = "127.0.0.1:8080"
[gateway.whatsapp]
app_secret = "{APP_SECRET}"
verify_token = "env:WA_VERIFY_TOKEN"
"""


def test_gateway_table() -> None:
    config = load(GATEWAY + WA_TENANT, env={"WA_VERIFY_TOKEN": VERIFY})
    gateway = config.gateway
    assert (gateway.host, gateway.port) == ("127.0.0.1", 8080)
    assert gateway.whatsapp.verify_token.get_secret_value() == VERIFY
    assert VERIFY not in repr(config) and APP_SECRET not in repr(config)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (
            GATEWAY.replace("127.0.0.1:8080", "8080") + WA_TENANT,
            'tenants.toml: gateway: listen: must be "host:port"',
        ),
        (
            GATEWAY + WA_TENANT,
            "tenants.toml: gateway: whatsapp.verify_token: environment variable WA_VERIFY_TOKEN",
        ),
        (
            GATEWAY.replace(f'app_secret = "{APP_SECRET}"\n', "") + WA_TENANT,
            "tenants.toml: tenants[0] (acme): whatsapp.app_secret: required when"
            " [gateway.whatsapp] has no app_secret",
        ),
        (
            '[gateway]\nlisten = "127.0.0.1:8080"\n' + WA_TENANT,
            "tenants.toml: gateway: whatsapp: missing",
        ),
        (
            GATEWAY.replace("env:WA_VERIFY_TOKEN", VERIFY)
            + "[supervisor]\nmetrics_port = 8080\n"
            + WA_TENANT,
            "tenants.toml: gateway: listen: port 8080 already used by supervisor metrics_port",
        ),
    ],
)
def test_bad_gateway_config_is_one_line(text: str, expected: str) -> None:
    env = {} if "WA_VERIFY_TOKEN" in expected else {"WA_VERIFY_TOKEN": VERIFY}
    assert refused(text, env).startswith(expected)


def test_commands_that_need_no_secret_load_without_them() -> None:
    text = WA_TENANT.replace(TOKEN, "env:ACME_WA_TOKEN")
    Path("tenants.toml").write_text(textwrap.dedent(text), encoding="utf-8")
    config = load_config("tenants.toml", env={}, secrets=False)
    wa = config.tenant("acme").whatsapp
    assert wa is not None and wa.access_token.get_secret_value() == "<unresolved>"
    with pytest.raises(ConfigError, match="ACME_WA_TOKEN is not set"):
        load_config("tenants.toml", env={})
