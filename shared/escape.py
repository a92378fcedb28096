"""Chat content on a terminal: control characters shown, never obeyed.

Message texts, chat ids and error texts come from strangers. Written raw to a
log line, a log file or `chatq history`, an ANSI or OSC escape could recolour
an operator's terminal, retitle it or hide lines, and a NUL or a CR could
forge what a line seems to say. Human-readable output escapes every control
character (C0, DEL and C1) the way Python writes it in a string literal;
JSON output stays exact.
"""

from __future__ import annotations

import re

__all__ = ["printable", "printable_lines"]

_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")
_CONTROL_BUT_NEWLINE = re.compile(r"[\x00-\x09\x0b-\x1f\x7f-\x9f]")
_NAMED = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}


def _escape(found: re.Match[str]) -> str:
    char = found.group()
    return _NAMED.get(char) or f"\\x{ord(char):02x}"


def printable(text: str) -> str:
    """`text` on one line, every control character escaped (\\n, \\r, \\t, \\x1b, ...)."""
    return _CONTROL.sub(_escape, text)


def printable_lines(text: str) -> str:
    """`text` with its line breaks kept and every other control character escaped."""
    return _CONTROL_BUT_NEWLINE.sub(_escape, text)
