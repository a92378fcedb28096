"""The ``chatq`` command line.

argparse, from the standard library: the CLI is a thin client of the control
socket, and keeping it dependency-free keeps ``chatq list`` fast to start
(click or typer would add import time to every call for no feature we need).

Exit codes: 0 done; 1 the operation failed (supervisor not running, no such
tenant); 2 usage or configuration error. Errors are one line on stderr.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from shared.errors import ChatqError, ConfigError

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2

Runner = Callable[[argparse.Namespace], int]


def cmd_run(args: argparse.Namespace) -> int:
    """Run the supervisor in the foreground until SIGTERM/SIGINT."""
    from config import load_config
    from shared.log import setup_logging
    from supervisor.logstream import LogStream
    from supervisor.supervisor import Supervisor

    config = load_config(args.config)
    settings = config.supervisor
    stream = LogStream(settings.log_file)
    setup_logging(
        settings.log_level, settings.log_format, tenant_id="supervisor", sink=stream.write_line
    )
    try:
        return Supervisor(config, lambda: load_config(args.config), stream).run()
    finally:
        stream.close()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="chatq", description="Run and operate chat bots for many tenants on one host."
    )
    parser.add_argument(
        "--config",
        type=Path,
        default=None,
        help="tenants TOML file (default: $CHATQ_CONFIG or config/tenants.toml)",
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    run = commands.add_parser("run", help="run the supervisor in the foreground")
    run.add_argument("--config", type=Path, default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    run.set_defaults(func=cmd_run)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    func: Runner = args.func
    try:
        return func(args)
    except ConfigError as exc:
        print(f"chatq: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except ChatqError as exc:
        print(f"chatq: {exc}", file=sys.stderr)
        return EXIT_FAILED
    except KeyboardInterrupt:
        return EXIT_FAILED


if __name__ == "__main__":
    sys.exit(main())
