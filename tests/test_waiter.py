"""Waiter: an epoll set of standing objects, plus each wait's passing ones."""

from __future__ import annotations

import os
import socket
from collections.abc import Iterator

import pytest

from chatq.supervisor.waiter import Waiter


@pytest.fixture
def waiter() -> Iterator[Waiter]:
    made = Waiter()
    yield made
    made.close()


def test_standing_objects_are_waited_on_until_removed(waiter: Waiter) -> None:
    ours, theirs = socket.socketpair()
    with ours, theirs:
        waiter.add(ours)
        assert waiter.wait([], 0) == []
        theirs.send(b"x")
        assert waiter.wait([], 0) == [ours]
        waiter.remove(ours)
        assert waiter.wait([], 0) == []
        waiter.remove(ours)  # twice: nothing


def test_a_closed_peer_counts_as_ready(waiter: Waiter) -> None:
    read_end, write_end = os.pipe()
    try:
        waiter.add(read_end)
        os.close(write_end)
        assert waiter.wait([], 0) == [read_end]
    finally:
        waiter.remove(read_end)
        os.close(read_end)


def test_a_number_closed_without_remove_and_reused_is_watched_afresh(waiter: Waiter) -> None:
    first_r, first_w = os.pipe()
    waiter.add(first_r)
    os.close(first_r)  # no remove: epoll forgets it by itself
    os.close(first_w)
    second_r, second_w = os.pipe()
    if second_r != first_r:  # the same number, another pipe
        os.dup2(second_r, first_r)
        os.close(second_r)
    number = first_r
    try:
        waiter.add(number)
        assert waiter.wait([], 0) == []
        os.write(second_w, b"x")
        assert waiter.wait([], 0) == [number]
    finally:
        waiter.remove(number)
        os.close(number)
        os.close(second_w)


def test_passing_objects_count_for_one_wait_and_may_change(waiter: Waiter) -> None:
    a, a_peer = socket.socketpair()
    b, b_peer = socket.socketpair()
    with a, a_peer, b, b_peer:
        a_peer.send(b"x")
        b_peer.send(b"x")
        assert waiter.wait([a], 0) == [a]
        assert waiter.wait([b], 0) == [b]  # a is no longer waited on
        assert waiter.wait([], 0, writers=[a]) == [a]  # writable
        assert sorted(waiter.wait([a, b], 0), key=id) == sorted([a, b], key=id)


def test_the_timeout_is_kept_when_nothing_is_ready(waiter: Waiter) -> None:
    ours, theirs = socket.socketpair()
    with ours, theirs:
        waiter.add(ours)
        assert waiter.wait([], 0.01) == []
