"""shared/whatsapp: the send request, the split of long replies, the answer, the error policy."""

from __future__ import annotations

import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from chatq.shared.whatsapp.errors import Action, GraphError, action_for, parse_error
from chatq.shared.whatsapp.graph import (
    MAX_BODY_CHARS,
    message_id,
    messages_url,
    split_text,
    text_message,
)

RETRY = (1, 2, 4, 80007, 130429, 131000, 131016, 131057)
FAIL = (100, 130403, 131008, 131009, 131021, 131026, 131042, 131045, 131047, 131050, 131051)
PAUSE = (0, 3, 10, 190, 200, 250, 299, 368, 130497, 131031, 131048)


def test_url_and_body_are_what_meta_documents() -> None:
    assert (
        messages_url("https://graph.facebook.com/", "v23.0", "106540352242922")
        == "https://graph.facebook.com/v23.0/106540352242922/messages"
    )
    assert text_message("15551234567", "hi") == {
        "messaging_product": "whatsapp",
        "recipient_type": "individual",
        "to": "15551234567",
        "type": "text",
        "text": {"preview_url": False, "body": "hi"},
    }


def test_a_short_reply_is_one_part() -> None:
    assert split_text("hello world") == ["hello world"]
    assert split_text("") == [""]
    assert split_text("x" * MAX_BODY_CHARS) == ["x" * MAX_BODY_CHARS]


def test_a_long_reply_is_cut_at_whitespace_in_order() -> None:
    words = [f"w{n:04d}" for n in range(2000)]  # 5 characters + a space each: ~12,000
    parts = split_text(" ".join(words))
    assert len(parts) == 3
    assert all(len(part) <= MAX_BODY_CHARS for part in parts)
    assert " ".join(parts).split() == words  # nothing lost, nothing reordered, no word cut


def test_a_word_longer_than_the_limit_is_cut_hard() -> None:
    assert split_text("ab " + "x" * 10 + " cd", limit=4) == ["ab", "xxxx", "xxxx", "xx", "cd"]


@given(st.text(alphabet="ab \n", max_size=60), st.integers(min_value=1, max_value=12))
def test_split_keeps_every_word_in_order_within_the_limit(text: str, limit: int) -> None:
    parts = split_text(text, limit)
    assert all(len(part) <= limit for part in parts)
    if len(text) > limit:
        assert "".join("".join(parts).split()) == "".join(text.split())
    else:
        assert parts == [text]


def test_message_id_reads_messages_0_id() -> None:
    answer = {"messaging_product": "whatsapp", "messages": [{"id": "wamid.HBg"}]}
    assert message_id(json.dumps(answer).encode()) == "wamid.HBg"
    for bad in (b"", b"[]", b'{"messages": []}', b'{"messages": [{"id": 7}]}'):
        with pytest.raises(ValueError, match=r"not JSON|messages\[0\]\.id"):
            message_id(bad)


@pytest.mark.parametrize("code", RETRY)
def test_retry_codes(code: int) -> None:
    assert action_for(code) is Action.RETRY


@pytest.mark.parametrize("code", FAIL)
def test_fail_codes(code: int) -> None:
    assert action_for(code) is Action.FAIL


@pytest.mark.parametrize("code", PAUSE)
def test_pause_codes(code: int) -> None:
    assert action_for(code) is Action.PAUSE


def test_pair_rate_and_unknown_codes() -> None:
    assert action_for(131056) is Action.PAIR_RATE
    assert action_for(999_999) is Action.RETRY  # then failed at the attempt limit


def error_body(code: object, message: str = "", details: str | None = None) -> bytes:
    error: dict[str, object] = {"message": message, "type": "OAuthException", "code": code}
    if details is not None:
        error["error_data"] = {"messaging_product": "whatsapp", "details": details}
    error["fbtrace_id"] = "AbC"
    return json.dumps({"error": error}).encode()


def test_parse_error_reads_code_message_details() -> None:
    body = error_body(131047, "(#131047) Re-engagement message", "More than 24 hours have passed")
    error = parse_error(body)
    assert error == GraphError(
        code=131047,
        message="(#131047) Re-engagement message",
        details="More than 24 hours have passed",
        fbtrace_id="AbC",
    )
    assert error.action is Action.FAIL
    assert error.describe() == ("131047: Re-engagement message (More than 24 hours have passed)")


def test_describe_falls_back_to_a_title_and_stays_on_one_line() -> None:
    assert parse_error(error_body(190)) is not None
    assert GraphError(code=190).describe() == "190: access token expired/invalid"
    assert GraphError(code=5, message="a\nb").describe() == "5: a b"


@pytest.mark.parametrize(
    "body",
    [b"", b"<html>502 Bad Gateway</html>", b"[]", b'{"error": "x"}', error_body(None)],
)
def test_an_answer_without_a_code_is_no_graph_error(body: bytes) -> None:
    assert parse_error(body) is None


def test_a_numeric_string_code_is_read() -> None:
    error = parse_error(error_body("131056"))
    assert error is not None and error.action is Action.PAIR_RATE
