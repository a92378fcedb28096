"""Waiting on every worker pipe, sentinel and socket at once, cheaply.

``multiprocessing.connection.wait`` does the same job but builds a new
selector and registers every file descriptor on each call: with 50 tenants
(100 descriptors) that was most of the supervisor's idle CPU. ``Waiter``
keeps one ``poll`` object and only adds or drops the descriptors that changed
since the last pass. ``poll`` registers descriptor *numbers* (unlike epoll,
which follows the open file and forgets it on close), so a number closed and
reused between two passes is still watched correctly.
"""

from __future__ import annotations

import math
import select
from collections.abc import Iterable
from typing import Any

_EVENTS = select.POLLIN | select.POLLPRI | select.POLLHUP | select.POLLERR


def fd_of(obj: Any) -> int:
    return obj if isinstance(obj, int) else int(obj.fileno())


class Waiter:
    """``wait(objects, timeout)`` with a poll set kept between calls."""

    def __init__(self) -> None:
        self._poll = select.poll()
        self._watched: dict[int, Any] = {}

    def wait(self, objects: Iterable[Any], timeout: float) -> list[Any]:
        """The objects (ints or objects with ``fileno()``) ready to read."""
        wanted = {fd_of(obj): obj for obj in objects}
        for fd in self._watched.keys() - wanted.keys():
            self._poll.unregister(fd)
        for fd in wanted.keys() - self._watched.keys():
            self._poll.register(fd, _EVENTS)
        self._watched = wanted
        events = self._poll.poll(math.ceil(max(0.0, timeout) * 1000))
        return [wanted[fd] for fd, _ in events if fd in wanted]
