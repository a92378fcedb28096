"""Imported by the fork server last of all (``spawn.PRELOAD``): it is ready to fork.

Creates the file the supervisor named in ``CHATQ_FORKSERVER_READY``. Until it
exists the supervisor's loop spawns nothing: a spawn would wait inside
multiprocessing for the preloading to end (~0.6 s, more on a busy host),
with the control socket unanswered. The variable is dropped here, so
workers do not inherit it.
"""

import os

_flag = os.environ.pop("CHATQ_FORKSERVER_READY", None)
if _flag:
    os.close(os.open(_flag, os.O_WRONLY | os.O_CREAT, 0o600))
