"""The `whatsapp` transport against the fake Graph API: request, errors by code, secrets."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
from fake_graph import HANG, HTTP_500, Answer, FakeGraph, documented_text_message, error, fake_graph
from http_fakes import free_port

from chatq.config.settings import TenantConfig, WhatsAppSettings
from chatq.shared.errors import (
    PairRateLimitError,
    PermanentTransportError,
    RetryableTransportError,
    SendingPausedError,
    TransientTransportError,
    TransportError,
)
from chatq.tenant_worker.transports import WhatsAppTransport, make_transport

TOKEN = "EAAG-very-secret-token-123"
PHONE = "106540352242922"


def settings(url: str, timeout: float = 5.0) -> WhatsAppSettings:
    return WhatsAppSettings.model_validate(
        {
            "phone_number_id": PHONE,
            "access_token": TOKEN,
            "graph_url": url,
            "request_timeout": timeout,
        }
    )


@pytest.fixture
async def graph() -> AsyncIterator[FakeGraph]:
    async with fake_graph() as fake:
        yield fake


@pytest.fixture
async def transport(graph: FakeGraph) -> AsyncIterator[WhatsAppTransport]:
    sender = WhatsAppTransport(settings(graph.url))
    yield sender
    await sender.aclose()


async def refused(transport: WhatsAppTransport) -> TransportError:
    with pytest.raises(TransportError) as caught:
        await transport.send("15550001", "hi")
    assert TOKEN not in str(caught.value) and TOKEN not in repr(caught.value)
    assert "\n" not in str(caught.value)
    return caught.value


async def test_the_request_is_the_one_meta_documents(
    graph: FakeGraph, transport: WhatsAppTransport
) -> None:
    assert await transport.send("15550001", "hello") == "wamid.fake1"
    (request,) = graph.requests
    assert request.path == f"/v23.0/{PHONE}/messages"
    assert request.headers["Authorization"] == f"Bearer {TOKEN}"
    assert request.headers["Content-Type"].startswith("application/json")
    assert request.body == documented_text_message("15550001", "hello")


async def test_each_send_gets_its_own_wamid(transport: WhatsAppTransport) -> None:
    ids = [await transport.send("15550001", f"m{n}") for n in range(3)]
    assert ids == ["wamid.fake1", "wamid.fake2", "wamid.fake3"]


@pytest.mark.parametrize(
    ("code", "kind"),
    [
        (130429, TransientTransportError),  # Meta's retry codes: no attempt limit
        (131000, TransientTransportError),
        (131056, PairRateLimitError),
        (131047, PermanentTransportError),
        (100, PermanentTransportError),
        (190, SendingPausedError),
        (131031, SendingPausedError),
        (777_777, RetryableTransportError),  # unknown: retried up to the attempt limit
        (200, SendingPausedError),
        (299, SendingPausedError),
    ],
)
async def test_errors_are_sorted_by_code(
    graph: FakeGraph, transport: WhatsAppTransport, code: int, kind: type[TransportError]
) -> None:
    graph.always = error(code)
    exc = await refused(transport)
    assert type(exc) is kind
    assert str(exc).startswith(f"{code}: ")


async def test_the_code_decides_not_the_status(
    graph: FakeGraph, transport: WhatsAppTransport
) -> None:
    graph.always = error(131047, status=500)  # a code in a 5xx answer: still final
    assert type(await refused(transport)) is PermanentTransportError
    graph.always = error(130429, status=400)
    assert type(await refused(transport)) is TransientTransportError


async def test_failed_reply_text_has_code_and_meta_message(
    graph: FakeGraph, transport: WhatsAppTransport
) -> None:
    graph.always = error(131047, message="(#131047) Re-engagement message")
    exc = await refused(transport)
    assert str(exc) == "131047: Re-engagement message (fake details)"


async def test_a_5xx_page_without_a_code_is_retried(
    graph: FakeGraph, transport: WhatsAppTransport
) -> None:
    graph.always = HTTP_500
    exc = await refused(transport)
    assert type(exc) is TransientTransportError
    assert "answered 500" in str(exc) and "Internal Server Error" in str(exc)


async def test_a_hang_times_out_and_is_retried(graph: FakeGraph) -> None:
    graph.always = HANG
    transport = WhatsAppTransport(settings(graph.url, timeout=0.2))
    try:
        exc = await refused(transport)
    finally:
        await transport.aclose()
    assert type(exc) is TransientTransportError
    assert "no answer within 0.2s" in str(exc)


async def test_a_refused_connection_is_retried() -> None:
    transport = WhatsAppTransport(settings(f"http://127.0.0.1:{free_port()}"))
    try:
        assert type(await refused(transport)) is TransientTransportError
    finally:
        await transport.aclose()


async def test_an_answer_echoing_the_token_is_scrubbed(
    graph: FakeGraph, transport: WhatsAppTransport
) -> None:
    graph.always = error(190, message=f"Malformed access token {TOKEN}")
    exc = await refused(transport)
    assert str(exc) == "190: Malformed access token [redacted] (fake details)"
    assert TOKEN not in repr(transport)


def test_make_transport_builds_it_for_a_whatsapp_tenant() -> None:
    tenant = TenantConfig.model_validate(
        {"id": "acme", "transport": "whatsapp", "whatsapp": settings("http://127.0.0.1:9")}
    )
    transport = make_transport(tenant)
    assert isinstance(transport, WhatsAppTransport)
    assert transport.split(" ".join(["a"] * 3000)) == ["a " * 2047 + "a", "a " * 951 + "a"]


async def test_a_2xx_without_a_message_id_counts_as_sent(
    graph: FakeGraph, transport: WhatsAppTransport
) -> None:
    graph.always = Answer(status=200, raw=b"{}")
    provider_id = await transport.send("15550001", "hi")
    assert provider_id.startswith("whatsapp-")  # sending again would send twice
