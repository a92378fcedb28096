"""Control commands: one function per command, shared by the socket and signals.

Each takes the supervisor and the checked request (see supervisor/control.py
for the wire format) and returns the answer's ``result``. They run on the
supervisor's loop thread, one at a time, so mutating commands never overlap.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from chatq.supervisor.program import ProgramHandle, State

if TYPE_CHECKING:
    from chatq.supervisor.supervisor import Supervisor

Command = Callable[["Supervisor", dict[str, Any]], Any]


def cmd_list(sup: Supervisor, _request: dict[str, Any]) -> Any:
    """``list`` -- ``chatq list``: one summary object per tenant, in config order."""
    return [handle.summary() for handle in sup.handles()]


def cmd_status(sup: Supervisor, request: dict[str, Any]) -> Any:
    """``status`` {tenant} -- ``chatq status T``: the summary plus details and log tail."""
    handle = sup.handle(request["tenant"])
    sup.sample_now(handle)
    return handle.details()


def cmd_restart(sup: Supervisor, request: dict[str, Any]) -> Any:
    """``restart`` {tenant | all} -- ``chatq restart T|--all``: graceful restart; revives fatal.

    Answers ``{"restarting": [ids], "skipped": [ids]}``. ``--all`` means every
    enabled tenant of the config (not a disabled one: it would start it, nor
    one removed by a reload and still draining) except those an operator
    stopped, which are listed in ``skipped`` and stay stopped.
    """
    if request.get("all"):
        handles = _config_tenants(sup, enabled_only=True)
        skipped = [h.id for h in handles if _stopped(h)]
        names = [h.id for h in handles if not _stopped(h)]
    else:
        names, skipped = [request["tenant"]], []
    for name in names:
        sup.restart(name)
    return {"restarting": names, "skipped": skipped}


def cmd_stop(sup: Supervisor, request: dict[str, Any]) -> Any:
    """``stop`` {tenant | all} -- ``chatq stop T|--all``: drain and stop; no restarts until started.

    Answers ``{"stopping": [ids], "already_stopped": [ids]}``; stopping a
    stopped tenant changes nothing (``--all``: every tenant of the config).
    """
    handles = _targets(sup, request, enabled_only=False)
    already = [h.id for h in handles if h.state is State.STOPPED and not h.alive]
    stopping = [h.id for h in handles if h.id not in already]
    for name in stopping:
        sup.stop_tenant(name)
    return {"stopping": stopping, "already_stopped": already}


def cmd_start(sup: Supervisor, request: dict[str, Any]) -> Any:
    """``start`` {tenant | all} -- ``chatq start T|--all``: start a stopped or fatal tenant.

    Answers ``{"starting": [ids], "already_running": [ids]}``; starting a live
    tenant changes nothing (``--all``: every enabled tenant of the config).
    """
    handles = _targets(sup, request, enabled_only=True)
    already = [h.id for h in handles if h.alive and not h.stopping_for_good]
    starting = [h.id for h in handles if h.id not in already]
    for name in starting:
        sup.start_tenant(name)
    return {"starting": starting, "already_running": already}


def _targets(
    sup: Supervisor, request: dict[str, Any], *, enabled_only: bool
) -> list[ProgramHandle]:
    if request.get("all"):
        return _config_tenants(sup, enabled_only=enabled_only)
    return [sup.handle(request["tenant"])]


def _config_tenants(sup: Supervisor, *, enabled_only: bool) -> list[ProgramHandle]:
    """The handles of the config's tenants (not the gateway, nor removed ones draining)."""
    wanted = {t.id for t in sup.config.tenants if t.enabled or not enabled_only}
    return [h for h in sup.handles() if h.id in wanted]


def _stopped(handle: ProgramHandle) -> bool:
    """Stopped, or on its way there (by an operator, or disabled)."""
    return handle.state is State.STOPPED or handle.stopping_for_good


def cmd_logs(sup: Supervisor, request: dict[str, Any]) -> Any:
    """``logs`` {tenant?, after?, limit?} -- ``chatq logs [T] [-n N] [-f]``: recent log lines.

    Answers ``{"lines": [str], "next": int}``: the lines of `tenant` (a tenant
    id, "gateway" or "supervisor"; every source without it) numbered above
    `after` (0: all those kept), the last `limit` of them, oldest first.
    ``-f`` asks again with ``after`` = the `next` of the previous answer.
    """
    source = request.get("tenant")
    if source is not None and source != "supervisor":
        sup.handle(source)  # NoSuchTenant for a typo
    page = sup.log_book.read(source, request.get("after", 0), request.get("limit"))
    return {"lines": page.lines, "next": page.next}


def cmd_reload(sup: Supervisor, request: dict[str, Any]) -> Any:
    """``reload`` {force?} -- ``chatq reload [--force]`` or SIGHUP: re-read the config, apply it."""
    return sup.reload(force=request.get("force") is True)


def cmd_shutdown(sup: Supervisor, _request: dict[str, Any]) -> Any:
    """``shutdown`` -- SIGTERM/SIGINT: drain every worker and exit 0."""
    sup.begin_shutdown("shutdown requested")
    return {"shutting_down": True}


COMMANDS: dict[str, Command] = {
    "list": cmd_list,
    "status": cmd_status,
    "restart": cmd_restart,
    "stop": cmd_stop,
    "start": cmd_start,
    "reload": cmd_reload,
    "logs": cmd_logs,
    "shutdown": cmd_shutdown,
}
