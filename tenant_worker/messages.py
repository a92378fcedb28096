"""The message and reply values that flow through a tenant worker."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from chatq.shared.text import storable, storable_text

__all__ = [
    "MAX_TEXT_CHARS",
    "Message",
    "Reply",
    "StatusCounts",
    "StatusUpdate",
    "storable",
    "storable_text",
]

MAX_TEXT_CHARS = 4096


@dataclass(frozen=True, slots=True)
class Message:
    """One inbound chat message, as accepted by ingest and given to handlers."""

    id: str
    chat_id: str
    text: str
    tenant_id: str
    sender: str | None = None
    ts: float | None = None  # the sender's own timestamp, if it sent one
    received_at: float = 0.0  # wall-clock seconds when ingest accepted it
    type: str = "text"  # a channel's message kind: text, image, button, ... (WhatsApp)
    payload: dict[str, Any] | None = None  # the channel's raw message object, if any


@dataclass(frozen=True, slots=True)
class Reply:
    """One outgoing reply, stored before it is sent."""

    id: int
    message_id: str
    chat_id: str
    text: str
    attempts: int = 0
    next_attempt_at: float = 0.0


@dataclass(frozen=True, slots=True)
class StatusUpdate:
    """A provider's delivery status for a sent reply (found by its provider_id)."""

    provider_id: str
    status: str  # sent | delivered | read | failed
    error: str | None = None  # "code: title", for failed


@dataclass(frozen=True, slots=True)
class StatusCounts:
    """What applying statuses did: moved a reply, changed nothing, or found no reply."""

    applied: int = 0
    stale: int = 0  # already there or further on (re-delivered, out of order)
    unknown: int = 0  # no reply has that provider_id
