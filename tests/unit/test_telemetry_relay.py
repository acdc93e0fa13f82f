"""RelayFilter: a nested placement's line is logged once, whichever copy comes first."""

from __future__ import annotations

from oss.telemetry.logs import LogLine, RelayFilter

A = ("nodeA", 10)  # a placed make
B = ("nodeB", 20)  # a cc placed by it
G = ("nodeC", 30)  # a process placed by the cc


def _ln(text: str, stream: str = "stdout") -> LogLine:
    return LogLine(1.0, stream, text)


def test_the_relayed_copy_after_the_original_is_dropped() -> None:
    f = RelayFilter(hold=1.0)
    f.link(B, A)
    assert f.offer(B, _ln("cc: warning"), now=0.0) == [_ln("cc: warning")]
    assert f.offer(A, _ln("cc: warning"), now=0.1) == []  # A relays it: dropped
    assert f.offer(A, _ln("make: done"), now=0.2) == []  # held while B lives
    assert f.due(0.5) == [] and f.due(1.3) == [_ln("make: done")]


def test_the_relayed_copy_before_the_original_is_dropped_when_it_comes() -> None:
    f = RelayFilter(hold=1.0)
    f.link(B, A)
    assert f.offer(A, _ln("x"), now=0.0) == []  # held: B's copy may come later
    assert f.offer(B, _ln("x"), now=0.5) == [_ln("x")]
    assert f.due(5.0) == []  # the held copy was dropped


def test_streams_differ_and_identical_lines_count_once_each() -> None:
    f = RelayFilter(hold=1.0)
    f.link(B, A)
    f.ended(B)
    for _ in range(2):
        assert f.offer(B, _ln("same"), now=0.0) == [_ln("same")]
    assert f.offer(A, _ln("same", "stderr"), now=0.0) == [_ln("same", "stderr")]
    assert f.offer(A, _ln("same"), now=0.0) == []
    assert f.offer(A, _ln("same"), now=0.0) == []
    assert f.offer(A, _ln("same"), now=0.0) == [_ln("same")]  # A's own, third copy


def test_a_grandchilds_line_is_logged_once_through_two_relays() -> None:
    f = RelayFilter(hold=1.0)
    f.link(B, A)
    f.link(G, B)
    f.ended(G)
    f.ended(B)
    assert f.offer(G, _ln("deep"), now=0.0) == [_ln("deep")]
    assert f.offer(B, _ln("deep"), now=0.0) == []
    assert f.offer(A, _ln("deep"), now=0.0) == []


def test_links_from_the_processes_record_and_the_readers_dedupe() -> None:
    from types import SimpleNamespace as Row

    from oss.telemetry.logs import drop_relayed, relay_links

    rows = [
        Row(instance="nodeA", pid=10, session=10, parent="home:1"),  # the placed make
        Row(instance="nodeA", pid=11, session=10, parent=None),  # its deputy for the cc
        Row(instance="nodeB", pid=20, session=20, parent="nodeA:11"),  # the cc
    ]
    links = relay_links(rows)
    assert links == [(B, A)]
    lines = [
        LogLine(1.0, "stdout", "cc: warning", "nodeB", 20),
        LogLine(1.1, "event", "exit 0", "nodeB", 20),
        LogLine(1.2, "stdout", "cc: warning", "nodeA", 10),  # relayed through the deputy
        LogLine(1.3, "stdout", "make: done", "nodeA", 10),
    ]
    assert [(ln.instance, ln.text) for ln in drop_relayed(lines, links)] == [
        ("nodeB", "cc: warning"),
        ("nodeB", "exit 0"),
        ("nodeA", "make: done"),
    ]


def test_the_reader_drops_a_copy_stamped_before_its_original() -> None:
    """The relaying instance may stamp its copy first (two agents, two clocks)."""
    from oss.telemetry.logs import RelayDropper, drop_relayed

    lines = [
        LogLine(1.0, "stdout", "x", "nodeA", 10),  # the copy, stamped first
        LogLine(1.1, "stdout", "x", "nodeB", 20),
        LogLine(1.2, "stdout", "x", "nodeA", 10),  # A's own line, same text
    ]
    got = drop_relayed(lines, [(B, A)])
    assert [(ln.instance, ln.ts) for ln in got] == [("nodeB", 1.1), ("nodeA", 1.2)]
    follow = RelayDropper(hold=1.0)
    follow.link([(B, A)])
    assert follow(lines[:1], now=0.0) == []  # held: a child runs under A
    assert follow(lines[1:2], now=0.1) == [lines[1]]  # its original drops the held copy
    assert follow([], now=5.0) == [] and follow.rest() == []
