"""Waiting on every worker pipe, sentinel and socket at once, cheaply.

``multiprocessing.connection.wait`` does the same job but builds a new
selector and registers every file descriptor on each call: with 50 tenants
(100 descriptors) that was most of the supervisor's idle CPU. ``Waiter``
keeps one ``poll`` object and only adds or drops the descriptors that changed
since the last pass. ``poll`` registers descriptor *numbers* (unlike epoll,
which follows the open file and forgets it on close), so a number closed and
reused between two passes is still watched correctly. Given the very same
list of objects as last time (and no writers), it does not even compare.
"""

from __future__ import annotations

import math
import select
from collections.abc import Iterable
from typing import Any

_READ = select.POLLIN | select.POLLPRI | select.POLLHUP | select.POLLERR
_WRITE = select.POLLOUT | select.POLLHUP | select.POLLERR


def fd_of(obj: Any) -> int:
    return obj if isinstance(obj, int) else int(obj.fileno())


class Waiter:
    """``wait(objects, timeout)`` with a poll set kept between calls."""

    def __init__(self) -> None:
        self._poll = select.poll()
        self._watched: dict[int, tuple[Any, int]] = {}  # fd -> (object, events)
        self._last: Iterable[Any] | None = None  # the objects last registered, if no writers

    def wait(
        self, objects: Iterable[Any], timeout: float, writers: Iterable[Any] = ()
    ) -> list[Any]:
        """The objects ready: `objects` to read from, `writers` to write to.

        Objects are ints or have ``fileno()``; one closed by its other end
        counts as ready either way. The caller must not change a list it
        passes again.
        """
        if objects is not self._last or writers:
            self._register(objects, writers)
        wanted = self._watched
        fired = self._poll.poll(math.ceil(max(0.0, timeout) * 1000))
        return [wanted[fd][0] for fd, _ in fired if fd in wanted]

    def _register(self, objects: Iterable[Any], writers: Iterable[Any]) -> None:
        wanted = {fd_of(obj): (obj, _READ) for obj in objects}
        wanted.update((fd_of(obj), (obj, _WRITE)) for obj in writers)
        for fd in self._watched.keys() - wanted.keys():
            self._poll.unregister(fd)
        for fd, (_, events) in wanted.items():
            before = self._watched.get(fd)
            if before is None:
                self._poll.register(fd, events)
            elif before[1] != events:
                self._poll.modify(fd, events)
        self._watched = wanted
        self._last = None if writers else objects
