"""Files that hold chat content, sockets and locks: private to the service user.

`PRIVATE_UMASK` makes everything a process creates (stores, their WAL and
SHM files, log files, locks) mode 0600, folders 0700. `check_private_folder`
refuses a folder another user could write into: in a world-writable run_dir
anyone can plant a symlink where chatq will create a lock or a socket.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

from chatq.shared.errors import ConfigError

__all__ = ["PRIVATE_UMASK", "check_private_folder", "make_private_folder"]

PRIVATE_UMASK = 0o077


def make_private_folder(path: Path, what: str) -> None:
    """Create `path` (mode 0700) if missing, then `check_private_folder` it."""
    try:
        path.mkdir(mode=0o700, parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError(f"{what} {path}: cannot create it: {exc.strerror or exc}") from None
    check_private_folder(path, what)


def check_private_folder(path: Path, what: str) -> None:
    """ConfigError (one line) unless `path` is ours and no one else may write in it."""
    try:
        info = path.stat()
    except OSError as exc:
        raise ConfigError(f"{what} {path}: {exc.strerror or exc}") from None
    if not stat.S_ISDIR(info.st_mode):
        raise ConfigError(f"{what} {path}: not a folder")
    if info.st_uid != os.geteuid():
        raise ConfigError(
            f"{what} {path}: owned by uid {info.st_uid}, not by this user (uid {os.geteuid()})"
        )
    if info.st_mode & 0o022:
        mode = stat.S_IMODE(info.st_mode)
        raise ConfigError(
            f"{what} {path}: writable by group or others (mode {mode:04o}); chmod go-w it"
        )
