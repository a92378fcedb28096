"""The event loop a worker and the gateway run on: uvloop's.

    code = event_loop.run(Worker(config, tenant, link).run())

Both spend most of their CPU in loop and socket work (aiohttp serving, the
gateway's forwards over unix sockets); libuv's loop does that work in C
(bench/gateway_bench.py: ~25 % less gateway CPU per webhook). The loop is
made by the process that runs it, after the fork server's fork; nothing is
installed as a policy, so the supervisor, the fork server and the CLI keep
asyncio's own loop.
"""

from __future__ import annotations

from collections.abc import Coroutine
from typing import Any, TypeVar

import uvloop

__all__ = ["run"]

T = TypeVar("T")


def run(main: Coroutine[Any, Any, T]) -> T:
    """Run `main` to completion on a new uvloop loop, then close the loop."""
    return uvloop.run(main)
