"""Demo and test handlers, for configs like ``handler = "chatq.tenant_worker.handlers.demo:shout"``.

These are for demos and tests only: some of them kill or hang the worker on
purpose, so the supervisor's restart and watchdog paths can be exercised with
a real process. Each misbehaves only on its trigger text and echoes otherwise.

- `shout`: the text upper-cased.
- `sleepy`: sleeps `float(text)` seconds when the text is a number ("0.1"), then echoes.
- `crash`: the process exits at once with code 70 on "crash".
- `hang`: blocks the event loop for an hour on "hang" (heartbeats stop).
- `flaky`: raises HandlerError on text starting with "fail".
- `slow`: awaits for an hour on "slow" (the loop stays alive; handler_timeout fires).
"""

from __future__ import annotations

import asyncio
import math
import os
import time

from chatq.shared.errors import HandlerError
from chatq.tenant_worker.handlers.base import HandlerContext
from chatq.tenant_worker.messages import Message

__all__ = ["crash", "flaky", "hang", "shout", "sleepy", "slow"]

CRASH_EXIT_CODE = 70
_FOREVER_S = 3600.0


async def shout(message: Message, ctx: HandlerContext) -> str:
    """The message text in upper case."""
    return message.text.upper()


async def sleepy(message: Message, ctx: HandlerContext) -> str:
    """Sleep `float(text)` seconds if the text is a finite, non-negative number; echo."""
    try:
        seconds = float(message.text)
    except ValueError:
        return message.text
    if math.isfinite(seconds) and seconds >= 0:
        await asyncio.sleep(seconds)
    return message.text


async def crash(message: Message, ctx: HandlerContext) -> str:
    """Kill the process on "crash" (no cleanup, like a segfault would); echo otherwise."""
    if message.text == "crash":
        os._exit(CRASH_EXIT_CODE)
    return message.text


async def hang(message: Message, ctx: HandlerContext) -> str:
    """Block the whole event loop on "hang"; echo otherwise."""
    if message.text == "hang":
        time.sleep(_FOREVER_S)  # noqa: ASYNC251 - blocking the loop is the point
    return message.text


async def flaky(message: Message, ctx: HandlerContext) -> str:
    """Fail (retryably) on text starting with "fail"; echo otherwise."""
    if message.text.startswith("fail"):
        raise HandlerError("flaky")
    return message.text


async def slow(message: Message, ctx: HandlerContext) -> str:
    """Await for an hour on "slow", without blocking the loop; echo otherwise."""
    if message.text == "slow":
        await asyncio.sleep(_FOREVER_S)
    return message.text
