"""The exec wire protocol: framing, records, sequencing and replay."""

from __future__ import annotations

import pytest

from vmagent.exec import protocol as p


def test_frames_survive_arbitrary_splits() -> None:
    frames = [
        (p.HELLO, 0, 0, p.unpairs({b"k": b"v"})),
        (p.DATA, 1, 1, b"x" * 70000),
        (p.EOF, 1, 2, b""),
        (p.ACK, 0, 7, b""),
    ]
    wire = b"".join(p.frame(k, fd, pl, seq) for k, fd, seq, pl in frames)
    for step in (1, 3, 17, 4096, len(wire)):
        parser = p.FrameParser()
        got = []
        for i in range(0, len(wire), step):
            got += parser.feed(wire[i : i + step])
        assert got == frames
        assert parser.pending() == 0


def test_bad_header_is_rejected() -> None:
    with pytest.raises(p.FrameError):
        p.FrameParser().feed(p.HEADER.pack(99, 0, 0, 0))
    with pytest.raises(p.FrameError):
        p.FrameParser().feed(p.HEADER.pack(p.DATA, 0, p.MAX_PAYLOAD + 1, 0))


def test_record_round_trip_and_truncation() -> None:
    items = [b"", b"a", b"\x00\xff" * 10, "é".encode()]
    assert p.unrecord(p.record(items)) == items
    with pytest.raises(p.FrameError):
        p.unrecord(p.record(items)[:-1])
    with pytest.raises(p.FrameError):
        p.pairs(p.record([b"only-key"]))


def test_outbox_replays_exactly_the_unacknowledged() -> None:
    out = p.Outbox(limit=100)
    sent = [out.add(p.DATA, 1, bytes([i]) * 10) for i in range(5)]
    assert len(out) == 5
    out.ack(2)
    assert out.after(2) == sent[2:]
    # The peer may report an older seq than it acked (it lost nothing new).
    assert out.after(3) == sent[3:]
    assert out.held == sum(len(s) for s in sent[2:])
    out.ack(5)
    assert len(out) == 0 and out.held == 0


def test_outbox_reports_full_past_its_limit() -> None:
    out = p.Outbox(limit=2 * (p.HEADER_SIZE + 10))
    out.add(p.DATA, 1, b"a" * 10)
    assert not out.full()
    out.add(p.DATA, 1, b"a" * 10)
    assert out.full()
    out.ack(1)
    assert not out.full()


def test_inbox_drops_duplicates_and_detects_gaps() -> None:
    inbox = p.Inbox()
    assert inbox.accept(1, 10)
    assert inbox.accept(2, 10)
    assert not inbox.accept(2, 10)
    assert not inbox.accept(1, 10)
    with pytest.raises(p.FrameError, match="gap"):
        inbox.accept(4, 10)


def test_inbox_asks_for_an_ack_after_enough_bytes() -> None:
    inbox = p.Inbox()
    seq = 0
    while not inbox.ack_due():
        seq += 1
        inbox.accept(seq, 1 << 16)
    assert inbox.acked() == seq
    assert not inbox.ack_due()
