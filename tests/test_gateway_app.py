"""The gateway's HTTP rules in-process: handshake, signatures, limits, routing, answers."""

from __future__ import annotations

import io
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from pydantic import SecretStr
from whatsapp_payloads import change, status, text_message, update

from chatq.config import ChatqConfig, TenantConfig
from chatq.config.settings import (
    GatewaySettings,
    GatewayWhatsApp,
    SupervisorSettings,
    WhatsAppSettings,
)
from chatq.shared.errors import ForwardError
from chatq.shared.http_server import HttpServer
from chatq.shared.whatsapp.webhook import Routed, sign
from chatq.supervisor.gateway.app import GatewayApp
from chatq.supervisor.gateway.routes import Routes
from chatq.supervisor.gateway.stats import GatewayStats

APP_SECRET = "gateway-app-secret"
OWN_SECRET = "globex-own-secret"
VERIFY = "verify-me"
LIMIT = 64 * 1024


def whatsapp(number: str, app_secret: str | None = None) -> WhatsAppSettings:
    secret = SecretStr(app_secret) if app_secret else None
    return WhatsAppSettings(
        phone_number_id=number, access_token=SecretStr("token"), app_secret=secret
    )


def make_config(gateway_secret: str | None = APP_SECRET) -> ChatqConfig:
    return ChatqConfig(
        path=Path("/nowhere/tenants.toml"),
        supervisor=SupervisorSettings(),
        tenants=(
            TenantConfig(id="acme", whatsapp=whatsapp("111")),
            TenantConfig(id="globex", whatsapp=whatsapp("222", OWN_SECRET)),
            TenantConfig(id="plain"),
        ),
        gateway=GatewaySettings(
            listen="127.0.0.1:1",
            whatsapp=GatewayWhatsApp(
                app_secret=SecretStr(gateway_secret) if gateway_secret else None,
                verify_token=SecretStr(VERIFY),
            ),
        ),
    )


@dataclass
class FakeForward:
    """Records each tenant's part; fails the tenants in `failing`."""

    parts: dict[str, list[Routed]] = field(default_factory=dict)
    failing: set[str] = field(default_factory=set)

    async def __call__(self, tenant: str, part: Routed) -> None:
        if tenant in self.failing:
            raise ForwardError(f"tenant {tenant}: 503 tenant {tenant} is starting")
        self.parts.setdefault(tenant, []).append(part)


@dataclass
class Rig:
    client: aiohttp.ClientSession
    forward: FakeForward
    stats: GatewayStats

    async def post(
        self, body: object, *, path: str = "/whatsapp", secret: str | None = APP_SECRET
    ) -> tuple[int, dict[str, Any]]:
        raw = body if isinstance(body, bytes) else json.dumps(body).encode()
        headers = {"X-Hub-Signature-256": sign(raw, secret)} if secret else {}
        async with self.client.post(path, data=io.BytesIO(raw), headers=headers) as response:
            return response.status, await response.json()


async def make_rig(config: ChatqConfig) -> AsyncIterator[Rig]:
    forward, stats = FakeForward(), GatewayStats()
    app = GatewayApp(Routes(config), VERIFY, forward, stats, max_body_bytes=LIMIT)
    server = await HttpServer(app.handle, max_body_bytes=LIMIT).listen("127.0.0.1", 0)
    try:
        async with aiohttp.ClientSession(f"http://127.0.0.1:{server.port}") as client:
            yield Rig(client, forward, stats)
    finally:
        await server.close(grace=1.0)


@pytest.fixture
async def rig() -> AsyncIterator[Rig]:
    async for made in make_rig(make_config()):
        yield made


def two_tenants() -> dict[str, Any]:
    return update(
        change("111", messages=[text_message("wamid.a1"), text_message("wamid.a2")]),
        change("222", messages=[text_message("wamid.g1")], statuses=[status("o1", "read")]),
        entries=2,
    )


# -- handshake ---------------------------------------------------------------------


@pytest.mark.parametrize("path", ["/whatsapp", "/whatsapp/globex"])
async def test_the_handshake_echoes_the_challenge(rig: Rig, path: str) -> None:
    query = {"hub.mode": "subscribe", "hub.verify_token": VERIFY, "hub.challenge": "1158201444"}
    async with rig.client.get(path, params=query) as response:
        assert (response.status, await response.text()) == (200, "1158201444")
        assert response.content_type == "text/plain"


@pytest.mark.parametrize(
    "query",
    [
        {"hub.mode": "subscribe", "hub.verify_token": "wrong", "hub.challenge": "1"},
        {"hub.mode": "unsubscribe", "hub.verify_token": VERIFY, "hub.challenge": "1"},
        {"hub.challenge": "1"},
    ],
)
async def test_a_wrong_handshake_is_403(rig: Rig, query: dict[str, str]) -> None:
    async with rig.client.get("/whatsapp", params=query) as response:
        assert response.status == 403
        assert VERIFY not in await response.text()


async def test_the_handshake_of_an_unknown_tenant_is_403(rig: Rig) -> None:
    query = {"hub.mode": "subscribe", "hub.verify_token": VERIFY, "hub.challenge": "1"}
    async with rig.client.get("/whatsapp/nobody", params=query) as response:
        assert response.status == 403


# -- signatures and bodies ------------------------------------------------------------


async def test_a_signed_update_is_split_by_tenant_and_answered_200(rig: Rig) -> None:
    assert await rig.post(two_tenants()) == (
        200,
        {"messages": 3, "statuses": 1, "unknown_numbers": 0},
    )
    assert [m["id"] for m in rig.forward.parts["acme"][0].messages] == ["wamid.a1", "wamid.a2"]
    assert [s.id for s in rig.forward.parts["globex"][0].statuses] == ["o1"]


async def test_no_signature_is_401_and_forwards_nothing(rig: Rig) -> None:
    status_code, answer = await rig.post(two_tenants(), secret=None)
    assert (status_code, answer["error"]) == (401, "missing X-Hub-Signature-256")
    assert rig.forward.parts == {}


async def test_a_wrong_signature_is_403_and_forwards_nothing(rig: Rig) -> None:
    status_code, _ = await rig.post(two_tenants(), secret="not the secret")
    assert status_code == 403
    assert rig.forward.parts == {}


async def test_bad_json_with_a_good_signature_is_400(rig: Rig) -> None:
    assert await rig.post(b'{"entry": [') == (400, {"error": "body is not JSON"})


async def test_a_signed_body_of_the_wrong_shape_is_400_naming_it(rig: Rig) -> None:
    status_code, answer = await rig.post({"entry": [{"changes": 5}]})
    assert (status_code, answer["error"]) == (400, "entry[0].changes: must be a list, got int")


async def test_a_body_over_the_limit_is_413(rig: Rig) -> None:
    status_code, _ = await rig.post(b" " * (LIMIT + 1))
    assert status_code == 413
    assert rig.forward.parts == {}


async def test_no_app_secret_for_the_path_is_403() -> None:
    async for rig in make_rig(make_config(gateway_secret=None)):
        assert (await rig.post(two_tenants(), secret="anything"))[0] == 403
        # globex has its own app: its path still works
        body = update(change("222", messages=[text_message("wamid.g9")]))
        assert (await rig.post(body, path="/whatsapp/globex", secret=OWN_SECRET))[0] == 200


# -- per-tenant paths ---------------------------------------------------------------------


async def test_a_tenant_path_takes_its_own_secret_and_only_its_own_number(rig: Rig) -> None:
    code, answer = await rig.post(two_tenants(), path="/whatsapp/globex", secret=OWN_SECRET)
    assert (code, answer["unknown_numbers"]) == (200, 1)  # 111 is acme's: not via globex's app
    assert list(rig.forward.parts) == ["globex"]
    assert (await rig.post(two_tenants(), path="/whatsapp/globex"))[0] == 403


async def test_a_tenant_path_carries_the_numbers_of_its_app() -> None:
    """Two tenants' numbers in one Meta app, its callback set to one tenant's path:
    both are routed (the same secret signed them), not dropped as unknown."""
    config = make_config()
    tenants = (*config.tenants, TenantConfig(id="initech", whatsapp=whatsapp("333", OWN_SECRET)))
    async for rig in make_rig(config.model_copy(update={"tenants": tenants})):
        body = update(
            change("222", messages=[text_message("wamid.g1")]),
            change("333", messages=[text_message("wamid.i1")]),
        )
        code, answer = await rig.post(body, path="/whatsapp/globex", secret=OWN_SECRET)
        assert (code, answer["unknown_numbers"]) == (200, 0)
        assert sorted(rig.forward.parts) == ["globex", "initech"]


async def test_a_tenant_without_its_own_app_uses_the_gateway_secret(rig: Rig) -> None:
    body = update(change("111", messages=[text_message("wamid.a7")]))
    assert (await rig.post(body, path="/whatsapp/acme"))[0] == 200


@pytest.mark.parametrize("path", ["/whatsapp/nobody", "/whatsapp/plain"])
async def test_an_unknown_tenant_path_is_404(rig: Rig, path: str) -> None:
    assert (await rig.post(two_tenants(), path=path))[0] == 404


# -- answers ---------------------------------------------------------------------------------


async def test_one_tenant_not_committing_makes_the_answer_503(rig: Rig) -> None:
    rig.forward.failing.add("globex")
    code, answer = await rig.post(two_tenants())
    assert (code, answer["tenants"]) == (503, ["globex"])
    assert "acme" in rig.forward.parts  # committed: comes back as duplicates on re-delivery


async def test_an_unknown_number_is_counted_and_still_200(rig: Rig) -> None:
    body = update(change("999", messages=[text_message("wamid.x")]))
    assert await rig.post(body) == (200, {"messages": 0, "statuses": 0, "unknown_numbers": 1})
    assert rig.forward.parts == {}
    metrics = rig.stats.exposition().decode()
    assert "chatq_gateway_unknown_numbers_total 1.0" in metrics


async def test_metrics_count_answers_without_secrets(rig: Rig) -> None:
    await rig.post(two_tenants())
    await rig.post(two_tenants(), secret=None)
    async with rig.client.get("/metrics") as response:
        text = await response.text()
    assert 'chatq_gateway_requests_total{code="200"} 1.0' in text
    assert 'chatq_gateway_requests_total{code="401"} 1.0' in text
    assert "chatq_gateway_request_seconds_count 2.0" in text
    assert APP_SECRET not in text and OWN_SECRET not in text and VERIFY not in text
    beat = rig.stats.heartbeat(1, 0.0)
    assert (beat.rejected, beat.failed, beat.in_flight) == (1, 0, 0)


async def test_other_paths_are_404_and_other_methods_405(rig: Rig) -> None:
    for path in ("/", "/whatsapp/", "/whatsapp/acme/more", "/whatsappx"):
        async with rig.client.post(path, data=b"{}") as response:
            assert response.status == 404, path
    async with rig.client.put("/whatsapp", data=b"{}") as response:
        assert (response.status, response.headers["Allow"]) == (405, "GET, HEAD, POST")
    async with rig.client.post("/metrics", data=b"") as response:
        assert (response.status, response.headers["Allow"]) == (405, "GET, HEAD")
    assert rig.forward.parts == {}


async def test_json_that_orjson_refuses_is_still_read(rig: Rig) -> None:
    """Lone surrogates and integers past 64 bits are JSON too: the json module reads them."""
    message = text_message("wamid.odd") | {"extra": 1 << 70, "text": {"body": "\ud800 hi"}}
    raw = json.dumps(update(change("111", messages=[message]))).encode()
    assert (await rig.post(raw))[0] == 200
    forwarded = rig.forward.parts["acme"][0].messages[0]
    assert forwarded["payload"]["extra"] == 1 << 70 and forwarded["text"] == "\\ud800 hi"
