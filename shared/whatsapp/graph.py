"""The Graph API's send-message call, as pure functions: URL, body, split, answer.

    POST {graph_url}/{graph_version}/{phone_number_id}/messages
    Authorization: Bearer <access token>
    {"messaging_product": "whatsapp", "recipient_type": "individual", "to": <chat_id>,
     "type": "text", "text": {"preview_url": false, "body": <at most 4096 characters>}}

answers ``{"messages": [{"id": "wamid..."}]}``. A longer reply goes out as
several messages, split at whitespace (`split_text`).
"""

from __future__ import annotations

import json
from typing import Any

__all__ = ["MAX_BODY_CHARS", "message_id", "messages_url", "split_text", "text_message"]

MAX_BODY_CHARS = 4096  # Meta's limit on a text message body


def messages_url(graph_url: str, graph_version: str, phone_number_id: str) -> str:
    """Where a number's messages are POSTed."""
    return f"{graph_url.rstrip('/')}/{graph_version}/{phone_number_id}/messages"


def text_message(to: str, body: str) -> dict[str, Any]:
    """The JSON body of one text message to the user `to` (their wa_id)."""
    return {
        "messaging_product": "whatsapp",
        "recipient_type": "individual",
        "to": to,
        "type": "text",
        "text": {"preview_url": False, "body": body},
    }


def split_text(text: str, limit: int = MAX_BODY_CHARS) -> list[str]:
    """`text` in parts of at most `limit` characters, in order, cut at whitespace.

    The whitespace at a cut is dropped (each part is stripped at its cut
    ends); a word longer than `limit` is cut hard. A text within the limit
    comes back whole, as one part.
    """
    if limit < 1:
        raise ValueError(f"limit must be >= 1, got {limit}")
    parts: list[str] = []
    rest = text
    while len(rest) > limit:
        cut = _last_space(rest, limit)
        head, rest = (rest[:cut], rest[cut:]) if cut > 0 else (rest[:limit], rest[limit:])
        head, rest = head.rstrip(), rest.lstrip()
        if head:
            parts.append(head)
    if rest or not parts:
        parts.append(rest)
    return parts


def _last_space(text: str, limit: int) -> int:
    """Index of the last whitespace at or before `limit` (0: none worth cutting at)."""
    for index in range(limit, 0, -1):
        if text[index].isspace():
            return index
    return 0


def message_id(body: bytes) -> str:
    """``messages[0].id`` of a success answer; ValueError naming what is missing."""
    try:
        data = json.loads(body)
    except ValueError:
        raise ValueError("answer is not JSON") from None
    messages = data.get("messages") if isinstance(data, dict) else None
    first = messages[0] if isinstance(messages, list) and messages else None
    wamid = first.get("id") if isinstance(first, dict) else None
    if not isinstance(wamid, str) or not wamid:
        raise ValueError("answer has no messages[0].id")
    return wamid
