"""The ops CLI's side of the control socket: send one request, get its result.

See `supervisor.control` for the wire protocol. `request` turns error answers
back into exceptions: `NoSuchTenant` for an unknown tenant, `ControlError`
for anything else the supervisor refused, `SupervisorNotRunning` when nothing
listens on the socket.
"""

from __future__ import annotations

import json
import socket
import time
from pathlib import Path
from typing import Any

from chatq.shared import json_codec
from chatq.shared.errors import ConfigError, ControlError, NoSuchTenant, SupervisorNotRunning

__all__ = ["request"]

MAX_ANSWER_BYTES = 16 * 1024 * 1024  # a `list` of many tenants, with room to spare
_CHUNK = 64 * 1024


def request(path: Path, cmd: str, *, timeout: float = 10.0, **fields: Any) -> Any:
    """Send `{"cmd": cmd, **fields}` to the supervisor on `path`; return the answer's result.

    Fields whose value is None are left out, so callers can pass optional
    ones straight through (``tenant=args.tenant``). `timeout` bounds the
    whole exchange, in seconds.
    """
    if not timeout > 0:
        raise ValueError(f"timeout must be > 0, got {timeout!r}")
    body = {"cmd": cmd, **{key: value for key, value in fields.items() if value is not None}}
    line = json.dumps(body).encode() + b"\n"
    deadline = time.monotonic() + timeout
    with _connect(path, timeout) as sock:
        _send(sock, line, path)
        answer = _read_answer(sock, path, deadline)
    return _result(answer, fields.get("tenant"))


def _connect(path: Path, timeout: float) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    try:
        sock.connect(str(path))
    except FileNotFoundError:
        sock.close()
        raise SupervisorNotRunning(f"supervisor is not running (no socket at {path})") from None
    except ConnectionRefusedError:  # the socket file of a supervisor that died
        sock.close()
        raise SupervisorNotRunning(
            f"supervisor is not running (stale socket at {path}: nothing answers;"
            " the next `chatq run` replaces it)"
        ) from None
    except OSError as exc:
        sock.close()
        raise ControlError(f"cannot connect to the supervisor on {path}: {exc}") from None
    return sock


def _send(sock: socket.socket, line: bytes, path: Path) -> None:
    try:
        sock.sendall(line)
    except (BrokenPipeError, ConnectionResetError):
        # The server may have refused the request (e.g. too big) before reading
        # it all, and closed: its answer is still there to read.
        pass
    except OSError as exc:  # incl. TimeoutError
        raise ControlError(f"cannot send to the supervisor on {path}: {exc}") from None


def _read_answer(sock: socket.socket, path: Path, deadline: float) -> dict[str, Any]:
    """Read the answer line and check its shape."""
    data = _read_line(sock, path, deadline)
    if not data:
        raise ControlError(f"the supervisor on {path} closed the connection without answering")
    try:
        # orjson first: a `list` of 2,000 tenants (~0.6 MB) takes 10 ms, not json's 23,
        # asked every 100 ms by a watcher while the fleet starts.
        answer = json_codec.loads(data)
    except ValueError:
        raise ControlError(f"the supervisor on {path} sent a malformed answer") from None
    if not isinstance(answer, dict) or not isinstance(answer.get("ok"), bool):
        raise ControlError(f"the supervisor on {path} sent a malformed answer")
    return answer


def _read_line(sock: socket.socket, path: Path, deadline: float) -> bytes:
    """Bytes up to the first newline (or EOF), within `deadline`."""
    buffer = bytearray()
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise ControlError(f"no answer from the supervisor on {path} in time")
        sock.settimeout(remaining)
        try:
            chunk = sock.recv(_CHUNK)
        except TimeoutError:
            raise ControlError(f"no answer from the supervisor on {path} in time") from None
        except OSError as exc:
            raise ControlError(f"reading from the supervisor on {path} failed: {exc}") from None
        end = chunk.find(b"\n")
        if not chunk or end >= 0:
            return bytes(buffer + chunk[: end if end >= 0 else None])
        buffer += chunk
        if len(buffer) > MAX_ANSWER_BYTES:
            raise ControlError(f"the answer from {path} is over {MAX_ANSWER_BYTES} bytes")


def _result(answer: dict[str, Any], tenant: object) -> Any:
    """The result of an ok answer; the matching exception for an error answer."""
    if answer["ok"]:
        return answer.get("result")
    error = str(answer.get("error") or "the supervisor refused the request")
    if answer.get("kind") == "NoSuchTenant":
        exc = NoSuchTenant(str(answer.get("tenant") or tenant or "?"))
        exc.args = (error,)  # keep the server's wording
        raise exc
    if answer.get("kind") == "ConfigError":  # e.g. a reload of a bad file: exit 2
        raise ConfigError(error)
    raise ControlError(error)
