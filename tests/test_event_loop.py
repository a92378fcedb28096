"""The event loop of a worker and the gateway (shared/event_loop.py)."""

from __future__ import annotations

import asyncio

import uvloop

from chatq.shared import event_loop


def test_run_runs_the_coroutine_on_a_uvloop_loop_and_returns_its_result() -> None:
    seen: list[asyncio.AbstractEventLoop] = []

    async def main() -> int:
        seen.append(asyncio.get_running_loop())
        await asyncio.sleep(0)
        return 42

    assert event_loop.run(main()) == 42
    assert isinstance(seen[0], uvloop.Loop)
    assert seen[0].is_closed()


def test_run_installs_no_policy_for_the_rest_of_the_process() -> None:
    async def main() -> None:
        await asyncio.sleep(0)

    event_loop.run(main())
    assert not isinstance(asyncio.get_event_loop_policy(), uvloop.EventLoopPolicy)
    fresh = asyncio.new_event_loop()
    try:
        assert not isinstance(fresh, uvloop.Loop)
    finally:
        fresh.close()
