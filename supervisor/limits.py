"""The open-file limit: raised to what the host allows, checked against the fleet.

The supervisor holds a few descriptors per tenant (the worker's pipe, its
process sentinel and pidfd, its /proc statm file kept open by the watchdog,
the fork server's side while spawning) and any shell or
service manager may start it with a soft limit of 1,024. At ~337 tenants
the next spawn then failed with EMFILE inside the fork server. So at start
the soft limit is raised to the hard one (what any process may do), and a
fleet that cannot fit even then is refused with one line naming the need.
"""

from __future__ import annotations

import resource

from chatq.shared.errors import ConfigError

__all__ = ["FDS_BASE", "FDS_PER_TENANT", "raise_open_files"]

FDS_PER_TENANT = 5  # pipe, sentinel, pidfd, statm, spawn-time fds, a control client now and then
FDS_BASE = 64  # stdio, the control and metrics sockets, the fork server, log file


def raise_open_files(tenants: int) -> int:
    """Raise RLIMIT_NOFILE's soft limit to its hard limit; the new soft limit.

    ConfigError if `tenants` need more than the hard limit allows.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    need = FDS_BASE + FDS_PER_TENANT * tenants
    ceiling = hard if hard != resource.RLIM_INFINITY else max(soft, need)
    if need > ceiling:
        raise ConfigError(
            f"{tenants} tenants need about {need} open files, but the hard limit is {hard}"
            " (raise it: LimitNOFILE= in the systemd unit, or ulimit -Hn)"
        )
    if soft != resource.RLIM_INFINITY and soft < ceiling:
        resource.setrlimit(resource.RLIMIT_NOFILE, (ceiling, hard))
        return ceiling
    return soft
