"""Store failures sorted by what fixes them: time (retry) or an operator (fail to boot).

Transient: the disk or quota is full, another process holds the database
lock, an I/O error, out of memory. They pass by themselves (space is freed,
the lock released), so the worker stays up: writes it owes are retried with
backoff, new messages get 503 meanwhile, and it serves again by itself.

Permanent: the file is not a database (or is corrupt), its schema is newer
than this chatq, it cannot be opened or written for lack of permission.
Restarting will not help; they are boot failures.
"""

from __future__ import annotations

import errno
import sqlite3
from pathlib import Path

from chatq.shared.errors import StoreError, StoreUnavailable

__all__ = ["is_transient", "one_line", "store_error"]

_TRANSIENT_CODES = frozenset(
    {
        sqlite3.SQLITE_BUSY,
        sqlite3.SQLITE_LOCKED,
        sqlite3.SQLITE_NOMEM,
        sqlite3.SQLITE_IOERR,
        sqlite3.SQLITE_FULL,
        sqlite3.SQLITE_PROTOCOL,
    }
)
_TRANSIENT_ERRNOS = frozenset(
    {errno.ENOSPC, errno.EDQUOT, errno.EIO, errno.ENOMEM, errno.EAGAIN, errno.EMFILE, errno.ENFILE}
)


def is_transient(exc: BaseException) -> bool:
    """Whether `exc` is a store failure that passes by itself."""
    if isinstance(exc, StoreUnavailable):
        return True
    if isinstance(exc, sqlite3.Error):
        code = getattr(exc, "sqlite_errorcode", None)
        return isinstance(code, int) and code & 0xFF in _TRANSIENT_CODES  # primary code
    if isinstance(exc, OSError):
        return exc.errno in _TRANSIENT_ERRNOS
    return False


def store_error(path: Path, exc: BaseException, what: str = "") -> StoreError:
    """`exc` as one line about the store at `path`: StoreUnavailable if transient."""
    kind = StoreUnavailable if is_transient(exc) else StoreError
    where = f"store {path}: {what}: " if what else f"store {path}: "
    error = kind(where + one_line(exc))
    error.__cause__ = exc
    return error


def one_line(exc: BaseException) -> str:
    """An exception's text on one line (its class name if it has none)."""
    return " ".join(str(exc).split()) or type(exc).__name__
