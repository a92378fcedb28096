"""chatq.shared.log: line formats, context ids, stdlib routing, idempotent setup."""

from __future__ import annotations

import asyncio
import io
import json
import logging
import os
import subprocess
import sys
from collections.abc import Iterator

import pytest
from loguru import logger

from chatq.shared import log
from chatq.shared.errors import ConfigError
from chatq.shared.log import bind_message, debug_enabled, preset_logging, setup_logging


@pytest.fixture(autouse=True)
def restore_logging() -> Iterator[None]:
    """Give other test modules back loguru's import-time state and the stdlib root."""
    root = logging.getLogger()
    saved_level, saved_handlers = root.level, root.handlers[:]
    yield
    log._current.preset = log._current.relay_to = None
    logger.remove()
    logger.configure(extra={})
    logger.add(sys.stderr)
    root.handlers[:] = saved_handlers
    root.setLevel(saved_level)


@pytest.fixture
def lines() -> list[str]:
    return []


def test_text_line_has_tenant_pid_level_and_message(lines: list[str]) -> None:
    setup_logging("INFO", tenant_id="acme", sink=lines.append)
    logger.info("worker started")
    assert len(lines) == 1
    line = lines[0]
    assert f"INFO  [acme pid={os.getpid()}] worker started" in line
    assert "chat=" not in line
    assert "msg=" not in line


def test_text_without_tenant_shows_dash(lines: list[str]) -> None:
    setup_logging(sink=lines.append)
    logger.warning("supervisor up")
    assert f"WARNING [- pid={os.getpid()}] supervisor up" in lines[0]


def test_bind_message_tags_records_inside_only(lines: list[str]) -> None:
    setup_logging(tenant_id="acme", sink=lines.append)
    with bind_message("c1", "m9"):
        logger.info("enqueued (queue_size=3)")
    logger.info("after")
    assert "[acme pid=" in lines[0]
    assert lines[0].endswith(" chat=c1 msg=m9 enqueued (queue_size=3)")
    assert "chat=" not in lines[1]


async def test_bind_message_survives_awaits_and_stays_in_its_task(lines: list[str]) -> None:
    setup_logging(fmt="json", tenant_id="acme", sink=lines.append)

    async def handle(chat: str, msg: str) -> None:
        with bind_message(chat, msg):
            await asyncio.sleep(0)
            logger.info("handled {}", msg)

    await asyncio.gather(handle("c1", "m1"), handle("c2", "m2"))
    seen = {(r["chat_id"], r["message_id"], r["message"]) for r in map(json.loads, lines)}
    assert seen == {("c1", "m1", "handled m1"), ("c2", "m2", "handled m2")}


def test_json_line_has_the_keys(lines: list[str]) -> None:
    setup_logging("DEBUG", "json", tenant_id="acme", sink=lines.append)
    logger.debug("plain")
    with bind_message("c1", "m9"):
        logger.bind(queue_size=3).info("enqueued")
    plain, tagged = (json.loads(line) for line in lines)
    assert plain["level"] == "DEBUG"
    assert plain["message"] == "plain"
    assert plain["tenant_id"] == "acme"
    assert plain["pid"] == os.getpid()
    assert plain["ts"][:4].isdigit() and "T" in plain["ts"]
    assert "chat_id" not in plain and "exception" not in plain
    assert (tagged["chat_id"], tagged["message_id"], tagged["queue_size"]) == ("c1", "m9", 3)


def test_bound_extra_cannot_overwrite_fixed_json_keys(lines: list[str]) -> None:
    setup_logging(fmt="json", sink=lines.append)
    logger.bind(level="fake", pid="fake").error("real")
    record = json.loads(lines[0])
    assert (record["level"], record["pid"]) == ("ERROR", os.getpid())


@pytest.mark.parametrize("fmt", ["text", "json"])
def test_braces_and_newlines_keep_one_line(fmt: str, lines: list[str]) -> None:
    setup_logging(fmt=fmt, sink=lines.append)  # type: ignore[arg-type]
    nasty = 'user said {x} and {0} {extra[tenant_id]}\nFAKE 2026-01-01 ERROR\r"quoted"'
    logger.info(nasty)
    logger.info("arg {}", nasty)
    assert len(lines) == 2
    for line in lines:
        assert "\n" not in line and "\r" not in line
    if fmt == "json":
        assert json.loads(lines[0])["message"] == nasty
        assert json.loads(lines[1])["message"] == f"arg {nasty}"
    else:
        assert lines[0].endswith(
            ' user said {x} and {0} {extra[tenant_id]}\\nFAKE 2026-01-01 ERROR\\r"quoted"'
        )


def test_text_stream_sink_gets_newline_terminated_lines() -> None:
    stream = io.StringIO()
    setup_logging(tenant_id="acme", sink=stream)
    logger.info("one")
    logger.info("two")
    out = stream.getvalue().splitlines(keepends=True)
    assert len(out) == 2
    assert out[0].endswith(" one\n") and out[1].endswith(" two\n")


def test_stdlib_records_are_routed_with_level_and_caller(lines: list[str]) -> None:
    setup_logging(fmt="json", tenant_id="acme", sink=lines.append)
    logging.getLogger("aiohttp.access").warning("GET /health %s", 200)
    logging.getLogger("asyncio").debug("below the level")
    assert len(lines) == 1
    record = json.loads(lines[0])
    assert record["level"] == "WARNING"
    assert record["message"] == "GET /health 200"
    assert record["tenant_id"] == "acme"
    # The frame depth points at the code that called logging, not at logging itself.
    assert record["logger"] == __name__


def test_stdlib_debug_passes_when_level_is_debug(lines: list[str]) -> None:
    setup_logging("DEBUG", sink=lines.append)
    logging.getLogger("aiohttp.client").debug("executing")
    assert len(lines) == 1
    assert " DEBUG [- pid=" in lines[0] and lines[0].endswith(" executing")


def test_setup_twice_does_not_duplicate(lines: list[str]) -> None:
    setup_logging(sink=lines.append)
    setup_logging(sink=lines.append)
    logger.info("loguru once")
    logging.getLogger("aiohttp.server").error("stdlib once")
    assert len(lines) == 2


def test_second_setup_replaces_the_first() -> None:
    first: list[str] = []
    second: list[str] = []
    setup_logging(tenant_id="acme", sink=first.append)
    setup_logging("ERROR", tenant_id="beta", sink=second.append)
    logger.warning("dropped")
    logger.error("kept")
    assert first == []
    assert len(second) == 1 and "[beta pid=" in second[0]


@pytest.mark.parametrize(
    ("level", "expected"),
    [("TRACE", True), ("DEBUG", True), ("debug", True), ("INFO", False), ("ERROR", False)],
)
def test_debug_enabled_reflects_the_level(level: str, expected: bool, lines: list[str]) -> None:
    setup_logging(level, sink=lines.append)
    assert debug_enabled() is expected
    logger.debug("probe")
    assert bool(lines) is expected


def test_bad_level_or_format_changes_nothing(lines: list[str]) -> None:
    setup_logging(tenant_id="acme", sink=lines.append)
    with pytest.raises(ConfigError, match="LOG_LEVEL"):
        setup_logging("LOUD", sink=lines.append)
    with pytest.raises(ConfigError, match="LOG_FORMAT"):
        setup_logging(fmt="xml", sink=lines.append)  # type: ignore[arg-type]
    logger.info("still set up")
    assert len(lines) == 1 and "[acme pid=" in lines[0]


def _fail() -> None:
    raise ValueError("boom {not a field}")


def test_exception_json_has_traceback_field(lines: list[str]) -> None:
    setup_logging(fmt="json", sink=lines.append)
    try:
        _fail()
    except ValueError:
        logger.exception("handler failed")
    assert len(lines) == 1
    record = json.loads(lines[0])
    assert record["level"] == "ERROR"
    assert record["message"] == "handler failed"
    assert record["exception"].startswith("Traceback (most recent call last):")
    assert "in _fail" in record["exception"]
    assert record["exception"].endswith("ValueError: boom {not a field}")


def test_exception_text_follows_the_line(lines: list[str]) -> None:
    setup_logging(tenant_id="acme", sink=lines.append)
    try:
        _fail()
    except ValueError:
        logger.exception("handler failed")
    first, *rest = lines[0].split("\n")
    assert first.endswith(" handler failed")
    assert rest[0] == "Traceback (most recent call last):"
    assert rest[-1] == "ValueError: boom {not a field}"


def test_stdlib_exception_is_carried_over(lines: list[str]) -> None:
    setup_logging(fmt="json", sink=lines.append)
    try:
        _fail()
    except ValueError:
        logging.getLogger("aiohttp.web").exception("Error handling request")
    record = json.loads(lines[0])
    assert record["level"] == "ERROR"
    assert "ValueError: boom" in record["exception"]


def test_a_json_line_renders_as_the_text_format_would_write_it() -> None:
    """`chatq logs` and `chatq status` show JSON lines as text: the two formats agree."""
    from chatq.supervisor.render import log_line

    text_lines: list[str] = []
    json_lines: list[str] = []
    for fmt, sink in (("text", text_lines), ("json", json_lines)):
        setup_logging("INFO", fmt, tenant_id="acme", sink=sink.append)  # type: ignore[arg-type]
        with bind_message("c1", "m\x1b9"):
            logger.info("hello {}", "\x1b[31mred")
        try:
            raise ValueError("boom")
        except ValueError:
            logger.exception("failed")
    for text, as_json in zip(text_lines, json_lines, strict=True):
        assert log_line(as_json)[:19] == text[:19]  # the same second (the ms may differ)
        assert log_line(as_json)[23:] == text[23:]
    assert log_line("plain text {not json") == "plain text {not json"
    assert log_line('{"some": "json"}') == '{"some": "json"}'


def test_a_child_of_a_preset_fork_server_only_points_the_sink_at_its_pipe(
    lines: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """What each worker skips: loguru's handler and the stdlib intercept (boot CPU, memory)."""
    preset_logging("WARNING", "text")
    added: list[object] = []
    monkeypatch.setattr(logger, "add", lambda *a, **k: added.append(a))
    setup_logging("warning", "text", tenant_id="acme", sink=lines.append)
    logger.info("below the level")
    logger.warning("kept")
    logging.getLogger("aiohttp.server").error("stdlib too")
    assert added == []
    assert len(lines) == 2 and "[acme pid=" in lines[0] and lines[0].endswith(" kept")


def test_other_settings_than_the_preset_set_up_afresh(lines: list[str]) -> None:
    preset_logging("WARNING", "text")
    setup_logging("DEBUG", "json", tenant_id="acme", sink=lines.append)
    logger.debug("now shown")
    assert json.loads(lines[0])["tenant_id"] == "acme"
    setup_logging("WARNING", "text", tenant_id="beta", sink=lines.append)  # the preset is gone
    logger.warning("afresh")
    assert "[beta pid=" in lines[1]


def run(code: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, "-c", code]
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=30, check=False)


def test_the_fork_server_presets_the_logging_it_is_told() -> None:
    code = (
        "import os; import chatq.supervisor.forkserver_logging; from chatq.shared import log;"
        " print(log._current.preset, 'CHATQ_FORKSERVER_LOG' in os.environ)"
    )
    env = {**os.environ, "CHATQ_FORKSERVER_LOG": "ERROR json"}
    out = run(code, env)
    assert out.stdout.split() == ["(40,", "'json')", "False"], out.stderr
    env["CHATQ_FORKSERVER_LOG"] = "LOUD text"  # a bad level: each child reports it itself
    out = run(code, env)
    assert out.stdout.split() == ["None", "False"], out.stderr
