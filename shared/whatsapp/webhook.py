"""Meta's webhook updates: the signature check and the parse, as pure functions.

    verify_signature(body, header, secret) -> Signature.OK | MISSING | BAD
    parse_update(update) -> {phone_number_id: Routed(messages, statuses)}

A POST carries one update: ``entry[]``, each with ``changes[]``; every change
with ``field == "messages"`` has a ``value`` with ``metadata.phone_number_id``
and any of ``contacts[]``, ``messages[]`` and ``statuses[]``. Every entry,
change, message and status is walked (pywa handles only the first, its issue
#229). Changes of other fields (template or account updates) are skipped.

A message becomes the dict a worker's ingest takes (``id`` = wamid,
``chat_id`` = ``from``, ``text``, ``from`` = the contact's profile name,
``ts``, ``type`` and the raw object as ``payload``); a status becomes a
`Status`. What cannot be read that way raises `BadUpdate` naming the place:
the gateway answers 400 and forwards nothing.
"""

from __future__ import annotations

import hmac
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

from chatq.shared.text import storable_text

__all__ = [
    "MAX_TEXT_CHARS",
    "SIGNATURE_HEADER",
    "STATUSES",
    "BadUpdate",
    "Routed",
    "Signature",
    "Status",
    "message_text",
    "parse_update",
    "sign",
    "verify_signature",
]

SIGNATURE_HEADER = "X-Hub-Signature-256"
STATUSES = ("sent", "delivered", "read", "failed")
MAX_TEXT_CHARS = 4096  # a worker's limit; the whole original stays in `payload`
MAX_ID_CHARS = 256  # a worker's limits on ids and types (tenant_worker/ingest.py)
MAX_TYPE_CHARS = 64
_PREFIX = "sha256="


class Signature(Enum):
    """The outcome of checking X-Hub-Signature-256."""

    OK = "ok"
    MISSING = "missing"  # answered 401
    BAD = "bad"  # answered 403


class BadUpdate(ValueError):
    """A signed update that is not shaped like Meta's (answered 400)."""


def sign(body: bytes, secret: str) -> str:
    """The X-Hub-Signature-256 value of `body` under `secret` (what Meta sends)."""
    return _PREFIX + hmac.digest(secret.encode(), body, "sha256").hex()  # one-shot: OpenSSL


def verify_signature(body: bytes, header: str | None, secret: str) -> Signature:
    """Check the raw body against the header in constant time."""
    if not header:
        return Signature.MISSING
    expected = sign(body, secret)
    given = header.strip().lower()
    if hmac.compare_digest(expected.encode(), given.encode("ascii", "replace")):
        return Signature.OK
    return Signature.BAD


@dataclass(frozen=True, slots=True)
class Status:
    """One delivery status of an outgoing message (``statuses[]``)."""

    id: str  # the wamid the Graph API gave the reply: its provider_id
    status: str  # sent | delivered | read | failed
    ts: int
    error: str | None = None  # "code: title" of errors[0], for failed

    def as_json(self) -> dict[str, Any]:
        return {"id": self.id, "status": self.status, "ts": self.ts, "error": self.error}


@dataclass(slots=True)
class Routed:
    """One phone number's part of an update."""

    messages: list[dict[str, Any]] = field(default_factory=list)
    statuses: list[Status] = field(default_factory=list)

    def as_json(self) -> dict[str, Any]:
        """The body of a worker's ``POST /whatsapp/updates``."""
        return {"messages": self.messages, "statuses": [s.as_json() for s in self.statuses]}


def parse_update(update: object, skipped: list[str] | None = None) -> dict[str, Routed]:
    """Every message and status of a webhook update, by phone_number_id.

    BadUpdate for a body that is not an update at all. Inside one, a part of
    an unexpected shape (an entry, a change, a message, a status) raises too,
    unless `skipped` is given: then it is left out, its problem appended
    there, and the rest parsed. The gateway skips: a 400 for one odd item
    would hold every other tenant's messages of the POST for Meta's 7 days
    of retries.
    """
    if not isinstance(update, dict):
        raise BadUpdate(f"body: must be an object, got {type(update).__name__}")
    routed: dict[str, Routed] = {}
    for n, entry in enumerate(_list(update, "entry", "body")):
        try:  # plain try blocks, not a context manager: this runs for every webhook
            where = f"entry[{n}]"
            for m, change in enumerate(_list(_object(entry, where), "changes", where)):
                try:
                    _parse_change(change, n, m, routed, skipped)
                except BadUpdate as exc:
                    _skip(exc, skipped)
        except BadUpdate as exc:
            _skip(exc, skipped)
    return routed


def _skip(exc: BadUpdate, skipped: list[str] | None) -> None:
    """Note a BadUpdate in `skipped` and go on; let it out when there is no list."""
    if skipped is None:
        raise exc
    skipped.append(str(exc))


def _parse_change(
    change: object, n: int, m: int, routed: dict[str, Routed], skipped: list[str] | None
) -> None:
    if not isinstance(change, dict):
        raise BadUpdate(f"entry[{n}].changes[{m}]: must be an object, got {type(change).__name__}")
    if change.get("field") != "messages":
        return  # template, account or quality updates: not ours
    where = f"entry[{n}].changes[{m}]"
    value, number = _value_and_number(change.get("value"), where)
    part = routed.get(number)
    if part is None:
        part = routed[number] = Routed()
    _parse_items(value, f"{where}.value", part, skipped)


def _value_and_number(value: object, where: str) -> tuple[dict[str, Any], str]:
    """A change's value and its metadata.phone_number_id."""
    metadata = value.get("metadata") if isinstance(value, dict) else None
    number = metadata.get("phone_number_id") if isinstance(metadata, dict) else None
    if isinstance(value, dict) and isinstance(number, str) and number:  # the usual update
        return value, number
    value = _object(value, f"{where}.value")
    metadata = _object(value.get("metadata"), f"{where}.value.metadata")
    return value, _string(metadata, "phone_number_id", f"{where}.value.metadata")


def _parse_items(
    value: dict[str, Any], where: str, part: Routed, skipped: list[str] | None
) -> None:
    """A change's messages and statuses into `part`."""
    names = _contact_names(value, where)
    for k, item in enumerate(_list(value, "messages", where, optional=True)):
        try:
            part.messages.append(_message(_object(item, f"{where}.messages[{k}]"), names))
        except BadUpdate as exc:
            _skip(exc, skipped)
    for k, item in enumerate(_list(value, "statuses", where, optional=True)):
        try:
            status = _status(_object(item, f"{where}.statuses[{k}]"))
        except BadUpdate as exc:
            _skip(exc, skipped)
        else:
            if status is not None:
                part.statuses.append(status)


def _contact_names(value: dict[str, Any], where: str) -> dict[str, str]:
    """wa_id -> profile name, from ``contacts[]``."""
    names: dict[str, str] = {}
    for n, item in enumerate(_list(value, "contacts", where, optional=True)):
        contact = _object(item, f"{where}.contacts[{n}]")
        profile = contact.get("profile")
        name = profile.get("name") if isinstance(profile, dict) else None
        wa_id = contact.get("wa_id")
        if isinstance(wa_id, str) and isinstance(name, str):
            names[wa_id] = name
    return names


def _message(item: dict[str, Any], names: Mapping[str, str]) -> dict[str, Any]:
    sender, wamid, ts = item.get("from"), item.get("id"), item.get("timestamp")
    if not (_is_id(sender) and _is_id(wamid) and _is_epoch(ts)):  # say which, and where
        where = f"message {str(item.get('id'))[:80]!r}"
        sender, wamid = _id(item, "from", where), _id(item, "id", where)
        ts = _timestamp(item, where)
    assert isinstance(sender, str)
    kind = item.get("type")
    kind = kind if isinstance(kind, str) and 0 < len(kind) <= MAX_TYPE_CHARS else "unknown"
    name = names.get(sender)
    return {
        "id": wamid,
        "chat_id": sender,
        "text": storable_text(message_text(item)[:MAX_TEXT_CHARS]),
        "from": storable_text(name) if name is not None else None,
        "ts": int(ts),  # type: ignore[arg-type]  # checked by _is_epoch or _timestamp
        "type": kind,
        "payload": item,
    }


def message_text(item: Mapping[str, Any]) -> str:
    """The text a handler sees: the body, caption, button text or reply title; else ''."""
    kind = item.get("type")
    content = item.get(kind) if isinstance(kind, str) else None
    if not isinstance(content, dict):
        return ""
    if kind == "text":
        return _text_of(content, "body")
    if kind == "button":
        return _text_of(content, "text")
    if kind == "interactive":
        reply = content.get(str(content.get("type")))  # button_reply | list_reply
        return _text_of(reply, "title") if isinstance(reply, dict) else ""
    return _text_of(content, "caption")  # image, video, document; others have none


def _text_of(content: Mapping[str, Any], key: str) -> str:
    value = content.get(key)
    return value if isinstance(value, str) else ""


def _status(item: dict[str, Any]) -> Status | None:
    """A Status; None for a kind we do not track (e.g. "deleted", "warning")."""
    where = f"status {str(item.get('id'))[:80]!r}"
    status = _string(item, "status", where)
    if status not in STATUSES:
        return None
    error = None
    if status == "failed":
        error = _error_text(item.get("errors"))
    return Status(_id(item, "id", where), status, _timestamp(item, where), error)


def _error_text(errors: object) -> str:
    """'code: title' of the first error (Meta sends one)."""
    first = errors[0] if isinstance(errors, list) and errors else None
    if not isinstance(first, dict):
        return "failed (no error given)"
    code, title = first.get("code"), first.get("title") or first.get("message")
    return f"{code}: {title}" if title else f"{code}"


# -- shapes --------------------------------------------------------------------


def _object(value: object, where: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise BadUpdate(f"{where}: must be an object, got {type(value).__name__}")
    return value


def _list(obj: dict[str, Any], key: str, where: str, *, optional: bool = False) -> list[Any]:
    value = obj.get(key)
    if value is None and optional:
        return []
    if not isinstance(value, list):
        raise BadUpdate(f"{where}.{key}: must be a list, got {type(value).__name__}")
    return value


def _string(obj: dict[str, Any], key: str, where: str) -> str:
    value = obj.get(key)
    if not isinstance(value, str) or not value:
        raise BadUpdate(f"{where}: {key} must be a non-empty string")
    return value


def _id(obj: dict[str, Any], key: str, where: str) -> str:
    """An id as a worker takes it (its ingest refuses others: keep the two in step)."""
    value = _string(obj, key, where)
    if len(value) > MAX_ID_CHARS or "\x00" in value:
        raise BadUpdate(f"{where}: {key} must be at most {MAX_ID_CHARS} characters, without NUL")
    return value


def _is_id(value: object) -> bool:
    return isinstance(value, str) and 0 < len(value) <= MAX_ID_CHARS and "\x00" not in value


def _is_epoch(value: object) -> bool:
    return isinstance(value, str) and value.isdigit() and len(value) <= 12


def _timestamp(obj: dict[str, Any], where: str) -> int:
    """Meta's timestamps are epoch seconds as a string of digits."""
    value = obj.get("timestamp")
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    if isinstance(value, str) and value.isdigit() and len(value) <= 12:
        return int(value)
    raise BadUpdate(f"{where}: timestamp must be epoch seconds, got {str(value)[:40]!r}")
