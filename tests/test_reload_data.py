"""Reload and the stores: what it leaves behind, data_dir moves, and the keys
of the supervisor itself (run_dir refused; metrics_port, log_* applied)."""

from __future__ import annotations

import sqlite3
import urllib.request
from collections.abc import Callable
from contextlib import closing
from pathlib import Path
from typing import Any

import pytest
from http_fakes import free_port
from test_tenant_handle import (
    SupervisorUnderTest,
    make_config,
    make_supervisor,
    spawner,
    tenants,
)

from chatq.config import ChatqConfig
from chatq.shared.errors import ConfigError, ControlError

__all__ = ["make_supervisor", "spawner"]


def store_with(data_dir: Path, tenant: str, queued: int, pending: int) -> None:
    """A store holding `queued` unfinished messages and `pending` unsent replies."""
    data_dir.mkdir(exist_ok=True)
    with closing(sqlite3.connect(data_dir / f"{tenant}.sqlite3")) as db:
        db.execute("CREATE TABLE messages (id TEXT, status TEXT)")
        db.execute("CREATE TABLE replies (id INTEGER, status TEXT)")
        db.executemany("INSERT INTO messages VALUES (?, 'queued')", [(n,) for n in range(queued)])
        db.execute("INSERT INTO messages VALUES ('done', 'processed')")
        db.executemany("INSERT INTO replies VALUES (?, 'pending')", [(n,) for n in range(pending)])
        db.commit()


def with_dirs(config: ChatqConfig, data_dir: Path, **settings: Any) -> ChatqConfig:
    supervisor = config.supervisor.model_copy(update={"data_dir": data_dir, **settings})
    return config.model_copy(update={"supervisor": supervisor})


def test_a_removed_tenants_unfinished_rows_are_named_in_the_answer(
    make_supervisor: Callable[..., Any], tmp_path: Path
) -> None:
    t: SupervisorUnderTest = make_supervisor(*tenants("a", "b"), data_dir=tmp_path)
    store_with(tmp_path, "b", queued=2, pending=1)
    t.reload_to.append(make_config(*tenants("a"), data_dir=tmp_path))

    changes = t.sup.reload()
    assert changes["removed"] == ["b"]
    assert changes["left_behind"] == {"b": {"messages": 2, "replies": 1}}


def test_a_data_dir_move_with_unfinished_rows_is_refused_unless_forced(
    make_supervisor: Callable[..., Any], tmp_path: Path
) -> None:
    old, new = tmp_path / "old", tmp_path / "new"
    t: SupervisorUnderTest = make_supervisor(*tenants("a", "b"), data_dir=old)
    store_with(old, "a", queued=3, pending=0)
    config = t.sup.config
    t.reload_to += [with_dirs(config, new), with_dirs(config, new)]

    with pytest.raises(ControlError, match=r"data_dir changes .*\(a: 3 messages, 0 replies\)"):
        t.sup.reload()
    assert t.sup.config is config and t.spawner.signals == []  # nothing changed

    changes = t.sup.reload(force=True)
    assert changes["left_behind"] == {"a": {"messages": 3, "replies": 0}}
    assert t.sup.config.supervisor.data_dir == new


def test_a_run_dir_change_is_refused_and_changes_nothing(
    make_supervisor: Callable[..., Any], tmp_path: Path
) -> None:
    t: SupervisorUnderTest = make_supervisor(*tenants("a"))
    config = t.sup.config
    t.reload_to.append(with_dirs(config, config.supervisor.data_dir, run_dir=tmp_path))
    with pytest.raises(ConfigError, match=r"run_dir changes .* supervisor restart"):
        t.sup.reload()
    assert t.sup.config is config and t.spawner.signals == []


def test_metrics_port_and_log_file_are_applied_by_reload(
    make_supervisor: Callable[..., Any], tmp_path: Path
) -> None:
    t: SupervisorUnderTest = make_supervisor(*tenants("a"))
    port, log_file = free_port(), tmp_path / "logs" / "chatq.log"
    config = t.sup.config
    t.reload_to += [
        with_dirs(config, config.supervisor.data_dir, metrics_port=port, log_file=log_file),
        config,
    ]
    try:
        t.sup.reload()
        t.sup.published = [t.sup.handle("a").details()]
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as answer:
            assert b'chatq_up{tenant="a"} 1.0' in answer.read()
        t.sup._stream.write_line("a line for the new file")
        assert t.sup._stream.flush(5.0)
        assert "a line for the new file" in log_file.read_text()
    finally:
        t.sup.reload()  # back: no metrics server left running
    assert t.sup._metrics is None and not t.sup.publishing
