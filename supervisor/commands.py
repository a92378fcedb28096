"""Control commands: one function per command, shared by the socket and signals.

Each takes the supervisor and the checked request (see supervisor/control.py
for the wire format) and returns the answer's ``result``. They run on the
supervisor's loop thread, one at a time, so mutating commands never overlap.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

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

    ``--all`` means every enabled tenant of the config: not a disabled one (it
    would start it), nor one removed by a reload and still draining.
    """
    if request.get("all"):
        enabled = {tenant.id for tenant in sup.config.tenants if tenant.enabled}
        names = [h.id for h in sup.handles() if h.id in enabled]
    else:
        names = [request["tenant"]]
    for name in names:
        sup.restart(name)
    return {"restarting": names}


def cmd_stop(sup: Supervisor, request: dict[str, Any]) -> Any:
    """``stop`` {tenant} -- ``chatq stop T``: drain and stop; no restarts until started."""
    sup.stop_tenant(request["tenant"])
    return {"stopping": request["tenant"]}


def cmd_start(sup: Supervisor, request: dict[str, Any]) -> Any:
    """``start`` {tenant} -- ``chatq start T``: start a stopped or fatal tenant."""
    sup.start_tenant(request["tenant"])
    return {"starting": request["tenant"]}


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
    "shutdown": cmd_shutdown,
}
