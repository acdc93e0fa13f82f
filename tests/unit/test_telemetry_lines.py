"""LineSplitter: lines across chunks, the 16 KiB cap, the unterminated rest."""

from __future__ import annotations

from vmagent.telemetry.lines import MAX_LINE, LineSplitter


def test_lines_across_chunks() -> None:
    s = LineSplitter()
    assert s.feed(b"he") == []
    assert s.feed(b"llo\nwor") == ["hello"]
    assert s.feed(b"ld\n\nx") == ["world", ""]
    assert s.flush() == ["x"] and s.flush() == []


def test_a_64_kib_line_is_logged_in_16_kib_pieces() -> None:
    s = LineSplitter()
    line = bytes(range(97, 123)) * 2521  # 65,546 bytes, no newline
    got: list[str] = []
    for i in range(0, len(line), 4096):
        got += s.feed(line[i : i + 4096])
        assert s.pending < MAX_LINE  # memory stays bounded while the line goes on
    got += s.feed(b"\n")
    assert [len(x) for x in got] == [MAX_LINE] * 4 + [len(line) - 4 * MAX_LINE]
    assert "".join(got).encode() == line


def test_invalid_utf8_is_replaced_not_fatal() -> None:
    assert LineSplitter().feed(b"a\xffb\n") == ["a\ufffdb"]


def test_a_line_of_exactly_four_pieces_leaves_no_empty_line() -> None:
    s = LineSplitter()
    assert [len(x) for x in s.feed(b"y" * (4 * MAX_LINE) + b"\nnext\n")] == [MAX_LINE] * 4 + [4]
