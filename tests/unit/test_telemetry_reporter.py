"""Reporter: tracer records and session ends become usage rows, events and lines."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Any

from vmagent.exec import protocol as P
from vmagent.telemetry.reporter import Reporter
from vmagent.telemetry.uplink import Uplink


@dataclass
class FakeRequest:
    argv: tuple[bytes, ...] = (b"cc", b"-c", b"a.c")
    parent: bytes = b"home:77"


@dataclass
class FakeSession:
    """What the reporter reads of a session."""

    sid: bytes = b"s1"
    pid: int = 100
    program_id: str | None = "prog_1"
    request: FakeRequest = field(default_factory=FakeRequest)
    finished: bool = True
    outs: dict[int, int] = field(default_factory=dict)


async def _never(raw: bytes) -> dict[str, Any]:
    raise AssertionError("not sent in this test")


def _reporter() -> tuple[Reporter, Uplink]:
    up = Uplink("vm1", _never, interval=3600)
    return Reporter(up, clock=lambda: 50.0), up


def _usage(up: Uplink) -> list[dict[str, Any]]:
    return list(up._usage.values())


def _items(up: Uplink, kind: str) -> list[dict[str, Any]]:
    return [row for k, row, _ in up._items if k == kind]


def test_traced_session_rows_carry_exit_status_and_tracer_figures() -> None:
    async def go() -> None:
        r, up = _reporter()
        s: Any = FakeSession()
        r.started(s)
        r.output(s, 1, b"hello\npart")
        r.trace_message(
            s,
            {b"op": b"event", b"kind": b"exec", b"pid": b"100", b"ts": b"51.5",
             b"argv": P.record([b"cc", b"-c", b"a.c"])},
        )  # fmt: skip
        r.trace_message(
            s,
            {b"op": b"usage", b"pid": b"100", b"final": b"1", b"cpu_us": b"2500000",
             b"maxrss_kb": b"900", b"rchar": b"10", b"sys": b"storage=3,compute=1"},
        )  # fmt: skip
        assert [u["final"] for u in _usage(up)] == [False]  # held for its exit status
        r.trace_message(
            s, {b"op": b"event", b"kind": b"exit", b"pid": b"100", b"status": b"3", b"ts": b"53"}
        )
        assert [u["final"] for u in _usage(up)] == [False]  # the program's row waits for
        r.ended(s, 3 << 8)  # its session to end and its output to drain
        r._settle(s)
        (row,) = _usage(up)
        assert (row["final"], row["cpu_us"], row["exit_status"], row["syscalls"]) == (
            True,
            2_500_000,
            3,
            {"storage": 3, "compute": 1},
        )
        assert (row["parent_instance"], row["parent_pid"], row["argv"]) == (
            "home",
            77,
            ["cc", "-c", "a.c"],
        )
        events = [(e["kind"], e["ts"], e.get("status")) for e in _items(up, "events")]
        assert events == [("exec", 51.5, None), ("exit", 53.0, 3)]
        assert [(ln["stream"], ln["text"]) for ln in _items(up, "logs")] == [
            ("stdout", "hello"),
            ("stdout", "part"),
        ]

    asyncio.run(go())


def test_untraced_session_gets_its_exec_and_exit_from_the_agent() -> None:
    async def go() -> None:
        r, up = _reporter()
        s: Any = FakeSession()
        r.started(s)
        r.ended(s, 9)  # killed by SIGKILL
        r._settle(s)
        kinds = [(e["kind"], e.get("signal")) for e in _items(up, "events")]
        assert kinds == [("exec", None), ("signal", 9)]
        (row,) = _usage(up)
        assert row["final"] and row["signal"] == 9

    asyncio.run(go())


def test_sessions_without_a_program_are_not_reported() -> None:
    async def go() -> None:
        r, up = _reporter()
        s: Any = FakeSession(program_id=None)
        r.started(s)
        r.output(s, 1, b"x\n")
        assert up.waiting == 0 and r.watches == {}

    asyncio.run(go())


def test_a_final_row_after_its_exit_event_goes_at_once() -> None:
    """The instance tracer sends the exit event, then the usage (ProcessUsage)."""

    async def go() -> None:
        r, up = _reporter()
        s: Any = FakeSession()
        r.started(s)
        r.trace_message(
            s, {b"op": b"event", b"kind": b"exit", b"pid": b"101", b"signal": b"15", b"ts": b"9"}
        )
        r.trace_message(s, {b"op": b"usage", b"pid": b"101", b"final": b"1", b"cpu_us": b"7"})
        (row,) = [u for u in _usage(up) if u["pid"] == 101]
        assert (row["final"], row["signal"], row["cpu_us"]) == (True, 15, 7)

    asyncio.run(go())


def test_the_programs_own_peak_wins_over_rusage() -> None:
    """rusage's maxrss counts what the child had of the agent before its exec."""

    async def go() -> None:
        r, up = _reporter()
        s: Any = FakeSession()
        r.started(s)
        r.trace_message(
            s, {b"op": b"event", b"kind": b"exit", b"pid": b"101", b"status": b"0", b"ts": b"9"}
        )
        r.trace_message(
            s,
            {b"op": b"usage", b"pid": b"101", b"final": b"1", b"maxrss_kb": b"40000",
             b"hwm_kb": b"1200"},
        )  # fmt: skip
        (row,) = [u for u in _usage(up) if u["pid"] == 101]
        assert row["maxrss_kb"] == 1200

    asyncio.run(go())


def test_rows_from_odd_records_still_fit_the_oss_models() -> None:
    """One row the OSS refuses would cost the whole batch: rows are cut to fit."""
    from oss import models as m

    async def go() -> None:
        r, up = _reporter()
        s: Any = FakeSession(request=FakeRequest(argv=(b"x" * 10_000,) * 300, parent=b"!!:12"))
        r.started(s)
        r.trace_message(
            s,
            {b"op": b"event", b"kind": b"exec", b"pid": b"101", b"ts": b"1",
             b"argv": P.record([b"\xff" * 9000] * 400)},
        )  # fmt: skip
        r.trace_message(
            s, {b"op": b"event", b"kind": b"exit", b"pid": b"101", b"signal": b"99", b"ts": b"2"}
        )
        r.trace_message(
            s,
            {b"op": b"usage", b"pid": b"101", b"final": b"1", b"cpu_us": b"9" * 30,
             b"sys": b"storage=3,bogus=4,ipc=99999999999999999999999"},
        )  # fmt: skip
        r.trace_message(s, {b"op": b"usage", b"pid": b"99999999999", b"final": b"1"})
        r.output(s, 2, b"y" * 70_000 + b"\n")
        r.ended(s, 0)
        r._settle(s)
        for row in _usage(up):
            m.UsageRow.model_validate(row, strict=True)
        for kind, row, _ in up._items:
            (m.EventRow if kind == "events" else m.AgentLogLine).model_validate(row, strict=True)
        (child,) = [u for u in _usage(up) if u["pid"] == 101]
        assert child["syscalls"] == {"storage": 3} and "cpu_us" not in child
        assert len(child["argv"]) == 256 and all(len(a) == 4096 for a in child["argv"])

    asyncio.run(go())


def test_a_programs_view_is_walked_when_new_then_every_30_s(tmp_path: Any) -> None:
    from types import SimpleNamespace

    (tmp_path / "data").write_bytes(b"z" * 100_000)
    view = SimpleNamespace(maps=(("/mnt/v", str(tmp_path)),))

    async def go() -> None:
        r, up = _reporter()
        r.loop = asyncio.get_running_loop()
        s: Any = FakeSession(request=FakeRequest())
        s.request.view = view
        r.started(s)
        r.walk_views(1000.0)
        await asyncio.sleep(0)
        assert up._storage["prog_1"] >= 96  # kB allocated
        up._storage.clear()
        r.walk_views(1010.0)  # not due yet
        await asyncio.sleep(0)
        assert up._storage == {}
        r.walk_views(1031.0)
        await asyncio.sleep(0)
        assert "prog_1" in up._storage

    asyncio.run(go())


def test_program_events_go_to_each_session_of_the_program() -> None:
    async def go() -> None:
        r, up = _reporter()
        r.started(FakeSession(sid=b"s1", pid=100))  # type: ignore[arg-type]
        r.started(FakeSession(sid=b"s2", pid=200))  # type: ignore[arg-type]
        r.started(FakeSession(sid=b"s3", pid=300, program_id="other"))  # type: ignore[arg-type]
        assert r.program_event("prog_1", "frozen", "hard budget") == 2
        got = [(e["pid"], e["kind"], e["text"]) for e in _items(up, "events")]
        assert got == [(100, "frozen", "hard budget"), (200, "frozen", "hard budget")]

    asyncio.run(go())
