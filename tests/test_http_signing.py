"""Outgoing HTTP (http handler, webhook transport): configured headers, the body's
HMAC signature, Retry-After, the webhook's own retry schedule; secrets never shown."""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from http_fakes import FakeService, serving

from chatq.config import load_config
from chatq.config.settings import TenantConfig
from chatq.shared.errors import ConfigError, HandlerError, RetryableTransportError
from chatq.tenant_worker.handlers import HttpHandler, load_handler
from chatq.tenant_worker.handlers.base import HandlerContext
from chatq.tenant_worker.http_client import RETRY_AFTER_MAX, retry_after
from chatq.tenant_worker.messages import Message
from chatq.tenant_worker.transports import make_transport
from chatq.tenant_worker.worker import _reply_schedule

SECRET = "s3cret-signing-key"


@pytest.fixture
async def service() -> AsyncIterator[FakeService]:
    async with serving("/hook") as fake:
        yield fake


def tenant(url: str, **keys: Any) -> TenantConfig:
    return TenantConfig.model_validate(
        {
            "id": "t",
            "transport": "webhook",
            "webhook_url": url,
            "handler": "http",
            "handler_url": url,
            **keys,
        }
    )


def expected_signature(body: bytes) -> str:
    return "sha256=" + hmac.new(SECRET.encode(), body, hashlib.sha256).hexdigest()


async def test_webhook_and_handler_send_headers_and_sign_the_exact_body(
    service: FakeService,
) -> None:
    config = tenant(
        service.url,
        signing_secret=SECRET,
        webhook_headers={"Authorization": "Bearer hook-token"},
        handler_headers={"Authorization": "Bearer handler-token", "X-Team": "ops"},
    )
    transport = make_transport(config)
    handler = load_handler(config)
    try:
        service.answer(200, b'{"reply": "hi"}')
        await transport.send("c1", "héllo")
        message = Message(id="m1", chat_id="c1", text="x", tenant_id="t")
        assert await handler.handle(message, HandlerContext("t", 1)) == ["hi"]
    finally:
        await transport.aclose()
        await handler.aclose()
    for raw, headers in zip(service.raw, service.headers, strict=True):
        assert headers["X-Chatq-Signature"] == expected_signature(raw)
    assert service.headers[0]["Authorization"] == "Bearer hook-token"
    assert service.headers[1]["Authorization"] == "Bearer handler-token"
    assert service.headers[1]["X-Team"] == "ops"


async def test_no_secret_no_signature(service: FakeService) -> None:
    transport = make_transport(tenant(service.url))
    try:
        await transport.send("c1", "hi")
    finally:
        await transport.aclose()
    assert "X-Chatq-Signature" not in service.headers[0]


@pytest.mark.parametrize("status", [429, 503])
async def test_retry_after_rides_the_error(service: FakeService, status: int) -> None:
    service.answer(status)
    service.reply_headers = {"Retry-After": "120"}
    transport = make_transport(tenant(service.url))
    handler = HttpHandler(service.url, 5.0)
    try:
        with pytest.raises(RetryableTransportError) as sent:
            await transport.send("c1", "hi")
        with pytest.raises(HandlerError) as handled:
            await handler.handle(Message("m1", "c1", "x", "t"), HandlerContext("t", 1))
    finally:
        await transport.aclose()
        await handler.aclose()
    assert sent.value.retry_after == handled.value.retry_after == 120.0


def test_retry_after_values() -> None:
    now = 1_800_000_000.0
    assert retry_after("30", now) == 30.0
    assert retry_after("Fri, 15 Jan 2027 08:00:30 GMT", 1_800_000_000.0) is not None
    assert retry_after("Wed, 21 Oct 2015 07:28:00 GMT", now) == 0.0  # in the past: now
    assert retry_after("999999", now) == RETRY_AFTER_MAX
    assert retry_after("soon", now) is None
    assert retry_after(None, now) is None


def test_the_webhook_has_its_own_retry_schedule() -> None:
    assert _reply_schedule(tenant("http://127.0.0.1:9/x")) == {
        "retry_backoff": 2.0,
        "max_attempts": 12,
    }
    custom = tenant("http://127.0.0.1:9/x", webhook_max_attempts=3, webhook_retry_backoff=0.5)
    assert _reply_schedule(custom) == {"retry_backoff": 0.5, "max_attempts": 3}
    assert _reply_schedule(TenantConfig(id="t", retry_backoff=4.0)) == {"retry_backoff": 4.0}


def write(tmp_path: Path, tenant_lines: str) -> Path:
    path = tmp_path / "tenants.toml"
    path.write_text(
        '[[tenants]]\nid = "acme"\nhandler = "http"\nhandler_url = "http://127.0.0.1:9/h"\n'
        + tenant_lines
    )
    return path


def test_header_and_signing_secrets_come_from_env_or_file(tmp_path: Path) -> None:
    (tmp_path / "key.txt").write_text("from-a-file\n")
    path = write(
        tmp_path,
        'signing_secret = "file:key.txt"\n'
        '[tenants.handler_headers]\nAuthorization = "env:ACME_TOKEN"\n',
    )
    config = load_config(path, env={"ACME_TOKEN": "Bearer abc"})
    acme = config.tenant("acme")
    assert acme.signing_secret is not None
    assert acme.signing_secret.get_secret_value() == "from-a-file"
    assert dict(acme.handler_headers)["Authorization"].get_secret_value() == "Bearer abc"
    assert hash(acme) == hash(load_config(path, env={"ACME_TOKEN": "Bearer abc"}).tenant("acme"))
    assert "Bearer abc" not in repr(acme) and "from-a-file" not in repr(acme)


@pytest.mark.parametrize(
    ("lines", "needle"),
    [
        ('[tenants.handler_headers]\n"Bad Name" = "Bearer hidden-value"\n', "not a header name"),
        ('[tenants.webhook_headers]\nX-Chatq-Signature = "hidden-value"\n', "sets this header"),
        ('[tenants.handler_headers]\nAuthorization = "env:MISSING"\n', "MISSING is not set"),
        ("[tenants.handler_headers]\nAuthorization = 7\n", "handler_headers"),
        ('signing_secret = ""\n', "must not be empty"),
    ],
)
def test_bad_headers_are_refused_without_showing_values(
    tmp_path: Path, lines: str, needle: str
) -> None:
    with pytest.raises(ConfigError) as refused:
        load_config(write(tmp_path, lines), env={})
    assert needle in str(refused.value) and "hidden-value" not in str(refused.value)
