"""Text that must survive UTF-8 (SQLite, pipes, log lines) whatever the sender put in it."""

from __future__ import annotations

__all__ = ["storable", "storable_text"]


def storable(text: str) -> bool:
    """Whether SQLite can store `text` as UTF-8: not with a lone surrogate in it.

    JSON (``"\\ud800"``) and Python strings allow lone surrogates; UTF-8 has
    no encoding for them.
    """
    if text.isascii():
        return True
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def storable_text(text: str) -> str:
    """`text`, with any lone surrogate written as an escape (for error texts and log lines)."""
    return text if storable(text) else text.encode("utf-8", "backslashreplace").decode()
