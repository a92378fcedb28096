"""Running chatq processes from tests, apart from the developer's shell, and waiting on them.

- `clean_env()`: ``os.environ`` without the variables chatq's config loader
  reads, so the test's config file alone decides.
- `short_run_dir()`: a fresh directory under /tmp for unix sockets.
- `toml_value(value)`: a Python scalar as a TOML value, for writing configs.
- `wait_for(what, probe)`: poll (blocking) with a deadline instead of a fixed sleep.
- `UnixHTTPConnection`: http.client over a unix socket (tenants' ingest sockets).
- `fill_file_system(folder)`: fill the file system of `folder` (disk-full tests).

bench/ scripts use these too (mypy's path has tests/).
"""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import socket
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from chatq.config.loader import ENV_VARIABLES

__all__ = [
    "CHATQ_ENV",
    "POLL_S",
    "UnixHTTPConnection",
    "clean_env",
    "fill_file_system",
    "short_run_dir",
    "toml_value",
    "wait_for",
]

T = TypeVar("T")
CHATQ_ENV = ENV_VARIABLES  # a developer's shell must not change the tests
POLL_S = 0.02


def clean_env() -> dict[str, str]:
    """A copy of the environment without chatq's overrides (`CHATQ_ENV`)."""
    return {k: v for k, v in os.environ.items() if k not in CHATQ_ENV}


def short_run_dir() -> Path:
    """A new empty directory in /tmp; the caller removes it.

    Unix socket paths are short (107 bytes): keep run_dir out of the long tmp_path.
    """
    return Path(tempfile.mkdtemp(prefix="cq-", dir="/tmp"))


def toml_value(value: object) -> str:
    """A Python scalar as a TOML value (strings as JSON strings, which TOML accepts).

    A dict becomes an inline table, e.g. a tenant's ``whatsapp = {...}``.
    """
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k} = {toml_value(v)}" for k, v in value.items()) + "}"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str | Path):
        return json.dumps(str(value))
    raise TypeError(f"cannot write {value!r} as TOML")


def wait_for(what: str, probe: Callable[[], T | None], timeout: float = 10.0) -> T:
    """Poll `probe` until it returns something other than None/False; AssertionError on timeout."""
    deadline = time.monotonic() + timeout
    while True:
        result = probe()
        if result is not None and result is not False:
            return result
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(POLL_S)


class UnixHTTPConnection(http.client.HTTPConnection):
    """http.client over a unix socket (the tenants' ingest sockets)."""

    def __init__(self, path: Path, timeout: float) -> None:
        super().__init__("localhost", timeout=timeout)
        self._path = path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        sock.connect(str(self._path))
        self.sock = sock


def fill_file_system(folder: Path) -> Path:
    """Fill the file system of `folder` to its last byte; the filler file (delete it to free)."""
    filler = folder / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        for size in (65536, 512, 1):
            with contextlib.suppress(OSError):
                while os.write(fd, b"\0" * size):
                    pass
    finally:
        os.close(fd)
    return filler
