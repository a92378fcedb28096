"""The supervisor's recent log lines per source, for `chatq logs`."""

from __future__ import annotations

import io

from chatq.supervisor.logbook import LogBook
from chatq.supervisor.logstream import LogStream


def test_last_lines_of_one_source_or_all_in_arrival_order() -> None:
    book = LogBook(keep=3)
    for n in range(5):
        book.add("acme", f"a{n}\n")
        book.add("globex", f"g{n}")
    assert book.read("acme").lines == ["a2", "a3", "a4"]  # the last `keep`, newline gone
    assert book.read(None, limit=4).lines == ["a3", "g3", "a4", "g4"]
    assert book.read("nobody").lines == []
    assert book.read("acme", limit=0).lines == []


def test_following_asks_for_what_came_after() -> None:
    book = LogBook()
    book.add("acme", "one")
    first = book.read("acme")
    book.add("globex", "elsewhere")
    book.add("acme", "two")
    page = book.read("acme", after=first.next)
    assert page.lines == ["two"]
    assert book.read(None, after=first.next).lines == ["elsewhere", "two"]
    assert book.read("acme", after=page.next).lines == []


def test_a_noisy_source_does_not_push_out_a_quiet_one() -> None:
    book = LogBook(keep=10)
    book.add("quiet", "hello")
    for n in range(1000):
        book.add("noisy", str(n))
    assert book.read("quiet").lines == ["hello"]


def test_the_log_stream_keeps_what_it_writes_by_source() -> None:
    out = io.StringIO()
    stream = LogStream(stream=out)
    stream.write_line("supervisor line")
    stream.write_line("worker line", source="acme")
    assert stream.flush(5.0)
    stream.close()
    assert out.getvalue() == "supervisor line\nworker line\n"
    assert stream.book.read("supervisor").lines == ["supervisor line"]
    assert stream.book.read("acme").lines == ["worker line"]
