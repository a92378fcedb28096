"""Imported by the fork server last, after every preloaded module (``spawn.PRELOAD``).

Freezes what preloading built, so that no worker's garbage collector ever
walks (and so writes to) an object inherited from the fork server: a
collection in a child touches every tracked object's header, and the kernel
then copies each page it lands on. Frozen objects stay on shared pages.
A collection here first leaves no garbage to freeze.
"""

import gc

gc.collect()
gc.freeze()
