"""Delivery statuses of a sent reply: the order they move in, as a pure function.

    pending -> sent -> delivered -> read          never backwards
        \\-------\\--------\\--> failed            final

Providers report statuses out of order and more than once (a ``read`` may
come before its ``delivered``, and every status may be delivered again), so a
status is applied only when it moves the reply forward; anything else is a
no-op, which makes applying a batch of statuses idempotent.
"""

from __future__ import annotations

__all__ = ["DELIVERY_ORDER", "advance"]

DELIVERY_ORDER = ("pending", "sent", "delivered", "read")


def advance(current: str, incoming: str) -> str | None:
    """The reply's new status after `incoming`, or None when it does not move."""
    if current in ("failed", incoming):
        return None
    if incoming == "failed":
        return None if current == "read" else "failed"  # read proves it was delivered
    if incoming not in DELIVERY_ORDER or current not in DELIVERY_ORDER:
        return None
    if DELIVERY_ORDER.index(incoming) > DELIVERY_ORDER.index(current):
        return incoming
    return None
