"""Stands in for the supervisor's ``__main__`` in tests/test_spawn.py.

If multiprocessing runs the parent's main module again in a child (as
``__mp_main__``), this leaves a file saying so, named after the test
process (the child's grandparent: the fork server is in between).
"""

import os
import tempfile

import psutil

if __name__ == "__mp_main__":
    grandparent = psutil.Process(os.getppid()).ppid()
    open(os.path.join(tempfile.gettempdir(), f"chatq-main-marker-{grandparent}"), "w").close()
