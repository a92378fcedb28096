"""The supervisor's control socket: the ops CLI's way in.

Wire protocol, one exchange per connection: the client sends one JSON object
on one newline-terminated line (at most `MAX_REQUEST_BYTES`), the server
answers one line and closes.

    request   {"cmd": "list"|"status"|"restart"|"stop"|"start"|"reload"|"logs"|"shutdown",
               "tenant"?: str, "all"?: bool, "after"?: int, "limit"?: int}
    answer    {"ok": true, "result": ...}
              {"ok": false, "error": "one line", "kind": "NoSuchTenant"|"BadRequest"|...}

`status` needs `tenant`; `restart`, `stop` and `start` need `tenant` or
``"all": true`` (not both); `logs` takes an optional `tenant` and the
non-negative integers `after` and `limit` (at most `MAX_LOG_LINES`); the
others take none of these. A request that breaks
these rules never reaches the dispatcher: it is answered with kind
``BadRequest`` naming the field. An error the dispatcher raises as a
`ChatqError` is answered with its message and class name (a `NoSuchTenant`
answer also carries ``"tenant"``); anything else is logged and answered as
``InternalError``. Other kinds the server itself sends: ``PermissionDenied``
(peer of another uid, unless root), ``Busy`` (too many clients at once),
``Timeout`` (no complete request within the read timeout).

The server never blocks the supervisor's loop on a client: the listening
socket and every half-read client are non-blocking and handed to the loop
through `waitables()`; `handle_ready()` reads only what is there. An answer
is sent without blocking too: what the client's socket cannot take at once
waits in `writables()` for the loop to see it writable, and a client that
does not read it within `WRITE_TIMEOUT` is dropped.

The socket is mode 0600 and every peer's uid is checked (SO_PEERCRED), which
also covers the moment between bind and chmod.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import stat
import struct
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any

import orjson
from loguru import logger

from chatq.shared.errors import ChatqError, ControlError, NoSuchTenant

__all__ = [
    "COMMANDS",
    "MAX_REQUEST_BYTES",
    "BadRequest",
    "ControlServer",
    "Dispatch",
    "parse_request",
]

MAX_REQUEST_BYTES = 64 * 1024
READ_TIMEOUT = 5.0  # seconds a client has to send its whole request
MAX_TENANT_CHARS = 63  # config.settings.TENANT_ID_PATTERN's longest id
WRITE_TIMEOUT = 5.0  # seconds a client has to read its whole answer
MAX_CLIENTS = 32  # half-read clients held at once; more are told to retry
_ACCEPTS_PER_PASS = 16  # bound the work of one loop pass
_BACKLOG = 16
_CHUNK = 16 * 1024
# As json.dumps(default=str) did: datetimes and dataclasses through `default`,
# non-string keys as strings. (NaN, which json refused, is written as null.)
_ORJSON_OPTIONS = (
    orjson.OPT_NON_STR_KEYS
    | orjson.OPT_PASSTHROUGH_DATETIME
    | orjson.OPT_PASSTHROUGH_DATACLASS
    | orjson.OPT_PASSTHROUGH_SUBCLASS
)

# How each command uses "tenant": "none", "one" (required), or "one_or_all".
_TARGETS = {
    "list": "none",
    "status": "one",
    "restart": "one_or_all",
    "stop": "one_or_all",
    "start": "one_or_all",
    "reload": "none",
    "logs": "zero_or_one",
    "shutdown": "none",
}
COMMANDS = frozenset(_TARGETS)
_FIELDS = frozenset({"cmd", "tenant", "all", "force", "after", "limit"})
_LOG_FIELDS = ("after", "limit")  # only `logs` takes them
MAX_LOG_LINES = 10_000

Dispatch = Callable[[dict[str, Any]], Any]
"""Serves a valid request; returns the JSON-able result or raises a ChatqError."""


class BadRequest(ControlError):
    """A control request is not JSON, or names a bad command or field."""


def parse_request(line: bytes) -> dict[str, Any]:
    """The request on `line`, checked; BadRequest naming what is wrong."""
    try:
        request = json.loads(line)
    except (ValueError, RecursionError) as exc:
        raise BadRequest(f"request is not JSON: {exc}") from None
    if not isinstance(request, dict):
        raise BadRequest(f"request must be a JSON object, got {type(request).__name__}")
    _check_fields(request)
    _check_target(request)
    return request


def _check_fields(request: dict[str, Any]) -> None:
    unknown = sorted(set(request) - _FIELDS)
    if unknown:
        raise BadRequest(f"unknown field {unknown[0]!r:.80}")
    if "cmd" not in request:
        raise BadRequest("missing field 'cmd'")
    cmd = request["cmd"]
    if not isinstance(cmd, str) or cmd not in COMMANDS:
        raise BadRequest(f"field 'cmd': unknown command {cmd!r:.80}; one of {', '.join(_TARGETS)}")
    if "tenant" in request and not (isinstance(request["tenant"], str) and request["tenant"]):
        raise BadRequest(
            f"field 'tenant' must be a non-empty string, got {request['tenant']!r:.80}"
        )
    if len(request.get("tenant", "")) > MAX_TENANT_CHARS:  # answers echo it: keep them small
        raise BadRequest(f"field 'tenant': over {MAX_TENANT_CHARS} characters, no tenant id is")
    for flag in ("all", "force"):
        if flag in request and not isinstance(request[flag], bool):
            raise BadRequest(f"field {flag!r} must be true or false, got {request[flag]!r:.80}")
    for name in _LOG_FIELDS:
        if name in request:
            _check_count(request, name)


def _check_count(request: dict[str, Any], name: str) -> None:
    value = request[name]
    if request["cmd"] != "logs":
        raise BadRequest(f"field {name!r}: only logs takes it")
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise BadRequest(f"field {name!r} must be a non-negative integer, got {value!r:.80}")
    if name == "limit" and value > MAX_LOG_LINES:
        raise BadRequest(f"field 'limit': at most {MAX_LOG_LINES}, got {value}")


def _check_target(request: dict[str, Any]) -> None:
    cmd = request["cmd"]
    target = _TARGETS[cmd]
    has_tenant = "tenant" in request
    if target == "none" and (has_tenant or "all" in request):
        field_name = "tenant" if has_tenant else "all"
        raise BadRequest(f"field {field_name!r}: {cmd} takes no tenant")
    if target == "zero_or_one" and "all" in request:
        raise BadRequest(f"field 'all': {cmd} takes one tenant or none")
    if target == "one" and "all" in request:
        raise BadRequest(f"field 'all': {cmd} takes one tenant")
    if target == "one" and not has_tenant:
        raise BadRequest(f"missing field 'tenant': {cmd} needs a tenant")
    if target == "one_or_all" and has_tenant == (request.get("all") is True):
        raise BadRequest(f"field 'tenant': {cmd} needs a tenant or \"all\": true, not both")


def describe_request(request: dict[str, Any]) -> str:
    """'restart tenant=acme' for a log line (not a dict's repr)."""
    fields = " ".join(
        f"{key}={json.dumps(value)}" for key, value in request.items() if key != "cmd"
    )
    return f"{request['cmd']} {fields}".rstrip()


def peer_allowed(peer_uid: int, own_uid: int) -> bool:
    """Whether a peer of `peer_uid` may use the socket of a server running as `own_uid`."""
    return peer_uid in (own_uid, 0)


@dataclass
class _Client:
    """A connection whose request line is not complete yet."""

    sock: socket.socket
    fd: int
    deadline: float
    buffer: bytearray = field(default_factory=bytearray)


@dataclass
class _Outgoing:
    """An answer the client's socket could not take at once."""

    sock: socket.socket
    data: memoryview
    deadline: float


class ControlServer:
    """Listens on a unix socket and answers control requests through `dispatch`.

    Binding happens in the constructor (ControlError if it cannot, e.g.
    another supervisor answers on `path`). On every pass of the supervisor's
    loop: put `waitables()` (it changes) into the `connection.wait` list, bound
    the wait by `due_in()`, then call `handle_ready(ready)` with what the wait
    returned, even when that is empty, so slow clients are timed out.
    """

    def __init__(
        self,
        path: Path,
        dispatch: Dispatch,
        *,
        read_timeout: float = READ_TIMEOUT,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._path = path
        self._dispatch = dispatch
        self._read_timeout = read_timeout
        self._clock = clock
        self._clients: dict[int, _Client] = {}
        self._outgoing: dict[int, _Outgoing] = {}
        self._listener = _bind(path)
        info = path.stat()
        self._identity = (info.st_dev, info.st_ino)

    @property
    def path(self) -> Path:
        """Where the socket is."""
        return self._path

    def waitables(self) -> list[socket.socket]:
        """The sockets to wait on for readability: the listener and half-read clients."""
        if self._listener.fileno() < 0:
            return []
        return [self._listener, *(client.sock for client in self._clients.values())]

    def writables(self) -> list[socket.socket]:
        """The sockets to wait on for writability: answers not fully sent."""
        return [out.sock for out in self._outgoing.values()]

    def due_in(self) -> float | None:
        """Seconds until a slow client times out (None if there is none)."""
        deadlines = [c.deadline for c in self._clients.values()]
        deadlines += [out.deadline for out in self._outgoing.values()]
        if not deadlines:
            return None
        return max(0.0, min(deadlines) - self._clock())

    def handle_ready(self, ready: Iterable[object]) -> None:
        """Serve whatever of ours is in `ready` without blocking; time out slow clients."""
        ready_ids = {id(obj) for obj in ready}
        for client in list(self._clients.values()):
            if id(client.sock) in ready_ids:
                self._read(client)
        if id(self._listener) in ready_ids:
            self._accept_all()
        for fd, out in list(self._outgoing.items()):
            if id(out.sock) in ready_ids:
                self._flush(fd, out)
        self._expire()

    def close(self) -> None:
        """Close every connection and remove the socket file, if it is still ours."""
        for client in list(self._clients.values()):
            self._drop(client)
        for out in self._outgoing.values():
            out.sock.close()
        self._outgoing.clear()
        if self._listener.fileno() < 0:
            return
        self._listener.close()
        with contextlib.suppress(OSError):
            info = self._path.lstat()
            if (info.st_dev, info.st_ino) == self._identity:
                self._path.unlink()

    def __enter__(self) -> ControlServer:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def _accept_all(self) -> None:
        for _ in range(_ACCEPTS_PER_PASS):
            try:
                sock, _ = self._listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:  # e.g. out of file descriptors: try again next pass
                logger.warning("control socket: accept failed: {}", exc)
                return
            self._admit(sock)

    def _admit(self, sock: socket.socket) -> None:
        sock.setblocking(False)
        try:
            uid = _peer_uid(sock)
        except OSError:  # gone already
            sock.close()
            return
        if not peer_allowed(uid, os.getuid()):
            logger.warning("control socket: refused a peer of uid {}", uid)
            self._answer(sock, _refusal("PermissionDenied", f"uid {uid} may not use this socket"))
        elif len(self._clients) + len(self._outgoing) >= MAX_CLIENTS:
            self._answer(sock, _refusal("Busy", "too many control clients at once; try again"))
        else:
            client = _Client(sock, sock.fileno(), self._clock() + self._read_timeout)
            self._clients[client.fd] = client
            self._read(client)  # the request is usually there already

    def _read(self, client: _Client) -> None:
        """Read what is available; once the request line is complete, answer it."""
        try:
            eof = _read_available(client.sock, client.buffer)
        except OSError:
            self._drop(client)
            return
        line, complete = _request_line(client.buffer, eof)
        if len(line) > MAX_REQUEST_BYTES:
            message = f"request is over {MAX_REQUEST_BYTES} bytes"
            self._reply(client, _refusal("BadRequest", message))
        elif complete:
            self._reply(client, self._serve(line))
        elif eof:
            self._drop(client)  # hung up without asking anything

    def _serve(self, line: bytes) -> dict[str, Any]:
        try:
            request = parse_request(line)
            logger.debug("control socket: {}", describe_request(request))
            return {"ok": True, "result": self._dispatch(request)}
        except ChatqError as exc:
            return _error_answer(exc)
        except Exception:
            logger.exception("control socket: serving {!r:.200} failed", line)
            return _refusal("InternalError", "internal error in the supervisor; see its log")

    def _expire(self) -> None:
        now = self._clock()
        for client in list(self._clients.values()):
            if client.deadline <= now:
                message = f"no complete request line within {self._read_timeout:g} s"
                self._reply(client, _refusal("Timeout", message))
        for fd, out in list(self._outgoing.items()):
            if out.deadline <= now:
                logger.warning("control socket: a client did not read its answer; dropped")
                del self._outgoing[fd]
                out.sock.close()

    def _reply(self, client: _Client, answer: dict[str, Any]) -> None:
        del self._clients[client.fd]
        self._answer(client.sock, answer)

    def _answer(self, sock: socket.socket, answer: dict[str, Any]) -> None:
        """Send one answer line and close; what does not fit now is sent as it drains."""
        out = _Outgoing(sock, memoryview(_encode_answer(answer)), self._clock() + WRITE_TIMEOUT)
        self._flush(sock.fileno(), out)

    def _flush(self, fd: int, out: _Outgoing) -> None:
        try:
            sent = out.sock.send(out.data)
        except (BlockingIOError, InterruptedError):
            sent = 0
        except OSError as exc:  # the client is gone
            logger.debug("control socket: could not answer a client: {}", exc)
            self._outgoing.pop(fd, None)
            out.sock.close()
            return
        out.data = out.data[sent:]
        if out.data:
            self._outgoing[fd] = out
        else:
            self._outgoing.pop(fd, None)
            out.sock.close()

    def _drop(self, client: _Client) -> None:
        del self._clients[client.fd]
        client.sock.close()


def _bind(path: Path) -> socket.socket:
    """A non-blocking listening socket at `path`, mode 0600."""
    _clear_stale(path)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.bind(str(path))
    except OSError as exc:
        sock.close()
        raise ControlError(f"cannot listen on {path}: {exc.strerror or exc}") from None
    try:
        os.chmod(path, 0o600)
        sock.listen(_BACKLOG)
        sock.setblocking(False)
    except OSError as exc:
        sock.close()
        path.unlink(missing_ok=True)
        raise ControlError(f"cannot listen on {path}: {exc.strerror or exc}") from None
    return sock


def _clear_stale(path: Path) -> None:
    """Remove a socket file left by a supervisor that died; refuse a live one."""
    try:
        mode = path.lstat().st_mode
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(mode):
        raise ControlError(f"{path} exists and is not a socket; refusing to replace it")
    if _answers(path):
        raise ControlError(f"another supervisor is running on {path}")
    path.unlink(missing_ok=True)


def _answers(path: Path) -> bool:
    """Whether something accepts connections on the socket at `path`."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        probe.settimeout(1.0)
        try:
            probe.connect(str(path))
        except (ConnectionRefusedError, FileNotFoundError):
            return False
        except OSError:  # a full backlog or no permission: someone is there
            return True
        return True


def _peer_uid(sock: socket.socket) -> int:
    creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    _pid, uid, _gid = struct.unpack("3i", creds)
    return int(uid)


def _read_available(sock: socket.socket, buffer: bytearray) -> bool:
    """Append what `sock` has to `buffer`, stopping at a newline or the size cap; True on EOF."""
    while b"\n" not in buffer and len(buffer) <= MAX_REQUEST_BYTES:
        try:
            chunk = sock.recv(_CHUNK)
        except (BlockingIOError, InterruptedError):
            return False
        if not chunk:
            return True
        buffer += chunk
    return False


def _request_line(buffer: bytearray, eof: bool) -> tuple[bytes, bool]:
    """The request line so far and whether it is complete (newline, or EOF after data)."""
    end = buffer.find(b"\n")
    if end >= 0:
        return bytes(buffer[:end]), True
    return bytes(buffer), eof and bool(buffer)


def _refusal(kind: str, message: str) -> dict[str, Any]:
    return {"ok": False, "error": message, "kind": kind}


def _error_answer(exc: ChatqError) -> dict[str, Any]:
    message = str(exc).replace("\r", " ").replace("\n", " ") or type(exc).__name__
    answer = _refusal(type(exc).__name__, message)
    if isinstance(exc, NoSuchTenant):
        answer["tenant"] = exc.tenant_id
    return answer


def _encode_answer(answer: dict[str, Any]) -> bytes:
    """The answer line. orjson first: `list` of 2,000 tenants is ~1 MB of JSON, 25 ms
    with json and 4.5 with orjson, asked every 100 ms by a watcher while the loop also
    starts the fleet; json for what orjson refuses (a lone surrogate: escaped)."""
    try:
        # default=str: paths and datetimes in a result read fine as strings.
        return orjson.dumps(answer, default=str, option=_ORJSON_OPTIONS) + b"\n"
    except orjson.JSONEncodeError:
        pass
    try:
        text = json.dumps(answer, default=str, allow_nan=False)
    except (TypeError, ValueError) as exc:
        logger.error("control socket: answer is not JSON-able: {}", exc)
        text = json.dumps(_refusal("InternalError", "internal error in the supervisor"))
    return text.encode() + b"\n"
