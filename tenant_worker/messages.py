"""The message and reply values that flow through a tenant worker."""

from __future__ import annotations

from dataclasses import dataclass

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


@dataclass(frozen=True, slots=True)
class Reply:
    """One outgoing reply, stored before it is sent."""

    id: int
    message_id: str
    chat_id: str
    text: str
    attempts: int = 0
    next_attempt_at: float = 0.0
