"""json_codec: orjson's speed, json's reach (what orjson refuses still reads and writes)."""

from __future__ import annotations

import json
import math
from typing import Any

import pytest

from chatq.shared.json_codec import dumps, loads


@pytest.mark.parametrize(
    "value",
    [
        {"text": "caf\u00e9 \U0001f600", "n": [1, 2.5, None, True]},
        {"odd": "half an emoji \ud83d"},  # a lone surrogate: orjson refuses it
        {"big": 2**70},  # beyond 64 bits: orjson refuses it
    ],
    ids=["plain", "lone surrogate", "big int"],
)
def test_what_json_writes_round_trips(value: dict[str, Any]) -> None:
    raw = dumps(value)
    assert isinstance(raw, bytes)
    assert loads(raw) == value == json.loads(raw)


def test_what_only_json_reads_is_read_and_errors_are_jsons() -> None:
    assert math.isnan(loads(b'{"x": NaN}')["x"])
    assert loads('{"s": "\\ud800"}') == {"s": "\ud800"}
    with pytest.raises(json.JSONDecodeError, match="Expecting property name"):
        loads(b"{nope")
