"""Measured usage merging and the log reorder window (pure)."""

from __future__ import annotations

from oss.telemetry import logs as logmod
from oss.telemetry.usage import Figures, fresh, merge


def test_totals_merge_to_the_highest_and_bring_only_the_growth() -> None:
    first = merge(None, Figures(cpu_us=10, net_rx=5, maxrss_kb=100, syscalls={"storage": 2}))
    assert first.delta.cpu_us == 10 and first.delta.syscalls == {"storage": 2}
    again = merge(first.totals, Figures(cpu_us=10, net_rx=5, syscalls={"storage": 2}))
    assert again.delta.empty() and again.totals == first.totals  # a replayed row adds nothing
    older = merge(first.totals, Figures(cpu_us=4, net_rx=9, syscalls={"ipc": 1}))
    assert (older.delta.cpu_us, older.delta.net_rx, older.delta.syscalls) == (0, 4, {"ipc": 1})
    assert older.totals.cpu_us == 10 and older.totals.maxrss_kb == 100
    assert older.delta.net_bytes == 4


def test_fresh_seq() -> None:
    assert fresh(1, None) and fresh(5, 4) and not fresh(4, 4) and not fresh(3, 4)


def _ln(ts: float, text: str) -> logmod.LogLine:
    return logmod.LogLine(ts, "stdout", text, "n0", 1)


def test_reorder_lets_lines_out_in_time_order_after_the_window() -> None:
    r = logmod.Reorder(1.5)
    r.push(_ln(10.0, "b"), now=100.0)
    r.push(_ln(9.0, "a"), now=100.5)  # a later batch brought an earlier line
    assert r.ready(101.0) == []
    assert [x.text for x in r.ready(101.6)] == ["a", "b"]
    r.push(_ln(12.0, "d"), now=102.0)
    r.push(_ln(11.0, "c"), now=102.1)
    assert [x.text for x in r.rest()] == ["c", "d"]


def test_render() -> None:
    import datetime

    utc = datetime.UTC
    line = logmod.LogLine(3723.25, "stderr", "oops", "n1", 42)
    assert logmod.render(line, utc) == "01:02:03.250 n1 42 stderr oops"
    assert logmod.render(logmod.LogLine(0.0, "log", "x"), utc) == "00:00:00.000 - - log x"
