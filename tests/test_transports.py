"""Transports: local (logs), webhook (against a real local server), memory fake, make_transport."""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncIterator, Iterator

import pytest
from http_fakes import FakeService, free_port, serving
from loguru import logger

from chatq.config.settings import TenantConfig
from chatq.shared.errors import PermanentTransportError, RetryableTransportError, TransportError
from chatq.tenant_worker.transports import (
    LocalTransport,
    MemoryTransport,
    Transport,
    WebhookTransport,
    make_transport,
)
from chatq.tenant_worker.transports.local import INFO_PER_WINDOW, WINDOW_S


@pytest.fixture
async def provider() -> AsyncIterator[FakeService]:
    async with serving("/send") as fake:
        yield fake


@pytest.fixture
async def webhook(provider: FakeService) -> AsyncIterator[Transport]:
    transport = make_transport(webhook_tenant(provider.url))
    yield transport
    await transport.aclose()


def webhook_tenant(url: str) -> TenantConfig:
    return TenantConfig(id="t", transport="webhook", webhook_url=url)


# --- make_transport -------------------------------------------------------------


def test_make_transport_chooses_by_config() -> None:
    assert isinstance(make_transport(TenantConfig(id="t")), LocalTransport)
    assert isinstance(make_transport(webhook_tenant("http://127.0.0.1:9/x")), WebhookTransport)


def test_webhook_builds_outside_any_event_loop() -> None:
    # Workers are forked: construction must not need (or bind to) a loop.
    transport = make_transport(webhook_tenant("http://127.0.0.1:9/x"))
    asyncio.run(transport.aclose())


# --- local ------------------------------------------------------------------------


@pytest.fixture
def log_lines() -> Iterator[list[str]]:
    lines: list[str] = []
    sink_id = logger.add(lines.append, format="{level} {message}", level="DEBUG")
    yield lines
    logger.remove(sink_id)


async def test_local_logs_the_reply_and_returns_a_fresh_id(log_lines: list[str]) -> None:
    transport = LocalTransport()
    first = await transport.send("c1", "hello {there}")
    second = await transport.send("c1", "again")
    await transport.aclose()
    after_restart = await LocalTransport().send("c1", "later")
    assert re.fullmatch(r"local-[0-9a-f]{16}-\d+", first)
    assert len({first, second, after_restart}) == 3
    assert [line.rstrip("\n") for line in log_lines] == [
        "INFO reply to c1: hello {there}",
        "INFO reply to c1: again",
        "INFO reply to c1: later",
    ]


async def test_local_logs_replies_past_a_few_a_second_at_debug_and_counts_them(
    log_lines: list[str],
) -> None:
    now = [100.0]
    transport = LocalTransport(monotonic=lambda: now[0])
    for n in range(INFO_PER_WINDOW + 5):
        await transport.send("c1", f"r{n}")
    now[0] += WINDOW_S  # the next window: its first reply is shown again
    await transport.send("c2", "next")
    await transport.send("c2", "last")  # past the cap? no: the window has room
    await transport.aclose()
    info = [line.rstrip("\n") for line in log_lines if line.startswith("INFO")]
    assert info == [
        *(f"INFO reply to c1: r{n}" for n in range(INFO_PER_WINDOW)),
        f"INFO 5 more replies sent in {WINDOW_S:g} s (one line each at DEBUG)",
        "INFO reply to c2: next",
        "INFO reply to c2: last",
    ]


async def test_local_reports_the_count_when_the_window_ends_without_more_replies(
    log_lines: list[str],
) -> None:
    transport = LocalTransport(window=0.05)
    for n in range(INFO_PER_WINDOW + 2):
        await transport.send("c1", f"r{n}")
    await asyncio.sleep(0.1)  # the report's own timer, nothing else to wait on
    report = "INFO 2 more replies sent in 0.05 s (one line each at DEBUG)"
    assert log_lines[-1].rstrip("\n") == report
    await transport.aclose()


# --- webhook ----------------------------------------------------------------------


async def test_webhook_posts_tenant_chat_and_text(
    provider: FakeService, webhook: Transport
) -> None:
    provider.answer(200, b'{"id": "wamid.1"}')
    assert await webhook.send("c1", "hi") == "wamid.1"
    assert provider.requests == [{"tenant_id": "t", "chat_id": "c1", "text": "hi"}]


@pytest.mark.parametrize(
    ("status", "body", "expected"),
    [
        (200, b'{"id": "p-7"}', "p-7"),
        (201, b'{"id": 42}', "42"),
        (202, b'{"ok": true}', None),
        (204, b"", None),
        (200, b"sent", None),
        (200, b'["p-7"]', None),
        (200, b'{"id": ""}', None),
        (200, b'{"id": true}', None),
    ],
)
async def test_webhook_2xx_gives_the_provider_id_or_a_fresh_one(
    provider: FakeService, webhook: Transport, status: int, body: bytes, expected: str | None
) -> None:
    provider.answer(status, body)
    message_id = await webhook.send("c1", "hi")
    if expected is None:
        assert re.fullmatch(r"webhook-[0-9a-f]{32}", message_id)
    else:
        assert message_id == expected


@pytest.mark.parametrize("status", [500, 502, 503, 429])
async def test_webhook_5xx_and_429_are_retryable(
    provider: FakeService, webhook: Transport, status: int
) -> None:
    provider.answer(status, b'{"error": "try later"}')
    with pytest.raises(RetryableTransportError) as info:
        await webhook.send("c1", "hi")
    assert str(info.value) == (
        f'webhook_url {provider.url} answered {status}: {{"error": "try later"}}'
    )


@pytest.mark.parametrize("status", [400, 403, 404, 410, 301])
async def test_webhook_other_statuses_are_permanent(
    provider: FakeService, webhook: Transport, status: int
) -> None:
    provider.answer(status)
    with pytest.raises(PermanentTransportError) as info:
        await webhook.send("c1", "hi")
    assert str(info.value) == f"webhook_url {provider.url} answered {status}"


async def test_webhook_error_body_is_cut_short(provider: FakeService, webhook: Transport) -> None:
    provider.answer(400, b"x" * 1000)
    with pytest.raises(PermanentTransportError) as info:
        await webhook.send("c1", "hi")
    assert str(info.value).endswith(": " + "x" * 200 + "…")


async def test_webhook_timeout_is_retryable(provider: FakeService) -> None:
    provider.delay = 0.15
    transport = WebhookTransport(provider.url, tenant_id="t", timeout=0.05)
    try:
        with pytest.raises(RetryableTransportError, match=r"no answer within 0\.05s$"):
            await transport.send("c1", "hi")
    finally:
        await transport.aclose()


async def test_webhook_connection_refused_is_retryable() -> None:
    url = f"http://127.0.0.1:{free_port()}/send"
    transport = WebhookTransport(url, tenant_id="t")
    try:
        with pytest.raises(RetryableTransportError, match=f"^webhook_url {url}: "):
            await transport.send("c1", "hi")
    finally:
        await transport.aclose()


async def test_webhook_aclose_twice_and_reuse_after_close(
    provider: FakeService, webhook: Transport
) -> None:
    provider.answer(200, b'{"id": "a"}')
    await webhook.send("c1", "hi")
    await webhook.aclose()
    await webhook.aclose()
    assert await webhook.send("c1", "again") == "a"


# --- memory fake ------------------------------------------------------------------


async def test_memory_records_sends_in_order() -> None:
    transport = MemoryTransport()
    assert await transport.send("c1", "a") == "mem-1"
    assert await transport.send("c2", "b") == "mem-2"
    assert transport.sent == [("c1", "a"), ("c2", "b")]
    assert transport.attempts == 2
    assert not transport.closed
    await transport.aclose()
    assert transport.closed


async def test_memory_injected_failures_are_raised_and_not_recorded() -> None:
    failures: list[TransportError] = [
        RetryableTransportError("down"),
        PermanentTransportError("no such chat"),
    ]

    def fail_first_two(chat_id: str, text: str) -> Exception | None:
        return failures.pop(0) if failures else None

    transport = MemoryTransport(fail_with=fail_first_two)
    with pytest.raises(RetryableTransportError, match="down"):
        await transport.send("c1", "a")
    with pytest.raises(PermanentTransportError, match="no such chat"):
        await transport.send("c1", "a")
    assert await transport.send("c1", "a") == "mem-1"
    assert transport.sent == [("c1", "a")]
    assert transport.attempts == 3


async def test_memory_failure_can_depend_on_the_recipient() -> None:
    transport = MemoryTransport(
        fail_with=lambda chat, _text: PermanentTransportError(chat) if chat == "bad" else None
    )
    await transport.send("good", "x")
    with pytest.raises(PermanentTransportError):
        await transport.send("bad", "x")
    assert transport.sent == [("good", "x")]
