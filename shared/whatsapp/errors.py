"""The Graph API's error answers and what chatq does about each `error.code`.

Meta answers most errors with HTTP 400 whatever the cause, so the decision
keys on ``error.code`` (its "details" and title only make the text readable):

    Action.RETRY      retry the reply with backoff and jitter; it stays pending
    Action.PAIR_RATE  131056: too many messages to this user; back off that chat, 4^n s
    Action.FAIL       fail the reply for good (the code in last_error); others go on
    Action.PAUSE      stop the tenant's sending until a restart or reload

RETRY codes Meta lists as passing (overload, maintenance, 5xx) are retried
without an attempt limit: the backoff is capped at 5 minutes, and a reply
past the 24-hour window fails with 131047 anyway. An unknown code is retried
like RETRY, but only up to the outbox's attempt limit, then the reply fails:
a new code is more often a transient condition than a verdict, and the limit
bounds what a wrong guess costs. A 5xx answer without
a readable error body, a timeout and a connection error are RETRY too (the
transport decides those; they have no code).
"""

from __future__ import annotations

import enum
import json
import re
from dataclasses import dataclass

__all__ = ["Action", "GraphError", "action_for", "is_known", "parse_error", "title_for"]


class Action(enum.Enum):
    """What the outbox does with a reply the Graph API refused."""

    RETRY = "retry"
    PAIR_RATE = "pair_rate"
    FAIL = "fail"
    PAUSE = "pause"


# code -> (action, short title). Titles from Meta's error-code reference; they
# are shown only when the answer's own message is empty.
_POLICY: dict[int, tuple[Action, str]] = {
    0: (Action.PAUSE, "authentication failed"),
    1: (Action.RETRY, "invalid request or possible server error"),
    2: (Action.RETRY, "service temporarily unavailable"),
    3: (Action.PAUSE, "capability or permissions issue"),
    4: (Action.RETRY, "too many API calls"),
    10: (Action.PAUSE, "permission denied"),
    100: (Action.FAIL, "invalid parameter"),
    190: (Action.PAUSE, "access token expired/invalid"),
    368: (Action.PAUSE, "temporarily blocked for policy violations"),
    80007: (Action.RETRY, "WhatsApp Business Account rate limit"),
    130403: (Action.FAIL, "message not allowed"),
    130429: (Action.RETRY, "throughput rate limit hit"),
    130497: (Action.PAUSE, "business account restricted in this country"),
    131000: (Action.RETRY, "something went wrong"),
    131008: (Action.FAIL, "required parameter missing"),
    131009: (Action.FAIL, "parameter value not valid"),
    131016: (Action.RETRY, "service unavailable"),
    131021: (Action.FAIL, "recipient cannot be sender"),
    131026: (Action.FAIL, "message undeliverable"),
    131031: (Action.PAUSE, "business account locked"),
    131042: (Action.FAIL, "business eligibility payment issue"),
    131045: (Action.FAIL, "incorrect certificate"),
    131047: (Action.FAIL, "re-engagement message (24-hour window closed)"),
    131048: (Action.PAUSE, "spam rate limit hit"),
    131050: (Action.FAIL, "user stopped marketing messages"),
    131051: (Action.FAIL, "unsupported message type"),
    131056: (Action.PAIR_RATE, "(business, consumer) pair rate limit hit"),
    131057: (Action.RETRY, "account in maintenance mode"),
}
_PERMISSIONS = range(200, 300)  # API permission errors: the operator must act
_CODE_PREFIX = re.compile(r"^\(#\d+\)\s*")  # Meta starts messages with "(#131047) "


def action_for(code: int) -> Action:
    """What to do about a Graph API error with this `error.code` (unknown: RETRY)."""
    if code in _PERMISSIONS:
        return Action.PAUSE
    known = _POLICY.get(code)
    return known[0] if known is not None else Action.RETRY


def is_known(code: int) -> bool:
    """Whether `code` is in Meta's table (an unknown one is retried a bounded number of times)."""
    return code in _PERMISSIONS or code in _POLICY


def title_for(code: int) -> str:
    """A short human title for `code` ("" when unknown)."""
    if code in _PERMISSIONS:
        return "API permission missing or revoked"
    known = _POLICY.get(code)
    return known[1] if known is not None else ""


@dataclass(frozen=True, slots=True)
class GraphError:
    """One ``{"error": {...}}`` answer of the Graph API."""

    code: int
    message: str = ""
    details: str = ""
    fbtrace_id: str = ""

    @property
    def action(self) -> Action:
        """What chatq does about it (see the module docstring)."""
        return action_for(self.code)

    def describe(self) -> str:
        """One line for last_error and logs, e.g. "131047: Re-engagement message (details)"."""
        text = _CODE_PREFIX.sub("", self.message).strip() or title_for(self.code) or "error"
        if self.details and self.details not in text:
            text = f"{text} ({self.details})"
        return " ".join(f"{self.code}: {text}".split())


def parse_error(body: bytes) -> GraphError | None:
    """The Graph error in an answer's body; None if it holds no ``error.code``."""
    try:
        data = json.loads(body)
    except ValueError:  # also UnicodeDecodeError
        return None
    error = data.get("error") if isinstance(data, dict) else None
    if not isinstance(error, dict):
        return None
    code = _as_code(error.get("code"))
    if code is None:
        return None
    error_data = error.get("error_data")
    details = error_data.get("details") if isinstance(error_data, dict) else None
    return GraphError(
        code=code,
        message=_text(error.get("message")),
        details=_text(details),
        fbtrace_id=_text(error.get("fbtrace_id")),
    )


def _as_code(value: object) -> int | None:
    """An error code, as Meta sends it (a number; some relays send a numeric string)."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, str) and value.isdigit():
        return int(value)
    return None


def _text(value: object) -> str:
    return value if isinstance(value, str) else ""
