"""An `Ingest` served on a fresh unix socket, and a client session whose relative URLs reach it."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator

import aiohttp
from sandbox import short_run_dir

from chatq.tenant_worker.ingest import Ingest

__all__ = ["served"]


@contextlib.asynccontextmanager
async def served(ingest: Ingest) -> AsyncIterator[aiohttp.ClientSession]:
    folder = short_run_dir()
    socket = folder / "ingest.sock"
    await ingest.start(socket)
    try:
        connector = aiohttp.UnixConnector(path=str(socket))
        async with aiohttp.ClientSession("http://ingest", connector=connector) as session:
            yield session
    finally:
        await ingest.stop()
        socket.unlink(missing_ok=True)
        folder.rmdir()
