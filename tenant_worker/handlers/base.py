"""What a handler is: the protocol, the per-call context, reply normalisation.

A handler turns one inbound message into zero or more reply texts. It signals
failure only through the exception tree: `HandlerError` when a retry may help,
`PermanentHandlerError` when it will not.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from chatq.shared.errors import PermanentHandlerError
from chatq.tenant_worker.messages import Message

__all__ = ["REPLY_TYPES", "Handler", "HandlerContext", "normalise_replies"]

# What a module handler function may return, as named in error messages.
REPLY_TYPES = "str | list[str] | None"


@dataclass(frozen=True, slots=True)
class HandlerContext:
    """What a handler knows about this call besides the message."""

    tenant_id: str
    attempt: int  # 1 on the first try


class Handler(Protocol):
    """Turns a message into its replies; built once per worker by `load_handler`."""

    async def handle(self, message: Message, ctx: HandlerContext) -> list[str]:
        """The replies to `message`, in order (empty for none).

        Raises HandlerError (retryable) or PermanentHandlerError.
        """
        ...

    async def aclose(self) -> None:
        """Release what the handler holds (e.g. an HTTP session); safe to call twice."""
        ...


def normalise_replies(value: object) -> list[str]:
    """Turn a handler's `str | list[str] | None` into a list of reply texts.

    Anything else is a bug in the handler that a retry will not fix, hence
    PermanentHandlerError.
    """
    if value is None:
        return []
    if isinstance(value, str):
        return [value]
    if isinstance(value, list):
        for index, item in enumerate(value):
            if not isinstance(item, str):
                raise PermanentHandlerError(
                    f"handler returned a list with {type(item).__name__} at index {index},"
                    f" expected {REPLY_TYPES}"
                )
        return list(value)
    raise PermanentHandlerError(f"handler returned {type(value).__name__}, expected {REPLY_TYPES}")
