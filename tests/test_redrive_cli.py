"""`chatq retry` and `chatq resend` against a real supervisor: through the running
worker, and in a stopped tenant's store (run at its next start)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import sandbox
from supervisor_fixtures import SupervisorHarness, SupervisorRun

from chatq.supervisor.cli import main
from chatq.tenant_worker.redrive import BadSelection, parse_selection
from chatq.tenant_worker.store import Selection

FLAKY = """\
from pathlib import Path

from chatq.shared.errors import PermanentHandlerError


async def reply(message, ctx):
    if not Path(__file__).with_name("healed").exists():
        raise PermanentHandlerError("provider down")
    return "ok " + message.text
"""


@pytest.fixture
def harness(tmp_path: Path) -> Iterator[SupervisorHarness]:
    with SupervisorHarness(tmp_path) as made:
        yield made


def cli(capsys: pytest.CaptureFixture[str], config: Path, *argv: str) -> tuple[int, str, str]:
    code = main(["--config", str(config), *argv])
    out, err = capsys.readouterr()
    return code, out, err


def statuses(capsys: pytest.CaptureFixture[str], config: Path) -> dict[str, str]:
    code, out, _ = cli(capsys, config, "history", "a", "--json")
    assert code == 0
    return {entry["id"]: entry["status"] for entry in json.loads(out)}


def wait_statuses(capsys: pytest.CaptureFixture[str], config: Path, wanted: dict[str, str]) -> None:
    def probe() -> Any:
        return statuses(capsys, config) == wanted or None

    sandbox.wait_for(f"messages {wanted}", probe, 10.0)


def test_retry_through_the_worker_and_at_the_next_start(
    harness: SupervisorHarness, capsys: pytest.CaptureFixture[str]
) -> None:
    harness.write_module("flaky", FLAKY)
    config = harness.write_config({"a": {"handler": "flaky:reply", "max_attempts": 1}})
    run: SupervisorRun = harness.start()
    for msg_id, chat in (("m1", "c1"), ("m2", "c1"), ("m3", "c2")):
        assert run.post("a", f"hi {msg_id}", chat_id=chat, msg_id=msg_id) == 202
    wait_statuses(capsys, config, {"m1": "failed", "m2": "failed", "m3": "failed"})

    # A typo, or a message that is not failed, changes nothing.
    code, out, err = cli(capsys, config, "retry", "a", "--message", "m1", "nope")
    assert (code, out, err) == (1, "", "chatq: tenant a: no such message: nope; nothing changed\n")
    code, _, err = cli(capsys, config, "retry", "a", "--message", "m1", "--chat", "c1")
    assert (code, err) == (2, "chatq: retry: --chat goes with --failed, not with ids\n")
    code, _, err = cli(capsys, config, "retry", "ab", "--failed")
    assert (code, err) == (1, "chatq: no such tenant: ab (did you mean a?)\n")
    assert set(statuses(capsys, config).values()) == {"failed"}

    (harness.tmp_path / "healed").touch()
    code, out, _ = cli(capsys, config, "retry", "a", "--failed", "--chat", "c1")
    assert (code, out) == (0, "requeued 2 messages of a (2 failed, 0 rejected)\n")
    wait_statuses(capsys, config, {"m1": "processed", "m2": "processed", "m3": "failed"})
    code, out, _ = cli(capsys, config, "history", "a", "--chat", "c1", "--json")
    replies = [reply["text"] for entry in json.loads(out) for reply in entry["replies"]]
    assert replies == ["ok hi m1", "ok hi m2"]  # in their arrival order

    assert cli(capsys, config, "stop", "a")[0] == 0
    code, out, _ = cli(capsys, config, "retry", "a", "--failed", "--json")
    assert (code, json.loads(out)) == (0, {"requeued": 1, "failed": 1, "rejected": 0})
    assert statuses(capsys, config)["m3"] == "queued"  # runs at the next start
    code, out, err = cli(capsys, config, "resend", "a", "--reply", "99")
    assert (code, err) == (1, "chatq: tenant a: no such reply: 99; nothing changed\n")
    assert cli(capsys, config, "start", "a")[0] == 0
    wait_statuses(capsys, config, {"m1": "processed", "m2": "processed", "m3": "processed"})

    code, out, _ = cli(capsys, config, "resend", "a", "--failed")
    assert (code, out) == (0, "resent 0 replies of a\n")
    code, out, err = cli(capsys, config, "resend", "a", "--reply", "1")
    assert (code, err) == (1, "chatq: tenant a: reply 1 is sent, not failed; nothing changed\n")


@pytest.mark.parametrize(
    ("body", "id_type", "expected"),
    [
        ({"failed": True}, str, Selection()),
        ({"failed": True, "chat": "c1"}, str, Selection(chat="c1")),
        ({"ids": ["m1", "m1", "m2"]}, str, Selection(ids=("m1", "m2"))),
        ({"ids": [3]}, int, Selection(ids=(3,))),
    ],
)
def test_parse_selection(body: object, id_type: type[Any], expected: Selection) -> None:
    assert parse_selection(body, id_type) == expected


@pytest.mark.parametrize(
    "body",
    [
        [],
        {},
        {"failed": False},
        {"failed": True, "ids": ["m1"]},
        {"ids": []},
        {"ids": ["m1"], "chat": "c1"},
        {"ids": [1]},
        {"failed": True, "chat": ""},
        {"failed": True, "extra": 1},
    ],
)
def test_parse_selection_refuses(body: object) -> None:
    with pytest.raises(BadSelection):
        parse_selection(body, str)
