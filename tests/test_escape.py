"""Control characters from chat content are shown, never obeyed, in human output."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from loguru import logger

from chatq.shared.escape import printable, printable_lines
from chatq.shared.log import setup_logging
from chatq.tenant_worker.history import format_transcript

HOSTILE = "hi\x1b[2J\x1b]0;owned\x07\x00\r\n\t\x7f\x9b end"
SHOWN = "hi\\x1b[2J\\x1b]0;owned\\x07\\x00\\r\\n\\t\\x7f\\x9b end"


def test_printable_escapes_c0_del_and_c1() -> None:
    assert printable(HOSTILE) == SHOWN
    assert printable("plain text, ünïcode ✓") == "plain text, ünïcode ✓"
    assert printable_lines("line 1\nline\x1b 2") == "line 1\nline\\x1b 2"


@pytest.fixture
def lines() -> Iterator[list[str]]:
    got: list[str] = []
    yield got
    logger.remove()


def test_text_log_lines_escape_chat_content(lines: list[str]) -> None:
    setup_logging("INFO", tenant_id="acme", sink=lines.append)
    logger.info("reply to {}: {}", "c\x1b1", HOSTILE)
    (line,) = lines
    assert line.endswith(f"reply to c\\x1b1: {SHOWN}")
    assert not any(ord(c) < 32 or 0x7F <= ord(c) <= 0x9F for c in line)


def test_json_log_lines_stay_exact(lines: list[str]) -> None:
    import json

    setup_logging("INFO", "json", tenant_id="acme", sink=lines.append)
    logger.info(HOSTILE)
    assert json.loads(lines[0])["message"] == HOSTILE


def test_history_transcript_escapes_text_chat_and_errors() -> None:
    entry = {
        "id": "m1",
        "chat_id": "c\x1b1",
        "text": HOSTILE,
        "status": "failed",
        "received_at": "2026-11-30T00:00:00+00:00",
        "last_error": "boom\x1b[0m",
        "replies": [{"text": "\x1b[31mred", "status": "sent"}],
    }
    shown = format_transcript([entry])
    assert "\x1b" not in shown and "\x07" not in shown
    assert SHOWN in shown and "c\\x1b1" in shown and "\\x1b[31mred" in shown
