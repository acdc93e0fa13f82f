"""Availability, pool fill and log chunk decisions (pure)."""

from __future__ import annotations

from oss.compute.availability import Failure, silent
from oss.compute.pool import FillPlan, PoolState, fill_plan
from oss.telemetry.logs import LogLine, LogQuery, chunks_of, cursor, decode, encode, page


def test_silent_instances_past_timeout_only() -> None:
    seen = {"a": 100.0, "b": 96.0, "c": 94.5}
    assert silent(seen, 100.0, 5.0) == [Failure("c", 5.5)]
    assert silent(seen, 100.0, 6.0) == []
    assert silent({}, 0.0, 1.0) == []


def pool(
    target: int, live: int, idle: tuple[str, ...] = (), pending: int = 0, max_size: int = 100
) -> PoolState:
    return PoolState("p", target, max_size, live, idle, pending)


def test_fill_to_warm_target() -> None:
    assert fill_plan(pool(3, 0)) == FillPlan(3, ())
    assert fill_plan(pool(3, 2, ("a",), pending=1)) == FillPlan(1, ())
    # Busy instances do not count as warm: a full pool grows.
    assert fill_plan(pool(2, 5, ())) == FillPlan(2, ())


def test_fill_respects_max_size() -> None:
    assert fill_plan(pool(5, 9, (), max_size=10)) == FillPlan(1, ())
    assert fill_plan(pool(5, 10, (), max_size=10)) == FillPlan(0, ())


def test_surplus_idle_destroyed_newest_first() -> None:
    assert fill_plan(pool(1, 3, ("old", "mid", "new"))) == FillPlan(0, ("new", "mid"))
    assert fill_plan(pool(2, 2, ("a", "b"))) == FillPlan(0, ())


def test_log_chunks_roundtrip_and_order() -> None:
    a = [LogLine(2.0, "stdout", "b", "i1", 1), LogLine(1.0, "stderr", "a", "i1", 1)]
    b = [LogLine(2.0, "log", "c", "i2", None)]
    blob = encode(a)
    assert blob[:4] == b"\x28\xb5\x2f\xfd" and decode(blob) == a
    (ca,) = chunks_of(a)  # a stored chunk is in time order
    got, after, decoded = page([(1, encode(ca)), (2, encode(b))], LogQuery())
    assert [ln.text for _, ln in got] == ["a", "b", "c"]  # chunk id, then position
    assert after is None and decoded == 2


def test_log_page_resumes_at_its_cursor_and_decodes_only_what_it_returns() -> None:
    lines = [LogLine(float(i), "stdout", str(i)) for i in range(5)]
    chunks = [(3, encode(lines)), (8, encode(lines))]
    got, after, decoded = page(iter(chunks), LogQuery(limit=2))
    assert [ln.text for _, ln in got] == ["0", "1"] and after == cursor(3, 2) and decoded == 1
    got, after, _ = page(iter(chunks), LogQuery(cursor=cursor(3, 4), limit=3))
    assert [(cid, ln.text) for cid, ln in got] == [(3, "4"), (8, "0"), (8, "1")]
    assert after == cursor(8, 2)


def test_log_query_filters() -> None:
    lines = [
        LogLine(float(i), "stdout" if i % 2 else "stderr", str(i), f"i{i % 3}") for i in range(10)
    ]
    chunks = [(7, encode(lines))]
    assert [ln.text for _, ln in page(chunks, LogQuery(instance="i0"))[0]] == ["0", "3", "6", "9"]
    assert [ln.text for _, ln in page(chunks, LogQuery(since=3, until=5))[0]] == ["3", "4", "5"]
    only, _, _ = page(chunks, LogQuery(streams=frozenset({"stderr"}), limit=2))
    assert [ln.text for _, ln in only] == ["0", "2"]


def test_compression_actually_compresses() -> None:
    lines = [
        LogLine(float(i), "stdout", "the same line of output again", None) for i in range(1000)
    ]
    assert len(encode(lines)) < 2000
