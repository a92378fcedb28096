"""The ``chatq`` command line.

argparse, from the standard library: the CLI is a thin client of the control
socket, and keeping it dependency-free keeps ``chatq list`` fast to start
(click or typer would add import time to every call for no feature we need).

    chatq run [--config PATH]                  the supervisor, in the foreground
    chatq list [--json]                        one line per tenant
    chatq status TENANT [--json]               one tenant in detail, with its log tail
    chatq logs [TENANT] [-n N] [-f] [--json]   recent log lines (all, or one source); -f follows
    chatq restart TENANT | --all [WAIT]        graceful restart (revives a fatal tenant)
    chatq stop TENANT | --all [WAIT]           drain and stop (a stopped one: a note, exit 0)
    chatq start TENANT | --all [WAIT]          start stopped or fatal tenants
    chatq reload [--force] [--json] [WAIT]     re-read the config file (also: SIGHUP)
    chatq send TENANT CHAT_ID TEXT [--id ID] [--json]
    chatq history TENANT [--chat CHAT_ID] [--limit N] [--json]
    chatq retry TENANT (--message ID... | --failed [--chat C]) [--json]   failed messages again
    chatq resend TENANT (--reply ID... | --failed [--chat C]) [--json]    failed replies again

WAIT is ``--wait`` (the default: until every tenant touched reaches its
state), ``--no-wait`` (return once the supervisor is told) and ``--timeout
SECONDS`` (60). ``restart --all`` leaves tenants an operator stopped alone.

Exit codes: 0 done; 1 the operation failed (supervisor not running, no such
tenant, a tenant did not reach its state in time); 2 usage or configuration
error. Errors are one line on stderr.

Speed: the control commands need only the control socket's path, so they read
just ``[supervisor] run_dir`` from the TOML file with tomllib (`run_dir`)
instead of importing pydantic for the full validation, which would cost more
than everything else a ``chatq list`` does. Whenever that short read finds
anything unexpected, the full loader runs and reports the problem in its
usual one line. ``reload``, ``history`` and ``run`` always load the file fully.
"""

from __future__ import annotations

import argparse
import difflib
import json
import os
import re
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NoReturn

from chatq.shared.errors import ChatqError, ConfigError, NoSuchTenant, SupervisorNotRunning
from chatq.supervisor import render, settle
from chatq.supervisor.control_client import request

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2

# Copies of config.DEFAULT_CONFIG_PATH and config.settings.TENANT_ID_PATTERN:
# importing `config` pulls in pydantic (see "Speed" above). Tests keep them equal.
DEFAULT_CONFIG_PATH = Path("config") / "tenants.toml"
TENANT_ID = re.compile(r"^[a-z0-9][a-z0-9_-]{0,62}$")
CONTROL_SOCKET_NAME = "supervisor.sock"
SEND_TIMEOUT = 30.0  # seconds; the worker answers once the row is committed
WAIT_TIMEOUT = 60.0  # seconds restart/stop/start/reload wait by default
FOLLOW_POLL = 0.2  # seconds between two asks of `chatq logs -f`
MAX_LOG_LINES = 10_000  # control.MAX_LOG_LINES: the most one `logs` answer holds
LOG_LINES = 20  # `chatq logs` without -n
MAX_SHOWN = 10  # tenant ids listed in a "no such tenant" error

Runner = Callable[[argparse.Namespace], int]


class CommandFailed(ChatqError):
    """The operation could not be done (exit 1)."""


class UsageError(ChatqError):
    """What the user asked for is invalid (exit 2), e.g. a message ingest refused."""


# -- where things are ------------------------------------------------------------


def config_file(given: Path | None) -> Path:
    """The config file as `config.load_config` picks it: given, $CHATQ_CONFIG, .env, default."""
    if given is not None:
        return given
    chosen = os.environ.get("CHATQ_CONFIG") or _dotenv_config()
    return Path(chosen) if chosen else DEFAULT_CONFIG_PATH


def _dotenv_config() -> str | None:
    """CHATQ_CONFIG from ./.env, parsed as config.loader parses it (python-dotenv)."""
    if not Path(".env").is_file():
        return None
    from dotenv import dotenv_values

    return dotenv_values(".env").get("CHATQ_CONFIG") or None


def run_dir(given: Path | None) -> Path:
    """The supervisor's run_dir, read without the full validation (see "Speed")."""
    found = _read_run_dir(config_file(given))
    if found is not None:
        return found
    from chatq.config import load_config

    # The problem, as one ConfigError line (no secret is needed to find run_dir).
    return load_config(given, secrets=False).supervisor.run_dir


def _read_run_dir(file: Path) -> Path | None:
    """``[supervisor] run_dir`` made absolute as the loader does; None if anything is odd."""
    import tomllib

    path = Path(os.path.normpath(file.expanduser().absolute()))
    try:
        document = tomllib.loads(path.read_bytes().decode("utf-8"))
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError):
        return None
    table = document.get("supervisor", {})
    value = table.get("run_dir", "run") if isinstance(table, dict) else None
    if not isinstance(value, str) or not value:
        return None
    return Path(os.path.normpath(path.parent / Path(value).expanduser()))


def known_tenants(given: Path | None) -> list[str]:
    """The tenant ids the config file lists (a quick read; [] if it cannot be read)."""
    import tomllib

    try:
        document = tomllib.loads(config_file(given).read_bytes().decode("utf-8"))
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError):
        return []
    entries = document.get("tenants", [])
    if not isinstance(entries, list):
        return []
    return [e["id"] for e in entries if isinstance(e, dict) and isinstance(e.get("id"), str)]


def no_such_tenant_text(tenant_id: str, known: Sequence[str]) -> str:
    """'no such tenant: acmee (did you mean acme?)', or the known ids when none is close."""
    if not known:
        return f"no such tenant: {tenant_id}"
    close = difflib.get_close_matches(tenant_id, known, n=1)
    if close:
        return f"no such tenant: {tenant_id} (did you mean {close[0]}?)"
    shown = ", ".join(sorted(known)[:MAX_SHOWN]) + (", ..." if len(known) > MAX_SHOWN else "")
    return f"no such tenant: {tenant_id} (known: {shown})"


def control_socket(given: Path | None) -> Path:
    return run_dir(given) / CONTROL_SOCKET_NAME


def tenant_socket(folder: Path, tenant_id: str) -> Path:
    """A tenant's ingest socket in `folder` (the run_dir); NoSuchTenant for a malformed id."""
    if not TENANT_ID.fullmatch(tenant_id):
        raise NoSuchTenant(tenant_id)
    return folder / f"{tenant_id}.sock"


def _ask(args: argparse.Namespace, cmd: str, **fields: Any) -> Any:
    """One control request to the supervisor the config names."""
    return request(control_socket(args.config), cmd, **fields)


def _print_json(value: Any) -> None:
    print(json.dumps(value, indent=2, ensure_ascii=False))


# -- commands --------------------------------------------------------------------


def cmd_run(args: argparse.Namespace) -> int:
    """Run the supervisor in the foreground until SIGTERM/SIGINT."""
    from chatq.config import load_config
    from chatq.shared.files import PRIVATE_UMASK, make_private_folder
    from chatq.supervisor.limits import raise_open_files
    from chatq.supervisor.run_lock import hold_run_dir
    from chatq.supervisor.spawn import ready_flag, start_fork_server

    config = load_config(args.config)
    settings = config.supervisor
    os.umask(PRIVATE_UMASK)  # stores, logs, locks: 0600; inherited by every worker
    raise_open_files(len(config.tenants))  # workers and the fork server inherit it
    make_private_folder(settings.run_dir, "run_dir")
    make_private_folder(settings.data_dir, "data_dir")
    hold_run_dir(settings.run_dir)  # held until this process exits
    # It preloads while we import the rest, and sets up the children's logging once.
    start_fork_server(ready_flag(settings.run_dir), (settings.log_level, settings.log_format))

    from chatq.shared.log import setup_logging
    from chatq.supervisor.logstream import LogStream
    from chatq.supervisor.supervisor import Supervisor

    stream = LogStream(settings.log_file)
    setup_logging(
        settings.log_level, settings.log_format, tenant_id="supervisor", sink=stream.write_line
    )
    try:
        return Supervisor(config, lambda: load_config(args.config), stream).run()
    finally:
        stream.close()


def cmd_list(args: argparse.Namespace) -> int:
    """``chatq list``: every tenant's state and counters."""
    rows = _ask(args, "list")
    if args.json:
        _print_json(rows)
    else:
        import shutil

        width = shutil.get_terminal_size().columns  # $COLUMNS, the terminal, else 80
        print(render.tenant_table(rows, render.use_colour(sys.stdout), width))
    return EXIT_OK


def cmd_status(args: argparse.Namespace) -> int:
    """``chatq status TENANT``: one tenant in detail."""
    details = _ask(args, "status", tenant=args.tenant)
    if args.json:
        _print_json(details)
    else:
        print(render.status_block(details, render.use_colour(sys.stdout)))
    return EXIT_OK


def cmd_restart(args: argparse.Namespace) -> int:
    """``chatq restart TENANT|--all``: drain and start again; waits until running."""
    result = _ask(args, "restart", tenant=args.tenant, all=_all(args))
    names = result["restarting"]
    print(f"restarting {', '.join(names) or '(no tenants)'}")
    for name in result.get("skipped") or []:
        print(f"note: {name} is stopped, not restarted (`chatq start {name}` starts it)")
    return _wait(args, "restart", dict.fromkeys(names, settle.RUNNING), lambda: _ask(args, "list"))


def cmd_stop(args: argparse.Namespace) -> int:
    """``chatq stop TENANT|--all``: drain and stop; it stays stopped until started."""
    return _switch(args, "stop", "stopping", "already_stopped", settle.STOPPED)


def cmd_start(args: argparse.Namespace) -> int:
    """``chatq start TENANT|--all``: start stopped or fatal tenants; waits until running."""
    return _switch(args, "start", "starting", "already_running", settle.RUNNING)


def _switch(args: argparse.Namespace, cmd: str, doing: str, already: str, goal: str) -> int:
    """Stop or start: say what changes and what already was so, then wait for it."""
    result = _ask(args, cmd, tenant=args.tenant, all=_all(args))
    names = result[doing]
    if names:
        print(f"{doing} {', '.join(names)}")
    for name in result[already]:
        print(f"note: {name} is {already.replace('_', ' ')}")
    return _wait(args, cmd, dict.fromkeys(names, goal), lambda: _ask(args, "list"))


def cmd_reload(args: argparse.Namespace) -> int:
    """``chatq reload``: check the file here (exit 2 if bad), then have the supervisor apply it.

    Then waits until every added or changed tenant is running or stopped (as
    its config and operator want) and every removed one has exited.

    Secrets are resolved by the supervisor, in its own environment: this
    shell may lack the service's variables.
    """
    from chatq.config import load_config
    from chatq.supervisor.leftovers import describe

    config = load_config(args.config, secrets=False)
    try:
        result = request(config.control_socket, "reload", force=args.force or None)
    except SupervisorNotRunning as exc:  # the file may name a new run_dir
        raise SupervisorNotRunning(f"{exc} (a run_dir change needs a supervisor restart)") from None
    if args.json:
        _print_json(result)
    else:
        for kind in ("added", "removed", "changed", "unchanged"):
            print(f"{kind + ':':<10} {', '.join(result.get(kind) or []) or '-'}")
        if result.get("left_behind"):
            left = describe(result["left_behind"])
            print(f"left behind (unfinished, read with chatq history): {left}")
    goals = {name: settle.SETTLED for kind in ("added", "changed") for name in result.get(kind, [])}
    goals.update(dict.fromkeys(result.get("removed", []), settle.GONE))
    return _wait(
        args, "reload", goals, lambda: request(config.control_socket, "list"), quiet=args.json
    )


def _all(args: argparse.Namespace) -> bool | None:
    return True if args.all else None


def _wait(
    args: argparse.Namespace,
    verb: str,
    goals: dict[str, str],
    rows: settle.Rows,
    *,
    quiet: bool = False,
) -> int:
    """Unless --no-wait: wait until `goals` are met (exit 0) or --timeout passes (exit 1)."""
    if args.no_wait or not goals:
        return EXIT_OK
    late = settle.wait_for_states(goals, rows, args.timeout)
    if late:
        raise CommandFailed(
            f"{verb}: not every tenant got there within {args.timeout:g}s:"
            f" {settle.describe_late(goals, late)}"
        )
    if not quiet:
        reached = dict(goals)
        if settle.SETTLED in reached.values():  # say which of the two it became
            now = {str(row.get("tenant")): str(row.get("state")) for row in rows()}
            reached = {
                t: now.get(t, goal) if goal == settle.SETTLED else goal for t, goal in goals.items()
            }
        print(f"done: {', '.join(f'{name} {state}' for name, state in reached.items())}")
    return EXIT_OK


def cmd_logs(args: argparse.Namespace) -> int:
    """``chatq logs [TENANT] [-n N] [-f]``: the last lines the supervisor holds; -f follows.

    ``-f`` asks the supervisor every FOLLOW_POLL s for what came after the
    last line shown, until Ctrl-C (exit 0) or the supervisor goes away (exit 1).
    """
    show = print if args.json else lambda line: print(render.log_line(line))
    page = _ask(args, "logs", tenant=args.tenant, limit=args.lines)
    try:
        while True:
            for line in page["lines"]:
                show(line)
            if not args.follow:
                return EXIT_OK
            sys.stdout.flush()
            time.sleep(FOLLOW_POLL)
            page = _ask(args, "logs", tenant=args.tenant, after=page["next"], limit=MAX_LOG_LINES)
    except KeyboardInterrupt:  # the way out of -f, wherever it lands: not a failure
        if args.follow:
            return EXIT_OK
        raise


def cmd_send(args: argparse.Namespace) -> int:
    """``chatq send``: POST one message to the tenant's ingest socket; print the answer."""
    message_id = args.id or _new_id()
    folder = run_dir(args.config)
    path = tenant_socket(folder, args.tenant)
    body = {"id": message_id, "chat_id": args.chat_id, "text": args.text}
    try:
        status, answer = _post_json(path, "/messages", body, SEND_TIMEOUT)
    except (FileNotFoundError, ConnectionRefusedError):
        raise _not_serving(folder / CONTROL_SOCKET_NAME, args.tenant, path) from None
    except OSError as exc:
        raise CommandFailed(f"sending to tenant {args.tenant} on {path} failed: {exc}") from None
    _check_answer(args.tenant, status, answer)
    ack = {"id": message_id, **answer}
    if args.json:
        _print_json(ack)
    if answer.get("rejected"):
        raise CommandFailed(
            f"tenant {args.tenant} rejected message {message_id}: chat {args.chat_id} is full"
            " (QUEUE_FULL); it is stored as rejected and the chat was told to wait"
        )
    if not args.json:
        verdict = "duplicate (already accepted)" if answer.get("duplicates") else "accepted"
        print(f"{verdict}: message {message_id} for {args.tenant}, chat {args.chat_id}")
    return EXIT_OK


def _post_json(path: Path, url: str, body: Any, timeout: float) -> tuple[int, dict[str, Any]]:
    """POST `body` as JSON over the unix socket at `path`; the status and the JSON answer.

    http.client, not aiohttp: aiohttp takes longer to import than this whole
    command takes to run.
    """
    import http.client
    import socket

    class UnixConnection(http.client.HTTPConnection):
        def connect(self) -> None:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.settimeout(timeout)
            try:
                sock.connect(str(path))
            except OSError:
                sock.close()
                raise
            self.sock = sock

    conn = UnixConnection("localhost", timeout=timeout)
    try:
        headers = {"Content-Type": "application/json"}
        conn.request("POST", url, json.dumps(body).encode(), headers)
        response = conn.getresponse()
        raw = response.read()
    except http.client.HTTPException as exc:
        raise CommandFailed(f"bad HTTP answer on {path}: {exc!r}") from None
    finally:
        conn.close()
    try:
        answer = json.loads(raw)
    except ValueError:
        answer = None
    return response.status, answer if isinstance(answer, dict) else {}


def _new_id() -> str:
    import uuid

    return uuid.uuid4().hex


def _not_serving(control: Path, tenant_id: str, path: Path) -> ChatqError:
    """Why nothing answers on a tenant's socket: no supervisor, no tenant, or not running."""
    state = request(control, "status", tenant=tenant_id)["state"]  # raises the first two
    return CommandFailed(
        f"tenant {tenant_id} is {state}, not taking messages (no server at {path})"
    )


def _check_answer(tenant_id: str, status: int, answer: dict[str, Any]) -> None:
    if status == 202:
        return
    error = str(answer.get("error") or f"HTTP {status}")
    if status in (400, 413):
        raise UsageError(f"tenant {tenant_id} refused the message: {error}")
    if status == 503:
        raise CommandFailed(f"tenant {tenant_id} is not taking messages now: {error}")
    raise CommandFailed(f"tenant {tenant_id} answered HTTP {status}: {error}")


def cmd_retry(args: argparse.Namespace) -> int:
    """``chatq retry TENANT (--message ID ... | --failed [--chat C])``: failed messages again."""
    answer, now = _redrive(args, "messages", args.message)
    n = answer["requeued"]
    text = f"requeued {n} message{'' if n == 1 else 's'} of {args.tenant}"
    text += f" ({answer['failed']} failed, {answer['rejected']} rejected)"
    return _tell(args, answer, text, None if now or not n else "they run")


def cmd_resend(args: argparse.Namespace) -> int:
    """``chatq resend TENANT (--reply ID ... | --failed [--chat C])``: failed replies again."""
    answer, now = _redrive(args, "replies", args.reply)
    n = answer["resent"]
    text = f"resent {n} repl{'y' if n == 1 else 'ies'} of {args.tenant}"
    return _tell(args, answer, text, None if now or not n else "they go out")


def _tell(args: argparse.Namespace, answer: Any, text: str, later: str | None) -> int:
    """The counts (--json: the answer); `later` says they wait for the tenant's start."""
    if args.json:
        _print_json(answer)
    else:
        print(text if later is None else f"{text}; {later} when {args.tenant} starts")
    return EXIT_OK


def _redrive(args: argparse.Namespace, kind: str, ids: list[Any] | None) -> tuple[Any, bool]:
    """Through the running worker, else in the stopped tenant's store: (answer, done now)."""
    if ids and args.chat is not None:
        raise UsageError(f"{args.command}: --chat goes with --failed, not with ids")
    from chatq.config import load_config

    config = load_config(args.config, secrets=False)  # paths only: no secret needed
    if all(t.id != args.tenant for t in config.tenants):
        raise NoSuchTenant(args.tenant)
    body: dict[str, Any] = {"ids": ids} if ids else {"failed": True}
    if args.chat is not None:
        body["chat"] = args.chat
    path = config.socket_path(args.tenant)
    try:
        status, answer = _post_json(path, f"/redrive/{kind}", body, SEND_TIMEOUT)
    except (FileNotFoundError, ConnectionRefusedError):  # no worker: change the store itself
        return _redrive_stopped(config.store_path(args.tenant), args.tenant, kind, body), False
    except OSError as exc:
        raise CommandFailed(f"asking tenant {args.tenant} on {path} failed: {exc}") from None
    if status != 200:
        error = answer.get("error") or f"HTTP {status}"
        raise CommandFailed(f"tenant {args.tenant}: {error}; nothing changed")
    return answer, True


def _redrive_stopped(path: Path, tenant_id: str, kind: str, body: dict[str, Any]) -> Any:
    import asyncio

    from chatq.shared.errors import RedriveRefused, StoreInUse
    from chatq.tenant_worker.redrive import parse_selection, redrive_stored

    if not path.is_file():
        raise CommandFailed(f"no store at {path} (tenant {tenant_id} never ran)")
    selection = parse_selection(body, str if kind == "messages" else int)
    try:
        return asyncio.run(redrive_stored(path, tenant_id, kind, selection))
    except RedriveRefused as exc:
        raise CommandFailed(f"tenant {tenant_id}: {exc}; nothing changed") from None
    except StoreInUse:
        raise CommandFailed(
            f"tenant {tenant_id} is starting or stopping (its worker holds the store but"
            " does not answer yet); nothing changed, try again"
        ) from None


def cmd_history(args: argparse.Namespace) -> int:
    """``chatq history``: read the tenant's store directly (no supervisor needed)."""
    from chatq.config import load_config
    from chatq.tenant_worker.history import format_transcript, read_history

    config = load_config(args.config, secrets=False)  # no secret is needed to read a store
    path = config.store_path(args.tenant)
    if not path.is_file() and all(t.id != args.tenant for t in config.tenants):
        raise NoSuchTenant(args.tenant)  # a removed tenant's store is still readable
    entries = read_history(path, chat_id=args.chat, limit=args.limit)
    if args.json:
        _print_json(entries)
    else:
        print(format_transcript(entries) or "(no messages)")
    return EXIT_OK


# -- the parser ------------------------------------------------------------------


def _whole(text: str, low: int, high: int | None = None) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
    if value < low or (high is not None and value > high):
        bounds = f">= {low}" if high is None else f"{low} to {high}"
        raise argparse.ArgumentTypeError(f"must be {bounds}, got {value}")
    return value


def _positive_int(text: str) -> int:
    return _whole(text, 1)


def _count(text: str) -> int:
    return _whole(text, 0, MAX_LOG_LINES)


def _positive_seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of seconds: {text!r}") from None
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"must be > 0 seconds, got {text}")
    return value


def _non_empty(text: str) -> str:
    if not text:
        raise argparse.ArgumentTypeError("must not be empty")
    return text


def _config_option() -> argparse.ArgumentParser:
    """``--config`` after the command too (SUPPRESS: absent there, the global one stands)."""
    parent = argparse.ArgumentParser(add_help=False)
    parent.add_argument("--config", type=Path, default=argparse.SUPPRESS, help="tenants TOML file")
    return parent


def _json_option() -> argparse.ArgumentParser:
    parent = argparse.ArgumentParser(add_help=False)
    parent.add_argument("--json", action="store_true", help="print JSON (shapes: README)")
    return parent


def _wait_options() -> argparse.ArgumentParser:
    parent = argparse.ArgumentParser(add_help=False)
    which = parent.add_mutually_exclusive_group()
    which.add_argument(
        "--wait",
        dest="no_wait",
        action="store_false",
        help="wait until the tenants reach their state (the default)",
    )
    which.add_argument("--no-wait", action="store_true", help="return once the supervisor is told")
    parent.set_defaults(no_wait=False)  # store_false's own default would be True
    parent.add_argument(
        "--timeout",
        type=_positive_seconds,
        default=WAIT_TIMEOUT,
        metavar="SECONDS",
        help=f"how long to wait before exit 1 (default {WAIT_TIMEOUT:g})",
    )
    return parent


def _one_or_all(sub: argparse.ArgumentParser, meaning: str) -> None:
    which = sub.add_mutually_exclusive_group(required=True)
    which.add_argument("tenant", nargs="?", default=None)
    which.add_argument("--all", action="store_true", help=meaning)


class _Parser(argparse.ArgumentParser):
    """argparse, with one-line usage errors that name the command (and guess a typo)."""

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_USAGE, f"{self.prog}: {_usage_problem(message)} (see '{self.prog} -h')\n")


def parse(parser: argparse.ArgumentParser, argv: Sequence[str] | None) -> argparse.Namespace:
    """parse_args, but a stray argument is named with its command (SystemExit(2))."""
    parsed, extra = parser.parse_known_args(argv)
    if extra:
        command = f"{parser.prog} {parsed.command}"
        hint = " (quote the text)" if parsed.command == "send" else ""
        parser.exit(EXIT_USAGE, f"{command}: unexpected argument {extra[0]!r}{hint}\n")
    return parsed


_INVALID_CHOICE = re.compile(r"argument COMMAND: invalid choice: '(?P<given>[^']*)'")


def _usage_problem(message: str) -> str:
    """argparse's complaint, reworded where it helps."""
    found = _INVALID_CHOICE.match(message)
    if found is not None:
        given = found["given"]
        close = difflib.get_close_matches(given, COMMANDS, n=1)
        guess = f"did you mean '{close[0]}'?" if close else f"one of: {', '.join(COMMANDS)}"
        return f"unknown command '{given}' ({guess})"
    if message == "the following arguments are required: COMMAND":
        return f"missing command (one of: {', '.join(COMMANDS)})"
    return message


class _Version(argparse.Action):
    """``--version``: the installed package's version, looked up only when asked."""

    def __call__(self, parser: argparse.ArgumentParser, *_: Any) -> None:
        from importlib.metadata import PackageNotFoundError, version

        try:
            found = version("chatq")
        except PackageNotFoundError:
            found = "unknown (not installed)"
        print(f"chatq {found}")
        parser.exit(EXIT_OK)


COMMANDS = (
    "run",
    "list",
    "status",
    "logs",
    "restart",
    "stop",
    "start",
    "reload",
    "send",
    "history",
    "retry",
    "resend",
)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="chatq", description="Run and operate chat bots for many tenants on one host."
    )
    parser.add_argument("--version", action=_Version, nargs=0, help="print the version and exit")
    parser.add_argument(
        "--config",
        type=Path,
        default=None,
        help="tenants TOML file (default: $CHATQ_CONFIG or config/tenants.toml)",
    )
    commands: Any = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    config, as_json = _config_option(), _json_option()

    def add(name: str, func: Runner, help_text: str, *parents: argparse.ArgumentParser) -> Any:
        sub = commands.add_parser(name, help=help_text, parents=[config, *parents])
        sub.set_defaults(func=func)
        return sub

    add("run", cmd_run, "run the supervisor in the foreground")
    add("list", cmd_list, "list tenants with state and counters", as_json)
    add("status", cmd_status, "show one tenant in detail", as_json).add_argument("tenant")
    waits = _wait_options()
    restart = add("restart", cmd_restart, "restart tenants (drains first), then wait", waits)
    _one_or_all(restart, "every enabled tenant not stopped by an operator")
    stop = add("stop", cmd_stop, "stop tenants (drains first), then wait", waits)
    _one_or_all(stop, "every tenant")
    start = add("start", cmd_start, "start stopped or fatal tenants, then wait", waits)
    _one_or_all(start, "every enabled tenant")
    reload = add(
        "reload", cmd_reload, "re-read the config file, apply it, then wait", as_json, waits
    )
    reload.add_argument(
        "--force",
        action="store_true",
        help="move data_dir even though its stores hold unfinished rows",
    )
    logs = add("logs", cmd_logs, "show recent log lines; -f follows them", as_json)
    logs.add_argument("tenant", nargs="?", default=None, help="a tenant, gateway or supervisor")
    logs.add_argument(
        "-n",
        "--lines",
        type=_count,
        default=LOG_LINES,
        metavar="N",
        help=f"the last N lines (default {LOG_LINES}; 0 with -f: only new ones)",
    )
    logs.add_argument("-f", "--follow", action="store_true", help="then follow, until Ctrl-C")
    send = add("send", cmd_send, "send a message to a tenant (as a chat would)", as_json)
    send.add_argument("tenant")
    send.add_argument("chat_id")
    send.add_argument("text")
    send.add_argument("--id", type=_non_empty, help="message id (default: a random one)")
    for name, func, noun, id_type in (
        ("retry", cmd_retry, "message", str),
        ("resend", cmd_resend, "reply", int),
    ):
        what = "failed and rejected messages" if name == "retry" else "failed replies"
        sub = add(name, func, f"put {what} back in line (attempts reset)", as_json)
        sub.add_argument("tenant")
        which = sub.add_mutually_exclusive_group(required=True)
        which.add_argument(
            f"--{noun}", nargs="+", type=id_type, metavar="ID", help=f"these {noun} ids"
        )
        which.add_argument("--failed", action="store_true", help=f"every one of the {what}")
        sub.add_argument("--chat", type=_non_empty, help="with --failed: only this chat's")
    history = add("history", cmd_history, "show stored messages and replies", as_json)
    history.add_argument("tenant")
    history.add_argument("--chat", help="only this chat")
    history.add_argument("--limit", type=_positive_int, default=50, help="last N (default 50)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command; returns the exit code (argparse's own 2 on a usage error)."""
    parser = build_parser()
    try:
        args = parse(parser, argv)
    except SystemExit as exc:  # usage error (2) or --help (0): already printed
        return exc.code if isinstance(exc.code, int) else EXIT_USAGE
    func: Runner = args.func
    try:
        return func(args)
    except ChatqError as exc:
        return _report(exc, args)
    except KeyboardInterrupt:
        return EXIT_FAILED
    except BrokenPipeError:  # `chatq list | head`: the reader has gone; say nothing more
        _silence_stdout()
        return EXIT_FAILED


def _report(exc: ChatqError, args: argparse.Namespace) -> int:
    """Print why the command failed, in one line; its exit code."""
    text = str(exc)
    if isinstance(exc, NoSuchTenant):
        text = no_such_tenant_text(exc.tenant_id, known_tenants(args.config))
    print(f"chatq: {text}", file=sys.stderr)
    return EXIT_USAGE if isinstance(exc, ConfigError | UsageError) else EXIT_FAILED


def _silence_stdout() -> None:
    """Point stdout at /dev/null so the interpreter's final flush does not fail again."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError):  # no real file descriptor behind stdout (tests)
        pass


if __name__ == "__main__":
    sys.exit(main())
