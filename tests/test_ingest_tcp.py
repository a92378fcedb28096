"""Ingest over its TCP port: no web pages, JSON only, an optional bearer token;
the unix socket (the safe default) asks none of it. And the token's config."""

from __future__ import annotations

import textwrap
from collections.abc import AsyncIterator, Sequence
from pathlib import Path

import aiohttp
import pytest
from http_fakes import free_port
from sandbox import short_run_dir

from chatq.config import load_config
from chatq.shared.errors import ConfigError
from chatq.shared.http_server import Answer, Request
from chatq.tenant_worker.ingest import Ingest, IngestState
from chatq.tenant_worker.ingest_tcp import tcp_refusal
from chatq.tenant_worker.messages import Message
from chatq.tenant_worker.pipeline import Accepted

TOKEN = "t0k3n-very-secret"
BODY = '{"id": "m1", "chat_id": "c1", "text": "hi"}'
JSON = {"Content-Type": "application/json"}
BEARER = {"Authorization": f"Bearer {TOKEN}"}


class Recorder:
    def __init__(self) -> None:
        self.calls = 0

    async def __call__(self, messages: Sequence[Message]) -> Accepted:
        self.calls += 1
        return Accepted(len(messages), 0, 0)


@pytest.fixture
async def served() -> AsyncIterator[tuple[Recorder, Path, int]]:
    folder, port = short_run_dir(), free_port()
    accept = Recorder()
    ingest = Ingest("t1", accept, dict, token=TOKEN)
    await ingest.start(folder / "t1.sock", port)
    ingest.state = IngestState.RUNNING
    try:
        yield accept, folder / "t1.sock", port
    finally:
        await ingest.stop()
        (folder / "t1.sock").unlink(missing_ok=True)
        folder.rmdir()


async def post(url: str, headers: dict[str, str], unix: Path | None = None) -> int:
    connector = aiohttp.UnixConnector(path=str(unix)) if unix else None
    async with (
        aiohttp.ClientSession(connector=connector) as session,
        session.post(url, data=BODY, headers=headers) as response,
    ):
        return response.status


async def test_a_web_page_a_stranger_or_a_form_cannot_post_over_tcp(
    served: tuple[Recorder, Path, int],
) -> None:
    accept, _, port = served
    url = f"http://127.0.0.1:{port}/messages"
    page = {"Content-Type": "text/plain", "Origin": "https://evil.example", **BEARER}
    assert await post(url, page) == 403
    assert await post(url, {**JSON, "Origin": "null", **BEARER}) == 403
    assert await post(url, JSON) == 401  # no token
    assert await post(url, {**JSON, "Authorization": "Bearer wrong"}) == 401
    assert await post(url, {"Content-Type": "text/plain", **BEARER}) == 415
    assert accept.calls == 0  # nothing refused reached the store
    assert await post(url, {**JSON, **BEARER}) == 202
    assert accept.calls == 1


async def test_the_unix_socket_asks_for_none_of_it(served: tuple[Recorder, Path, int]) -> None:
    accept, socket, _ = served
    assert await post("http://worker/messages", {"Content-Type": "text/plain"}, socket) == 202
    assert accept.calls == 1


async def test_a_route_for_the_unix_socket_only_is_403_over_tcp() -> None:
    folder, port = short_run_dir(), free_port()
    ingest = Ingest("t1", Recorder(), dict, token=TOKEN)
    seen: list[bytes | None] = []

    async def internal(request: Request) -> Answer:
        seen.append(request.body)
        return Answer.json(200, {"ok": True})

    ingest.add_route("POST", "/internal", internal, 100, unix_only=True)
    await ingest.start(folder / "t1.sock", port)
    try:
        tcp = f"http://127.0.0.1:{port}/internal"
        assert await post(tcp, {**JSON, **BEARER}) == 403
        assert await post("http://worker/internal", JSON, folder / "t1.sock") == 200
        assert seen == [BODY.encode()]  # only the unix socket's request ran
    finally:
        await ingest.stop()
        (folder / "t1.sock").unlink(missing_ok=True)
        folder.rmdir()


def test_refusal_rules_without_a_token() -> None:
    assert tcp_refusal("GET", {}, None) is None
    assert tcp_refusal("POST", {"Content-Type": "application/json; charset=utf-8"}, None) is None
    assert tcp_refusal("POST", {}, None) == (415, "Content-Type must be application/json")


def test_the_token_takes_the_secret_syntax_and_never_shows(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    text = """
        [defaults]
        ingest_token = "env:INGEST_TOKEN"
        [[tenants]]
        id = "acme"
        port = 8181
        [[tenants]]
        id = "globex"
        ingest_token = "file:token.txt"
    """
    Path("tenants.toml").write_text(textwrap.dedent(text), encoding="utf-8")
    Path("token.txt").write_text("from-a-file\n", encoding="utf-8")
    config = load_config("tenants.toml", env={"INGEST_TOKEN": TOKEN})
    acme, globex = config.tenant("acme"), config.tenant("globex")
    assert acme.ingest_token is not None and acme.ingest_token.get_secret_value() == TOKEN
    assert globex.ingest_token is not None
    assert globex.ingest_token.get_secret_value() == "from-a-file"
    assert TOKEN not in repr(config)

    with pytest.raises(ConfigError, match="INGEST_TOKEN is not set") as error:
        load_config("tenants.toml", env={})
    assert "\n" not in str(error.value)
