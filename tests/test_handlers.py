"""Handlers: echo, http (against a real local server), module:function, demo, load_handler."""

from __future__ import annotations

import asyncio
import importlib
import sys
import textwrap
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import pytest
from http_fakes import FakeService, free_port, serving

from chatq.config.settings import TenantConfig
from chatq.shared.errors import (
    ConfigError,
    HandlerError,
    HandlerTimeoutError,
    PermanentHandlerError,
)
from chatq.tenant_worker.handlers import (
    EchoHandler,
    Handler,
    HandlerContext,
    HttpHandler,
    ModuleHandler,
    demo,
    load_handler,
    normalise_replies,
)
from chatq.tenant_worker.messages import Message

CTX = HandlerContext(tenant_id="t", attempt=1)


def msg(text: str = "hello", **fields: Any) -> Message:
    return Message(id="m1", chat_id="c1", text=text, tenant_id="t", **fields)


# --- a fake handler service -------------------------------------------------


@pytest.fixture
async def service() -> AsyncIterator[FakeService]:
    async with serving("/h") as svc:
        yield svc


def http_tenant(url: str, timeout: float = 5.0) -> TenantConfig:
    return TenantConfig(id="t", handler="http", handler_url=url, handler_timeout=timeout)


@pytest.fixture
async def http_handler(service: FakeService) -> AsyncIterator[Handler]:
    handler = load_handler(http_tenant(service.url))
    yield handler
    await handler.aclose()


# --- load_handler -------------------------------------------------------------


def test_load_handler_chooses_by_config() -> None:
    assert isinstance(load_handler(TenantConfig(id="t")), EchoHandler)
    assert isinstance(load_handler(http_tenant("http://127.0.0.1:9/h")), HttpHandler)
    module = load_handler(TenantConfig(id="t", handler="chatq.tenant_worker.handlers.demo:shout"))
    assert isinstance(module, ModuleHandler)


def test_http_handler_builds_outside_any_event_loop() -> None:
    # Workers are forked: construction must not need (or bind to) a loop.
    handler = HttpHandler("http://127.0.0.1:9/h", timeout=1.0)
    asyncio.run(handler.aclose())


async def test_echo_replies_with_the_text() -> None:
    handler = load_handler(TenantConfig(id="t"))
    assert await handler.handle(msg("hi there"), CTX) == ["hi there"]
    await handler.aclose()


# --- http handler -------------------------------------------------------------


async def test_http_posts_the_message_as_json(service: FakeService, http_handler: Handler) -> None:
    service.answer(200, b'{"reply": "ok"}')
    message = msg("hey", sender="alice", ts=12.5)
    assert await http_handler.handle(message, HandlerContext("t", attempt=2)) == ["ok"]
    assert service.requests == [
        {
            "id": "m1",
            "chat_id": "c1",
            "text": "hey",
            "from": "alice",
            "ts": 12.5,
            "type": "text",
            "payload": None,
            "tenant_id": "t",
            "attempt": 2,
        }
    ]


@pytest.mark.parametrize(
    ("status", "body", "replies"),
    [
        (200, b'{"reply": "hi"}', ["hi"]),
        (201, b'{"replies": ["a", "b"]}', ["a", "b"]),
        (200, b'{"replies": []}', []),
        (204, b"", []),
        (200, b"", []),
        (200, b"{}", []),
        (200, b'{"reply": null}', []),
        (200, b'{"reply": "x", "meta": {"k": 1}}', ["x"]),
    ],
)
async def test_http_good_answers(
    service: FakeService, http_handler: Handler, status: int, body: bytes, replies: list[str]
) -> None:
    service.answer(status, body)
    assert await http_handler.handle(msg(), CTX) == replies


@pytest.mark.parametrize(
    ("body", "complaint"),
    [
        (b"not json", "answer is not JSON: not json"),
        (b'["hi"]', "answer must be a JSON object, got array"),
        (b'{"reply": 5}', "'reply' must be a string, got number"),
        (b'{"replies": "hi"}', "'replies' must be an array of strings, got string"),
        (b'{"replies": ["a", true]}', "'replies'[1] must be a string, got boolean"),
        (b'{"reply": "a", "replies": ["b"]}', "answer has both 'reply' and 'replies'"),
    ],
)
async def test_http_bad_2xx_shapes_are_permanent(
    service: FakeService, http_handler: Handler, body: bytes, complaint: str
) -> None:
    service.answer(200, body)
    with pytest.raises(PermanentHandlerError) as info:
        await http_handler.handle(msg(), CTX)
    assert str(info.value) == f"handler_url {service.url}: {complaint}"


@pytest.mark.parametrize("status", [500, 502, 503, 429])
async def test_http_5xx_and_429_are_retryable(
    service: FakeService, http_handler: Handler, status: int
) -> None:
    service.answer(status, b"busy\nnow")
    with pytest.raises(HandlerError) as info:
        await http_handler.handle(msg(), CTX)
    assert not isinstance(info.value, PermanentHandlerError)
    assert str(info.value) == f"handler_url {service.url} answered {status}: busy now"


@pytest.mark.parametrize("status", [400, 401, 404, 422, 302])
async def test_http_other_statuses_are_permanent(
    service: FakeService, http_handler: Handler, status: int
) -> None:
    service.answer(status)
    with pytest.raises(PermanentHandlerError, match=f"answered {status}$"):
        await http_handler.handle(msg(), CTX)


async def test_http_timeout_is_retryable(service: FakeService) -> None:
    service.delay = 0.15
    handler = load_handler(http_tenant(service.url, timeout=0.05))
    try:
        with pytest.raises(HandlerTimeoutError, match=r"no answer within 0\.05s"):
            await handler.handle(msg(), CTX)
    finally:
        await handler.aclose()


async def test_http_connection_refused_is_retryable() -> None:
    url = f"http://127.0.0.1:{free_port()}/h"
    handler = load_handler(http_tenant(url))
    try:
        with pytest.raises(HandlerError, match=f"^handler_url {url}: ") as info:
            await handler.handle(msg(), CTX)
        assert not isinstance(info.value, PermanentHandlerError)
    finally:
        await handler.aclose()


async def test_http_aclose_twice_and_reuse_after_close(
    service: FakeService, http_handler: Handler
) -> None:
    service.answer(200, b'{"reply": "again"}')
    await http_handler.handle(msg(), CTX)
    await http_handler.aclose()
    await http_handler.aclose()
    assert await http_handler.handle(msg(), CTX) == ["again"]


# --- module:function ----------------------------------------------------------


@pytest.fixture
def make_module(tmp_path: Any, monkeypatch: pytest.MonkeyPatch) -> Iterator[Callable[[str], str]]:
    """Write a uniquely named module into tmp_path; its import name. Unloaded afterwards."""
    monkeypatch.syspath_prepend(str(tmp_path))
    names: list[str] = []

    def make(source: str) -> str:
        name = f"chatq_test_mod_{uuid.uuid4().hex[:12]}"
        (tmp_path / f"{name}.py").write_text(textwrap.dedent(source))
        importlib.invalidate_caches()
        names.append(name)
        return name

    yield make
    for name in names:
        sys.modules.pop(name, None)


RESULTS_MODULE = """
    RESULTS = {
        "str": "one", "list": ["a", "b"], "empty": [], "none": None,
        "int": 5, "tuple": ("a",), "dict": {}, "mixed": ["a", 1], "bytes": b"x",
    }

    async def reply(message, ctx):
        return RESULTS[message.text]

    async def context(message, ctx):
        return f"{ctx.tenant_id}/{ctx.attempt}/{message.id}"

    async def boom(message, ctx):
        raise ValueError("bad\\nthing")

    async def one_arg(message):
        return "x"

    async def extra_kw(message, ctx, *, verbose=False):
        return "kw"
"""


def module_tenant(ref: str) -> TenantConfig:
    return TenantConfig(id="acme", handler=ref)


@pytest.mark.parametrize(
    ("text", "replies"),
    [("str", ["one"]), ("list", ["a", "b"]), ("empty", []), ("none", [])],
)
async def test_module_results_are_normalised(
    make_module: Callable[[str], str], text: str, replies: list[str]
) -> None:
    handler = load_handler(module_tenant(f"{make_module(RESULTS_MODULE)}:reply"))
    assert await handler.handle(msg(text), CTX) == replies


@pytest.mark.parametrize(
    ("text", "complaint"),
    [
        ("int", "handler returned int, expected str | list[str] | None"),
        ("tuple", "handler returned tuple, expected str | list[str] | None"),
        ("dict", "handler returned dict, expected str | list[str] | None"),
        ("bytes", "handler returned bytes, expected str | list[str] | None"),
        ("mixed", "handler returned a list with int at index 1, expected str | list[str] | None"),
    ],
)
async def test_module_bad_return_types_are_permanent(
    make_module: Callable[[str], str], text: str, complaint: str
) -> None:
    handler = load_handler(module_tenant(f"{make_module(RESULTS_MODULE)}:reply"))
    with pytest.raises(PermanentHandlerError) as info:
        await handler.handle(msg(text), CTX)
    assert str(info.value) == complaint


async def test_module_function_gets_message_and_context(make_module: Callable[[str], str]) -> None:
    handler = load_handler(module_tenant(f"{make_module(RESULTS_MODULE)}:context"))
    assert await handler.handle(msg(), HandlerContext("acme", attempt=3)) == ["acme/3/m1"]


async def test_module_keyword_only_extras_are_allowed(make_module: Callable[[str], str]) -> None:
    handler = load_handler(module_tenant(f"{make_module(RESULTS_MODULE)}:extra_kw"))
    assert await handler.handle(msg(), CTX) == ["kw"]


async def test_module_exception_becomes_retryable_handler_error(
    make_module: Callable[[str], str],
) -> None:
    ref = f"{make_module(RESULTS_MODULE)}:boom"
    handler = load_handler(module_tenant(ref))
    with pytest.raises(HandlerError) as info:
        await handler.handle(msg(), CTX)
    assert not isinstance(info.value, PermanentHandlerError)
    assert str(info.value) == f"handler {ref!r} raised ValueError: bad thing"
    assert isinstance(info.value.__cause__, ValueError)


async def test_module_chatq_errors_pass_through() -> None:
    handler = load_handler(module_tenant("chatq.tenant_worker.handlers.demo:flaky"))
    with pytest.raises(HandlerError, match=r"^flaky$"):
        await handler.handle(msg("fail now"), CTX)


def test_missing_module_is_a_one_line_config_error() -> None:
    with pytest.raises(ConfigError) as info:
        load_handler(module_tenant("nochatq_missing.h:reply"))
    assert str(info.value) == (
        "tenant acme: handler 'nochatq_missing.h:reply': no module named 'nochatq_missing'"
    )


def test_missing_attribute_is_a_config_error() -> None:
    with pytest.raises(ConfigError) as info:
        load_handler(module_tenant("chatq.tenant_worker.handlers.demo:nope"))
    assert str(info.value) == (
        "tenant acme: handler 'chatq.tenant_worker.handlers.demo:nope':"
        " module 'chatq.tenant_worker.handlers.demo' has no attribute 'nope'"
    )


@pytest.mark.parametrize("ref", ["os.path:join", "os:sep"])
def test_non_async_attribute_is_refused(ref: str) -> None:
    name = ref.partition(":")[2]
    with pytest.raises(ConfigError, match=f"'{name}' is not an async def function$"):
        load_handler(module_tenant(ref))


def test_wrong_parameters_are_refused(make_module: Callable[[str], str]) -> None:
    with pytest.raises(ConfigError, match=r"'one_arg' must take \(message, ctx\)$"):
        load_handler(module_tenant(f"{make_module(RESULTS_MODULE)}:one_arg"))


def test_import_time_failure_is_a_one_line_config_error(
    make_module: Callable[[str], str],
) -> None:
    name = make_module('raise RuntimeError("no\\ndatabase")\n')
    with pytest.raises(ConfigError) as info:
        load_handler(module_tenant(f"{name}:reply"))
    assert str(info.value) == (
        f"tenant acme: handler '{name}:reply': importing '{name}' failed: RuntimeError: no database"
    )
    assert isinstance(info.value.__cause__, RuntimeError)


def test_missing_dependency_of_the_module_is_named(make_module: Callable[[str], str]) -> None:
    name = make_module("import nochatq_dependency\n")
    with pytest.raises(ConfigError, match=r"no module named 'nochatq_dependency'$"):
        load_handler(module_tenant(f"{name}:reply"))


def test_malformed_reference_is_refused() -> None:
    with pytest.raises(ConfigError, match=r"expected 'module\.path:function'$"):
        ModuleHandler.load("no_colon_here", tenant_id="acme")


# --- normalise_replies --------------------------------------------------------


def test_normalise_replies() -> None:
    assert normalise_replies(None) == []
    assert normalise_replies("x") == ["x"]
    assert normalise_replies(["x", ""]) == ["x", ""]
    with pytest.raises(PermanentHandlerError, match=r"^handler returned float"):
        normalise_replies(1.5)
    with pytest.raises(PermanentHandlerError, match="list with NoneType at index 0"):
        normalise_replies([None])


# --- demo handlers (not the ones that kill or hang the process) ---------------


async def test_demo_shout() -> None:
    handler = load_handler(module_tenant("chatq.tenant_worker.handlers.demo:shout"))
    assert await handler.handle(msg("hello"), CTX) == ["HELLO"]


@pytest.mark.parametrize("text", ["0.01", "0", "abc", "nan", "-1", "inf"])
async def test_demo_sleepy_echoes(text: str) -> None:
    assert await asyncio.wait_for(demo.sleepy(msg(text), CTX), timeout=1) == text


async def test_demo_flaky() -> None:
    assert await demo.flaky(msg("fine"), CTX) == "fine"
    with pytest.raises(HandlerError, match="flaky"):
        await demo.flaky(msg("failing"), CTX)


async def test_demo_slow_waits_without_blocking_the_loop() -> None:
    assert await demo.slow(msg("quick"), CTX) == "quick"
    with pytest.raises(TimeoutError):
        await asyncio.wait_for(demo.slow(msg("slow"), CTX), timeout=0.01)


async def test_demo_crash_and_hang_echo_other_texts() -> None:
    assert await demo.crash(msg("fine"), CTX) == "fine"
    assert await demo.hang(msg("fine"), CTX) == "fine"


@pytest.mark.parametrize("name", ["shout", "sleepy", "crash", "hang", "flaky", "slow"])
def test_demo_functions_load_as_handlers(name: str) -> None:
    assert isinstance(
        load_handler(module_tenant(f"chatq.tenant_worker.handlers.demo:{name}")), ModuleHandler
    )
