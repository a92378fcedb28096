"""Control socket: server driven like the supervisor's loop, and the CLI's client.

Most tests run the server in a background thread that does what the
supervisor's loop does (`connection.wait` on `waitables()`, then
`handle_ready`); the tests about slow or silent clients drive that loop by
hand, one pass at a time, with a fake clock.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import socket
import stat
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fakes import FakeClock

from chatq.shared.errors import ConfigError, ControlError, NoSuchTenant, SupervisorNotRunning
from chatq.supervisor import control
from chatq.supervisor.control import MAX_REQUEST_BYTES, ControlServer, parse_request, peer_allowed
from chatq.supervisor.control_client import request
from chatq.supervisor.waiter import Waiter


class FakeSupervisor:
    """A dispatcher with two tenants that records what it was asked."""

    def __init__(self) -> None:
        self.tenants = {"acme": "running", "beta": "stopped"}
        self.calls: list[dict[str, Any]] = []

    def __call__(self, req: dict[str, Any]) -> Any:
        self.calls.append(req)
        cmd = req["cmd"]
        tenant = str(req.get("tenant"))
        if "tenant" in req and tenant not in self.tenants:
            raise NoSuchTenant(tenant)
        if cmd == "list":
            return [{"tenant": t, "state": s} for t, s in self.tenants.items()]
        if cmd == "status":
            return {"tenant": tenant, "state": self.tenants[tenant], "dir": Path("/x")}
        if cmd == "reload":
            raise ConfigError("tenants.toml: tenant 'acme': field 'handler'\nsecond line")
        if cmd == "shutdown":
            raise RuntimeError("a bug in the supervisor")
        return {"done": cmd}


class ServerThread:
    """Runs the supervisor's loop pass (wait + handle_ready) until stopped."""

    def __init__(self, server: ControlServer) -> None:
        self.server = server
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        waiter = Waiter()
        while not self._stop.is_set():
            server = self.server
            server.handle_ready(waiter.wait(server.waitables(), 0.02, server.writables()))

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        assert not self._thread.is_alive()


@pytest.fixture
def sock_path(tmp_path: Path) -> Path:
    return tmp_path / "ctl.sock"


@pytest.fixture
def fake() -> FakeSupervisor:
    return FakeSupervisor()


@pytest.fixture
def served(sock_path: Path, fake: FakeSupervisor) -> Iterator[Path]:
    server = ControlServer(sock_path, fake)
    loop = ServerThread(server)
    yield sock_path
    loop.stop()
    server.close()


def connect(path: Path) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(5)
    sock.connect(str(path))
    return sock


def read_answer(sock: socket.socket) -> dict[str, Any]:
    data = b""
    while not data.endswith(b"\n"):
        chunk = sock.recv(4096)
        if not chunk:
            break
        data += chunk
    assert data.count(b"\n") == 1, data
    answer: dict[str, Any] = json.loads(data)
    return answer


def exchange(path: Path, data: bytes, *, half_close: bool = False) -> dict[str, Any]:
    with connect(path) as sock:
        sock.sendall(data)
        if half_close:
            sock.shutdown(socket.SHUT_WR)
        return read_answer(sock)


def one_pass(server: ControlServer, timeout: float = 1.0) -> None:
    server.handle_ready(Waiter().wait(server.waitables(), timeout, server.writables()))


# round trips ----------------------------------------------------------------


def test_list_round_trip(served: Path, fake: FakeSupervisor) -> None:
    assert request(served, "list") == [
        {"tenant": "acme", "state": "running"},
        {"tenant": "beta", "state": "stopped"},
    ]
    assert fake.calls == [{"cmd": "list"}]


def test_status_round_trip_stringifies_paths(served: Path) -> None:
    assert request(served, "status", tenant="acme") == {
        "tenant": "acme",
        "state": "running",
        "dir": "/x",
    }


def test_none_fields_are_left_out(served: Path, fake: FakeSupervisor) -> None:
    assert request(served, "restart", tenant=None, all=True) == {"done": "restart"}
    assert fake.calls == [{"cmd": "restart", "all": True}]


def test_raw_wire_format(served: Path) -> None:
    answer = exchange(served, b'{"cmd": "stop", "tenant": "beta"}\n')
    assert answer == {"ok": True, "result": {"done": "stop"}}


def test_request_ended_by_eof_instead_of_newline(served: Path) -> None:
    answer = exchange(served, b'{"cmd": "start", "tenant": "beta"}', half_close=True)
    assert answer == {"ok": True, "result": {"done": "start"}}


def test_many_requests_in_a_row(served: Path) -> None:
    for _ in range(20):
        assert request(served, "status", tenant="beta")["state"] == "stopped"


# errors -------------------------------------------------------------------


def test_no_such_tenant_propagates(served: Path) -> None:
    with pytest.raises(NoSuchTenant) as info:
        request(served, "status", tenant="ghost")
    assert str(info.value) == "no such tenant: ghost"
    assert info.value.tenant_id == "ghost"
    answer = exchange(served, b'{"cmd": "stop", "tenant": "ghost"}\n')
    assert answer == {
        "ok": False,
        "error": "no such tenant: ghost",
        "kind": "NoSuchTenant",
        "tenant": "ghost",
    }


def test_chatq_error_becomes_a_one_line_answer(served: Path) -> None:
    answer = exchange(served, b'{"cmd": "reload"}\n')
    assert answer["kind"] == "ConfigError"
    assert answer["error"] == "tenants.toml: tenant 'acme': field 'handler' second line"
    with pytest.raises(ConfigError, match="field 'handler'"):  # the CLI exits 2 on it
        request(served, "reload")


def test_unexpected_dispatch_error_is_an_internal_error(served: Path) -> None:
    answer = exchange(served, b'{"cmd": "shutdown"}\n')
    assert answer == {
        "ok": False,
        "error": "internal error in the supervisor; see its log",
        "kind": "InternalError",
    }
    # the server survived it
    assert request(served, "list")


def test_bad_json_is_a_bad_request(served: Path, fake: FakeSupervisor) -> None:
    answer = exchange(served, b"{nope\n")
    assert answer["ok"] is False
    assert answer["kind"] == "BadRequest"
    assert answer["error"].startswith("request is not JSON")
    assert fake.calls == []


def test_unknown_command(served: Path, fake: FakeSupervisor) -> None:
    with pytest.raises(ControlError, match="unknown command 'explode'"):
        request(served, "explode")
    answer = exchange(served, b'{"cmd": "explode"}\n')
    assert answer["kind"] == "BadRequest"
    assert fake.calls == []


@pytest.mark.parametrize(
    ("fields", "needle"),
    [
        ({"tenant": 5}, "field 'tenant' must be a non-empty string"),
        ({"tenant": ""}, "field 'tenant' must be a non-empty string"),
        ({"color": "red"}, "unknown field 'color'"),
        ({"tenant": "x" * 64}, "field 'tenant': over 63 characters, no tenant id is"),
    ],
)
def test_bad_fields_are_named(served: Path, fields: dict[str, Any], needle: str) -> None:
    with pytest.raises(ControlError, match=needle):
        request(served, "status", **fields)


@pytest.mark.parametrize(
    ("body", "needle"),
    [
        ({"tenant": "acme"}, "missing field 'cmd'"),
        ({"cmd": 7}, "unknown command 7"),
        ({"cmd": "restart", "all": "yes"}, "field 'all' must be true or false"),
        ({"cmd": "status"}, "missing field 'tenant'"),
        ({"cmd": "status", "all": True, "tenant": "acme"}, "field 'all'"),
        ({"cmd": "stop", "all": True, "tenant": "acme"}, "not both"),
        ({"cmd": "start"}, "start needs a tenant or"),
        ({"cmd": "list", "tenant": "acme"}, "field 'tenant': list takes no tenant"),
        ({"cmd": "reload", "all": True}, "field 'all': reload takes no tenant"),
        ({"cmd": "restart"}, "restart needs a tenant or"),
        ({"cmd": "restart", "all": False}, "restart needs a tenant or"),
        ({"cmd": "restart", "all": True, "tenant": "acme"}, "not both"),
        ({"cmd": "logs", "all": True}, "logs takes one tenant or none"),
        ({"cmd": "logs", "after": -1}, "field 'after' must be a non-negative integer"),
        ({"cmd": "logs", "limit": True}, "field 'limit' must be a non-negative integer"),
        ({"cmd": "logs", "limit": 10_001}, "field 'limit': at most 10000"),
        ({"cmd": "list", "after": 3}, "field 'after': only logs takes it"),
    ],
)
def test_parse_request_names_what_is_wrong(body: dict[str, Any], needle: str) -> None:
    with pytest.raises(control.BadRequest) as info:
        parse_request(json.dumps(body).encode())
    assert needle in str(info.value)


def test_parse_request_accepts_each_command_shape() -> None:
    for body in [
        {"cmd": "list"},
        {"cmd": "status", "tenant": "a"},
        {"cmd": "restart", "tenant": "a"},
        {"cmd": "restart", "all": True},
        {"cmd": "restart", "tenant": "a", "all": False},
        {"cmd": "stop", "tenant": "a"},
        {"cmd": "start", "tenant": "a"},
        {"cmd": "stop", "all": True},
        {"cmd": "start", "all": True},
        {"cmd": "reload"},
        {"cmd": "logs"},
        {"cmd": "logs", "tenant": "a", "after": 7, "limit": 0},
        {"cmd": "shutdown"},
    ]:
        assert parse_request(json.dumps(body).encode()) == body


def test_parse_request_refuses_non_objects() -> None:
    with pytest.raises(control.BadRequest, match="must be a JSON object, got list"):
        parse_request(b'["list"]')


def test_oversize_request_is_refused(served: Path, fake: FakeSupervisor) -> None:
    big = json.dumps({"cmd": "status", "tenant": "x" * MAX_REQUEST_BYTES}).encode() + b"\n"
    answer = exchange(served, big)
    assert answer == {
        "ok": False,
        "error": f"request is over {MAX_REQUEST_BYTES} bytes",
        "kind": "BadRequest",
    }
    assert fake.calls == []


def test_oversize_request_without_newline_is_refused(served: Path) -> None:
    answer = exchange(served, b"x" * (MAX_REQUEST_BYTES + 2))
    assert answer["error"] == f"request is over {MAX_REQUEST_BYTES} bytes"


def test_client_reports_an_oversize_refusal(served: Path) -> None:
    with pytest.raises(ControlError, match="over 65536 bytes"):
        request(served, "status", tenant="y" * 300_000)


# the socket file ----------------------------------------------------------


def test_socket_mode_is_0600(served: Path) -> None:
    mode = served.stat().st_mode
    assert stat.S_ISSOCK(mode)
    assert stat.S_IMODE(mode) == 0o600


def test_stale_socket_file_is_replaced(sock_path: Path, fake: FakeSupervisor) -> None:
    dead = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    dead.bind(str(sock_path))
    dead.close()  # the file stays, nobody listens: a supervisor that died
    assert stat.S_ISSOCK(sock_path.lstat().st_mode)
    with ControlServer(sock_path, fake) as server:
        loop = ServerThread(server)
        try:
            assert request(sock_path, "list")
        finally:
            loop.stop()


def test_second_server_on_the_same_path_is_refused(served: Path, fake: FakeSupervisor) -> None:
    before = served.lstat().st_ino
    with pytest.raises(ControlError) as info:
        ControlServer(served, fake)
    assert str(info.value) == f"another supervisor is running on {served}"
    assert served.lstat().st_ino == before  # the first one's socket is untouched
    assert request(served, "list")


def test_regular_file_in_the_way_is_not_removed(sock_path: Path, fake: FakeSupervisor) -> None:
    sock_path.write_text("keep me")
    with pytest.raises(ControlError, match="exists and is not a socket"):
        ControlServer(sock_path, fake)
    assert sock_path.read_text() == "keep me"


def test_unbindable_path_is_a_control_error(tmp_path: Path, fake: FakeSupervisor) -> None:
    with pytest.raises(ControlError, match="cannot listen on"):
        ControlServer(tmp_path / "missing-dir" / "ctl.sock", fake)


def test_close_removes_the_socket_and_is_idempotent(sock_path: Path, fake: FakeSupervisor) -> None:
    server = ControlServer(sock_path, fake)
    server.close()
    assert not sock_path.exists()
    assert server.waitables() == []
    server.close()


def test_close_leaves_a_socket_that_is_not_ours(sock_path: Path, fake: FakeSupervisor) -> None:
    server = ControlServer(sock_path, fake)
    sock_path.unlink()
    other = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    other.bind(str(sock_path))
    try:
        server.close()
        assert sock_path.exists()
    finally:
        other.close()


# the client without a server ------------------------------------------------


def test_client_to_missing_socket(sock_path: Path) -> None:
    with pytest.raises(SupervisorNotRunning) as info:
        request(sock_path, "list")
    assert str(info.value) == f"supervisor is not running (no socket at {sock_path})"


def test_client_to_stale_socket(sock_path: Path) -> None:
    dead = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    dead.bind(str(sock_path))
    dead.close()
    with pytest.raises(SupervisorNotRunning, match="supervisor is not running"):
        request(sock_path, "list")


def test_client_times_out_on_a_silent_server(sock_path: Path) -> None:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as mute:
        mute.bind(str(sock_path))
        mute.listen(1)  # accepts into the backlog, never answers
        with pytest.raises(ControlError, match="no answer from the supervisor"):
            request(sock_path, "list", timeout=0.2)


def test_client_refuses_a_bad_timeout(sock_path: Path) -> None:
    with pytest.raises(ValueError, match="timeout"):
        request(sock_path, "list", timeout=0)


# one loop pass at a time ----------------------------------------------------


def test_silent_client_does_not_hold_up_others(sock_path: Path, fake: FakeSupervisor) -> None:
    clock = FakeClock()
    with ControlServer(sock_path, fake, clock=clock) as server, connect(sock_path) as silent:
        one_pass(server)  # accepts the silent client; nothing to read, no blocking
        assert len(server.waitables()) == 2
        assert server.due_in() == 5.0
        with connect(sock_path) as chatty:
            chatty.sendall(b'{"cmd": "list"}\n')
            one_pass(server)
            assert read_answer(chatty)["ok"] is True
        assert len(server.waitables()) == 2  # the silent one is still waiting
        silent.sendall(b'{"cmd": "st')
        one_pass(server)
        assert server.due_in() == 5.0
        silent.sendall(b'atus", "tenant": "acme"}\n')
        one_pass(server)
        assert read_answer(silent)["result"]["state"] == "running"
        assert server.waitables() == [server.waitables()[0]]
        assert server.due_in() is None


def test_slow_client_is_timed_out(sock_path: Path, fake: FakeSupervisor) -> None:
    clock = FakeClock()
    with ControlServer(sock_path, fake, clock=clock) as server, connect(sock_path) as slow:
        slow.sendall(b'{"cmd": "li')
        one_pass(server)
        clock.now += 4.9
        server.handle_ready([])
        assert len(server.waitables()) == 2
        clock.now += 0.1
        server.handle_ready([])  # a pass with nothing ready still times clients out
        assert len(server.waitables()) == 1
        answer = read_answer(slow)
        assert answer == {
            "ok": False,
            "error": "no complete request line within 5 s",
            "kind": "Timeout",
        }
    assert fake.calls == []


class BigAnswers(FakeSupervisor):
    def __call__(self, req: dict[str, Any]) -> Any:
        return {"log": ["x" * 1000] * 4000}  # ~4 MB: more than a socket buffer holds


def test_a_client_that_does_not_read_its_answer_never_blocks_the_loop(sock_path: Path) -> None:
    clock = FakeClock()
    with (
        ControlServer(sock_path, BigAnswers(), clock=clock) as server,
        connect(sock_path) as stalled,
        connect(sock_path) as reader,
    ):
        stalled.sendall(b'{"cmd": "status", "tenant": "acme"}\n')
        reader.sendall(b'{"cmd": "status", "tenant": "acme"}\n')
        began = time.monotonic()
        one_pass(server, timeout=0)  # both answered as far as their sockets take
        assert time.monotonic() - began < 0.5  # a blocking send would wait for the client
        assert len(server.writables()) == 2

        received = bytearray()
        reader.setblocking(False)
        while not received.endswith(b"\n"):  # the loop keeps serving it as it reads
            one_pass(server, timeout=0.1)
            with contextlib.suppress(BlockingIOError):
                received += reader.recv(1 << 20)
        assert len(json.loads(received)["result"]["log"]) == 4000
        assert server.writables() == [server.writables()[0]]  # the stalled one is left

        assert server.due_in() == pytest.approx(control.WRITE_TIMEOUT)
        clock.now += control.WRITE_TIMEOUT
        server.handle_ready([])
        assert server.writables() == []  # dropped
        assert server.due_in() is None


def test_hang_up_without_a_request_is_dropped(sock_path: Path, fake: FakeSupervisor) -> None:
    with ControlServer(sock_path, fake) as server:
        connect(sock_path).close()
        one_pass(server)
        assert len(server.waitables()) == 1
    assert fake.calls == []


def test_handle_ready_ignores_objects_that_are_not_its_own(
    sock_path: Path, fake: FakeSupervisor
) -> None:
    with ControlServer(sock_path, fake) as server:
        server.handle_ready([object(), 12, "x"])
        assert len(server.waitables()) == 1


def test_too_many_clients_are_told_to_retry(
    sock_path: Path, fake: FakeSupervisor, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(control, "MAX_CLIENTS", 1)
    with ControlServer(sock_path, fake) as server, connect(sock_path) as first:
        one_pass(server)
        with connect(sock_path) as second:
            second.sendall(b'{"cmd": "list"}\n')
            one_pass(server)
            assert read_answer(second)["kind"] == "Busy"
        first.sendall(b'{"cmd": "list"}\n')
        one_pass(server)
        assert read_answer(first)["ok"] is True


def test_peer_of_another_uid_is_refused(
    sock_path: Path, fake: FakeSupervisor, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(control, "_peer_uid", lambda sock: 4242)
    with ControlServer(sock_path, fake) as server, connect(sock_path) as peer:
        peer.sendall(b'{"cmd": "list"}\n')
        one_pass(server)
        answer = read_answer(peer)
    assert answer["kind"] == "PermissionDenied"
    assert "uid 4242" in answer["error"]
    assert fake.calls == []


def test_peer_rule() -> None:
    assert peer_allowed(1000, 1000)
    assert peer_allowed(0, 1000)  # root may always ask
    assert not peer_allowed(1001, 1000)
    assert peer_allowed(0, 0)
    assert not peer_allowed(1000, 0)


def test_answers_carry_any_text_as_json_escapes_or_utf8() -> None:
    """Answers are encoded by orjson (faster for a large `list`): text outside ASCII,
    control characters and even a lone surrogate (orjson refuses it) arrive unchanged."""
    texts = ["plain", "é 日本 😀", "lone \udc80 surrogate", 'ctrl \x01\n"q" \\']
    data = control._encode_answer({"ok": True, "result": texts})
    assert data.endswith(b"\n") and b"\n" not in data[:-1]
    assert json.loads(data) == {"ok": True, "result": texts}


def test_the_client_reads_any_text_an_answer_carries(sock_path: Path) -> None:
    """The client parses with orjson, which refuses a lone surrogate: json reads those."""
    texts = ["plain", "é 日本 😀", "lone \udc80 surrogate", 'ctrl \x01\n"q" \\']
    server = ControlServer(sock_path, lambda _request: texts)
    loop = ServerThread(server)
    try:
        assert request(sock_path, "list") == texts
    finally:
        loop.stop()
        server.close()


def test_paths_and_datetimes_in_an_answer_read_as_strings() -> None:
    when = datetime.datetime(2026, 11, 30, 7, 58)
    data = control._encode_answer({"ok": True, "result": {"path": Path("/x/y"), "at": when}})
    assert json.loads(data)["result"] == {"path": "/x/y", "at": "2026-11-30 07:58:00"}
