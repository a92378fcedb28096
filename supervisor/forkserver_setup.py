"""Imported by the fork server process at start (see ``spawn.PRELOAD``), nowhere else.

It also imports what each child needs before its own code runs
(setproctitle, in ``spawn._own_group``): imported after the fork, it cost
every worker ~0.9 MB of private memory; imported here, its pages are shared.
Likewise multiprocessing's popen modules, which a child imports to unpickle
its pipe's descriptor (~1 ms of every worker's boot).

The fork server must outlive any signal meant for the supervisor: if a
SIGTERM or SIGHUP sent to the whole process group killed it, every worker's
sentinel would close and the supervisor would take live workers for dead
ones. Workers reset these signals in ``spawn.worker_main``. (The fork server
already ignores SIGINT.)
"""

import multiprocessing.popen_fork
import multiprocessing.popen_forkserver
import signal

import setproctitle  # noqa: F401  (preloaded, see above)

_PRELOADED = (multiprocessing.popen_fork, multiprocessing.popen_forkserver)

signal.signal(signal.SIGTERM, signal.SIG_IGN)
signal.signal(signal.SIGHUP, signal.SIG_IGN)
