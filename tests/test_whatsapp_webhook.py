"""The pure webhook protocol: signatures and the parse of Meta's updates."""

from __future__ import annotations

from typing import Any

import pytest
from whatsapp_payloads import change, contact, status, text_message, update

from chatq.shared.whatsapp.webhook import (
    BadUpdate,
    Signature,
    Status,
    parse_update,
    sign,
    verify_signature,
)

SECRET = "s3cret"
BODY = b'{"object":"whatsapp_business_account","entry":[]}'

# -- signatures ----------------------------------------------------------------


def test_a_signature_made_with_the_secret_verifies() -> None:
    assert verify_signature(BODY, sign(BODY, SECRET), SECRET) is Signature.OK


def test_upper_case_hex_and_surrounding_space_still_verify() -> None:
    header = " sha256=" + sign(BODY, SECRET).removeprefix("sha256=").upper() + " "
    assert verify_signature(BODY, header, SECRET) is Signature.OK


@pytest.mark.parametrize("header", [None, ""])
def test_no_signature_is_missing(header: str | None) -> None:
    assert verify_signature(BODY, header, SECRET) is Signature.MISSING


@pytest.mark.parametrize(
    "header",
    [
        sign(BODY, "other secret"),
        sign(BODY + b" ", SECRET),
        sign(BODY, SECRET).removeprefix("sha256="),  # no prefix
        "sha1=" + sign(BODY, SECRET).removeprefix("sha256="),
        "sha256=zz",
        "sha256=\u00e9\u00e9",  # not ASCII
    ],
)
def test_a_wrong_signature_is_bad(header: str) -> None:
    assert verify_signature(BODY, header, SECRET) is Signature.BAD


def test_sign_matches_the_openssl_recipe_in_the_readme() -> None:
    # printf '%s' '{}' | openssl dgst -sha256 -hmac s3cret
    expected = "sha256=adbde1ce40c89c14215687d5d762a47df6dfaefcfad61e2e86718ffc8498571b"
    assert sign(b"{}", SECRET) == expected


# -- routing -------------------------------------------------------------------


def test_every_entry_and_change_is_routed_by_phone_number_id() -> None:
    body = update(
        change("111", messages=[text_message("wamid.1")]),
        change("222", messages=[text_message("wamid.2"), text_message("wamid.3")]),
        change("111", statuses=[status("wamid.out1", "delivered")]),
        entries=2,
    )
    routed = parse_update(body)
    assert set(routed) == {"111", "222"}
    assert [m["id"] for m in routed["111"].messages] == ["wamid.1"]
    assert [m["id"] for m in routed["222"].messages] == ["wamid.2", "wamid.3"]
    assert routed["111"].statuses == [Status("wamid.out1", "delivered", 1700000100)]


def test_changes_of_other_fields_are_skipped() -> None:
    body = update(
        {"field": "message_template_status_update", "value": {"event": "APPROVED"}},
        change("111", messages=[text_message("wamid.1")]),
    )
    assert list(parse_update(body)) == ["111"]


def test_an_update_without_entries_routes_nothing() -> None:
    assert parse_update({"object": "whatsapp_business_account", "entry": []}) == {}


# -- messages ------------------------------------------------------------------


def test_a_text_message_maps_to_a_chatq_message() -> None:
    item = text_message("wamid.HBgL", sender="16315551181", body="Hello")
    routed = parse_update(
        update(change("111", messages=[item], contacts=[contact("16315551181", "Kerry")]))
    )
    assert routed["111"].messages == [
        {
            "id": "wamid.HBgL",
            "chat_id": "16315551181",
            "text": "Hello",
            "from": "Kerry",
            "ts": 1700000000,
            "type": "text",
            "payload": item,
        }
    ]


def test_the_name_comes_from_the_matching_contact() -> None:
    items = [text_message("w1", sender="1"), text_message("w2", sender="2")]
    contacts = [contact("2", "Bea"), contact("1", "Al")]
    routed = parse_update(update(change("111", messages=items, contacts=contacts)))
    assert [m["from"] for m in routed["111"].messages] == ["Al", "Bea"]


def test_a_message_without_a_contact_has_no_name() -> None:
    routed = parse_update(update(change("111", messages=[text_message("w1")], contacts=[])))
    assert routed["111"].messages[0]["from"] is None


def _typed(kind: str, content: dict[str, Any] | None) -> dict[str, Any]:
    item: dict[str, Any] = {
        "from": "1",
        "id": f"wamid.{kind}",
        "timestamp": "1700000000",
        "type": kind,
    }
    if content is not None:
        item[kind] = content
    return item


MEDIA = {"mime_type": "image/jpeg", "sha256": "abc", "id": "9001"}
TYPED = [
    ("image", {**MEDIA, "caption": "look"}, "look"),
    ("image", MEDIA, ""),
    ("video", {**MEDIA, "caption": "clip"}, "clip"),
    ("document", {**MEDIA, "caption": "the pdf", "filename": "a.pdf"}, "the pdf"),
    ("audio", {**MEDIA, "voice": True}, ""),
    ("sticker", {**MEDIA, "animated": False}, ""),
    ("location", {"latitude": 52.1, "longitude": 4.3, "name": "HQ", "address": "Main St"}, ""),
    ("contacts", None, ""),
    ("button", {"text": "Yes please", "payload": "YES"}, "Yes please"),
    (
        "interactive",
        {"type": "button_reply", "button_reply": {"id": "b1", "title": "Confirm"}},
        "Confirm",
    ),
    (
        "interactive",
        {"type": "list_reply", "list_reply": {"id": "r1", "title": "Row", "description": "d"}},
        "Row",
    ),
    ("interactive", {"type": "nfm_reply", "nfm_reply": {"response_json": "{}"}}, ""),
    ("reaction", {"message_id": "wamid.x", "emoji": "\U0001f44d"}, ""),
    ("unsupported", None, ""),
    ("order", {"catalog_id": "1", "product_items": []}, ""),
]


@pytest.mark.parametrize(("kind", "content", "text"), TYPED)
def test_every_message_type_keeps_its_type_payload_and_a_text(
    kind: str, content: dict[str, Any] | None, text: str
) -> None:
    item = _typed(kind, content)
    message = parse_update(update(change("111", messages=[item])))["111"].messages[0]
    assert (message["type"], message["text"], message["payload"]) == (kind, text, item)


def test_a_message_without_a_type_is_unknown_with_empty_text() -> None:
    item = text_message("w1")
    del item["type"]
    message = parse_update(update(change("111", messages=[item])))["111"].messages[0]
    assert (message["type"], message["text"]) == ("unknown", "")


def test_a_long_text_is_cut_to_what_a_worker_takes_and_kept_whole_in_the_payload() -> None:
    item = text_message("w1", body="x" * 5000)
    message = parse_update(update(change("111", messages=[item])))["111"].messages[0]
    assert len(message["text"]) == 4096
    assert message["payload"]["text"]["body"] == "x" * 5000


def test_a_lone_surrogate_in_a_text_or_name_is_escaped() -> None:
    item = text_message("w1", body="caf\udce9")
    body = update(change("111", messages=[item], contacts=[contact("16315551181", "\ud800")]))
    message = parse_update(body)["111"].messages[0]
    assert (message["text"], message["from"]) == ("caf\\udce9", "\\ud800")


def test_an_integer_timestamp_is_taken_too() -> None:
    item = {**text_message("w1"), "timestamp": 1700000001}
    assert (
        parse_update(update(change("111", messages=[item])))["111"].messages[0]["ts"] == 1700000001
    )


# -- statuses -------------------------------------------------------------------


@pytest.mark.parametrize("state", ["sent", "delivered", "read"])
def test_statuses_map_to_id_status_and_time(state: str) -> None:
    routed = parse_update(update(change("111", statuses=[status("wamid.o", state)])))
    assert routed["111"].statuses == [Status("wamid.o", state, 1700000100)]


def test_a_failed_status_keeps_code_and_title() -> None:
    item = status("wamid.o", "failed", code=131047, title="Re-engagement message")
    routed = parse_update(update(change("111", statuses=[item])))
    assert routed["111"].statuses == [
        Status("wamid.o", "failed", 1700000100, "131047: Re-engagement message")
    ]
    assert routed["111"].statuses[0].as_json()["error"] == "131047: Re-engagement message"


def test_a_failed_status_without_errors_still_says_so() -> None:
    routed = parse_update(update(change("111", statuses=[status("wamid.o", "failed")])))
    assert routed["111"].statuses[0].error == "failed (no error given)"


def test_statuses_of_other_kinds_are_skipped() -> None:
    routed = parse_update(update(change("111", statuses=[status("wamid.o", "deleted")])))
    assert routed["111"].statuses == []


def test_messages_and_statuses_of_one_change_travel_together() -> None:
    body = update(change("111", messages=[text_message("w1")], statuses=[status("o1", "read")]))
    part = parse_update(body)["111"].as_json()
    assert [m["id"] for m in part["messages"]] == ["w1"]
    assert part["statuses"] == [{"id": "o1", "status": "read", "ts": 1700000100, "error": None}]


# -- bad shapes -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("body", "named"),
    [
        ([], "body: must be an object"),
        ({"object": "x"}, "body.entry: must be a list"),
        ({"entry": [1]}, "entry[0]: must be an object"),
        ({"entry": [{"changes": {}}]}, "entry[0].changes: must be a list"),
        ({"entry": [{"changes": [{"field": "messages"}]}]}, "entry[0].changes[0].value"),
        (
            {"entry": [{"changes": [{"field": "messages", "value": {"metadata": {}}}]}]},
            "phone_number_id",
        ),
        (update(change("111", messages=[{"id": "w1", "timestamp": "1"}])), "from"),
        (update(change("111", messages=[{**text_message("w1"), "id": 5}])), "id must be"),
        (
            update(change("111", messages=[{**text_message("w1"), "timestamp": "soon"}])),
            "timestamp",
        ),
        (update(change("111", messages=["w1"])), "messages[0]: must be an object"),
        (update(change("111", statuses=[{"id": "o1", "timestamp": "1"}])), "status must be"),
    ],
)
def test_a_bad_shape_is_refused_naming_the_place(body: object, named: str) -> None:
    with pytest.raises(BadUpdate, match=named.replace("[", r"\[").replace("]", r"\]")):
        parse_update(body)


def test_with_a_skipped_list_odd_items_are_left_out_and_the_rest_routed() -> None:
    body = update(
        change(
            "111",
            messages=[
                text_message("w1"),
                {"id": "w2", "timestamp": "1"},  # no sender
                {**text_message("w3"), "id": "x" * 300},  # an id no worker takes
                text_message("w4"),
            ],
            statuses=[{"id": "o1", "timestamp": "1"}, status("o2", "read")],
        ),
        {"field": "messages", "value": {"metadata": {}}},  # no number: cannot be routed
        change("222", messages=[text_message("w5")]),
    )
    skipped: list[str] = []
    routed = parse_update(body, skipped)
    assert [m["id"] for m in routed["111"].messages] == ["w1", "w4"]
    assert [s.id for s in routed["111"].statuses] == ["o2"]
    assert [m["id"] for m in routed["222"].messages] == ["w5"]
    assert len(skipped) == 4
    assert any("from" in reason for reason in skipped)
    assert any("at most 256 characters" in reason for reason in skipped)


def test_the_gateway_and_the_worker_agree_on_what_an_id_is() -> None:
    from chatq.shared.whatsapp import webhook
    from chatq.tenant_worker import ingest

    assert (webhook.MAX_ID_CHARS, webhook.MAX_TYPE_CHARS) == (
        ingest.MAX_ID_CHARS,
        ingest.MAX_TYPE_CHARS,
    )
