"""The telemetry repository of measured usage: the `processes` table, the report
sequence per instance and the measured network bytes billing takes.

An agent's report is applied in one write transaction: its sequence number (a
replayed batch is dropped whole), every usage row (merged into the process's
stored totals, `oss.telemetry.usage`), its log lines and events (log chunks of the
program).  An instance reports only for programs it runs or ran: placed there now,
or already recorded there; rows for any other program are refused and counted.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from typing import Any

from oss import models as m
from oss.compute import programs
from oss.db.store import Conn, Store, to_json
from oss.errors import NotFound
from oss.telemetry import logs as logmod
from oss.telemetry import usage
from oss.telemetry.store import chunk_blobs, insert_chunks

MAX_PROCESS_ROWS = 1000  # per-process breakdown in a program's metrics: the newest ones


@dataclass(frozen=True, slots=True)
class Applied:
    """What one report did."""

    acked_seq: int
    fresh: bool
    refused: int = 0
    # (program, instance, pid, increment) of every row that added something
    deltas: tuple[tuple[str, str, int, usage.Figures], ...] = ()
    ended: tuple[str, ...] = ()  # programs that got a final row


def stored(r: sqlite3.Row) -> usage.Figures:
    """The totals of a stored process row."""
    return usage.Figures(
        **{k: int(r[k]) for k in usage.COUNTERS},
        maxrss_kb=int(r["maxrss_kb"]),
        syscalls=json.loads(r["syscalls_json"]),
    )


def reported(u: m.UsageRow) -> usage.Figures:
    """The totals of a reported usage row."""
    return usage.Figures(
        **{k: getattr(u, k) for k in usage.COUNTERS},
        maxrss_kb=u.maxrss_kb,
        syscalls={str(k): v for k, v in u.syscalls.items()},
    )


def report_lines(instance: str, report: m.AgentReport) -> dict[str, list[logmod.LogLine]]:
    """The log lines a report adds, per program: output lines and events (stream `event`)."""
    out: dict[str, list[logmod.LogLine]] = {}
    for ln in report.logs:
        out.setdefault(ln.program_id, []).append(
            logmod.LogLine(ln.ts, ln.stream, ln.text, instance, ln.pid)
        )
    for ev in report.events:
        text = logmod.event_text(ev.kind, ev.argv, ev.status, ev.signal, ev.text)
        out.setdefault(ev.program_id, []).append(
            logmod.LogLine(ev.ts, "event", text, instance, ev.pid)
        )
    return out


class Processes:
    """Measured usage per process; the report sequence of each instance."""

    def __init__(self, db: Store) -> None:
        self._db = db

    async def apply(
        self, instance: str, report: m.AgentReport, placed: Collection[str] = ()
    ) -> Applied:
        """Apply one agent report (durable on return) unless its batch was applied before.

        `placed`: programs placed on the instance lately (their placement may already
        be released when the first report of a short process arrives)."""
        # Compress outside the writer: the transaction only inserts.
        blobs = {p: chunk_blobs(lines) for p, lines in report_lines(instance, report).items()}
        now = self._db.clock()

        def op(c: Conn) -> Applied:
            row = c.execute("SELECT seq FROM report_seq WHERE instance=?", (instance,)).fetchone()
            last = None if row is None else int(row[0])
            if not usage.fresh(report.seq, last):
                assert last is not None
                return Applied(last, fresh=False)
            allowed: dict[str, str | None] = {}  # program -> account (None: refused)

            def account_of(program_id: str) -> str | None:
                if program_id not in allowed:
                    allowed[program_id] = _may_report(c, program_id, instance, placed)
                return allowed[program_id]

            refused = 0
            deltas = []
            ended = []
            for u in report.usage:
                if account_of(u.program_id) is None:
                    refused += 1
                    continue
                d = _merge_row(c, instance, u, now)
                if d is not None:
                    deltas.append((u.program_id, instance, u.pid, d))
                if u.final:
                    ended.append(u.program_id)
            for ev in report.events:
                if ev.kind == "lost" and account_of(ev.program_id) is not None:
                    c.execute(
                        "UPDATE processes SET state='lost', ended=? WHERE program_id=?"
                        " AND instance=? AND pid=? AND state='running'",
                        (ev.ts, ev.program_id, instance, ev.pid),
                    )
            for st in report.storage:
                if account_of(st.program_id) is None:
                    refused += 1
                    continue
                c.execute(
                    "INSERT INTO measured_storage VALUES(?,?,?,?) ON CONFLICT(program_id,"
                    " instance) DO UPDATE SET kb=excluded.kb, at=excluded.at",
                    (st.program_id, instance, st.kb, now),
                )
            for program_id, bl in blobs.items():
                acct = account_of(program_id)
                if acct is None:
                    refused += sum(b[3] for b in bl)
                    continue
                insert_chunks(c, acct, program_id, bl)
            c.execute(
                "INSERT INTO report_seq VALUES(?,?) ON CONFLICT(instance)"
                " DO UPDATE SET seq=excluded.seq",
                (instance, report.seq),
            )
            return Applied(report.seq, True, refused, tuple(deltas), tuple(sorted(set(ended))))

        return await self._db.write(op)

    async def page(
        self, account_id: str, program_id: str, offset: int, limit: int
    ) -> tuple[list[sqlite3.Row], int]:
        """One page of the program's processes in start order, and how many it has."""

        def op(c: Conn) -> tuple[list[sqlite3.Row], int]:
            programs.check_program(c, program_id, account_id)
            total = c.execute(
                "SELECT COUNT(*) FROM processes WHERE program_id=?", (program_id,)
            ).fetchone()[0]
            rows = c.execute(
                "SELECT * FROM processes WHERE program_id=? ORDER BY started, instance, pid"
                " LIMIT ? OFFSET ?",
                (program_id, limit, offset),
            ).fetchall()
            return rows, int(total)

        return await self._db.read(op)

    async def digest(self, program_ids: Sequence[str]) -> dict[str, tuple[Any, ...]]:
        """Per program: (rows, ended rows, newest start, migrated rows): what changes when a
        process is placed, ends, is lost or moves (the web view's live updates)."""

        def op(c: Conn) -> dict[str, tuple[Any, ...]]:
            marks = ",".join("?" * len(program_ids))
            rows = c.execute(
                "SELECT program_id, COUNT(*), COUNT(ended), MAX(started),"
                " SUM(state='migrated') + 2 * SUM(state='lost')"
                f" FROM processes WHERE program_id IN ({marks}) GROUP BY program_id",
                tuple(program_ids),
            ).fetchall()
            return {r[0]: tuple(r[1:]) for r in rows}

        if not program_ids:
            return {}
        return await self._db.read(op)

    async def processes(self, account_id: str, program_id: str) -> list[sqlite3.Row]:
        """The account's program's processes in start order (NotFound for another's)."""

        def op(c: Conn) -> list[sqlite3.Row]:
            programs.check_program(c, program_id, account_id)
            return c.execute(
                "SELECT * FROM processes WHERE program_id=? ORDER BY started, instance, pid",
                (program_id,),
            ).fetchall()

        return await self._db.read(op)

    async def migrated(
        self, program_id: str, instance: str, session_pid: int, to: str, freeze_ms: float,
        now: float, reason: str | None = None,
    ) -> None:  # fmt: skip
        """A session moved off `instance`: its running rows there end as `migrated`, naming
        the target, the freeze and why it moved (the target reports the same pids as rows
        of its own)."""

        def op(c: Conn) -> None:
            c.execute(
                "UPDATE processes SET state='migrated', ended=?, moved_to=?, freeze_ms=?,"
                " move_reason=? WHERE program_id=? AND instance=? AND state='running'"
                " AND (pid=? OR session_pid=?)",
                (now, to, freeze_ms, reason, program_id, instance, session_pid, session_pid),
            )

        await self._db.write(op)

    async def running_on(self, instance: str) -> list[sqlite3.Row]:
        """Every running process an instance reported, of any program."""

        def op(c: Conn) -> list[sqlite3.Row]:
            return c.execute(
                "SELECT * FROM processes WHERE instance=? AND state='running'", (instance,)
            ).fetchall()

        return await self._db.read(op)

    async def newest(self, program_id: str, limit: int = MAX_PROCESS_ROWS) -> list[sqlite3.Row]:
        """The program's newest processes (the caller checked the account)."""
        return await self._db.read(
            lambda c: c.execute(
                "SELECT * FROM processes WHERE program_id=? ORDER BY started DESC LIMIT ?",
                (program_id, limit),
            ).fetchall()
        )

    async def totals(self) -> list[sqlite3.Row]:
        """Summed figures per (program, instance): seeds the metrics after a restart."""
        return await self._db.read(
            lambda c: c.execute(
                "SELECT program_id, instance, sum(cpu_us) cpu_us, max(maxrss_kb) maxrss_kb,"
                " sum(rchar) rchar, sum(wchar) wchar, sum(rbytes) rbytes, sum(wbytes) wbytes,"
                " sum(net_rx) net_rx, sum(net_tx) net_tx,"
                " json_group_array(json(syscalls_json)) calls"
                " FROM processes GROUP BY program_id, instance"
            ).fetchall()
        )

    async def lose(self, instance: str, now: float) -> list[sqlite3.Row]:
        """Mark the running processes of a failed instance lost; return them."""

        def op(c: Conn) -> list[sqlite3.Row]:
            rows = c.execute(
                "SELECT * FROM processes WHERE instance=? AND state='running'", (instance,)
            ).fetchall()
            c.execute(
                "UPDATE processes SET state='lost', ended=? WHERE instance=? AND state='running'",
                (now, instance),
            )
            return rows

        return await self._db.write(op)


def _may_report(c: Conn, program_id: str, instance: str, placed: Collection[str]) -> str | None:
    """The program's account if `instance` may report for it (placed there now or lately,
    or already recorded there), else None."""
    try:
        p = programs.program_row(c, program_id, None)
    except NotFound:
        return None
    if (
        program_id in placed
        or programs.is_placed(c, program_id, instance)
        or c.execute(
            "SELECT 1 FROM processes WHERE program_id=? AND instance=? LIMIT 1",
            (program_id, instance),
        ).fetchone()
    ):
        return str(p["account_id"])
    return None


def _merge_row(c: Conn, instance: str, u: m.UsageRow, now: float) -> usage.Figures | None:
    """Fold one usage row into `processes`; the increment it brought (None: nothing)."""
    key = (u.program_id, instance, u.pid, u.started)
    old = c.execute(
        "SELECT * FROM processes WHERE program_id=? AND instance=? AND pid=? AND started=?", key
    ).fetchone()
    if old is not None and old["state"] != "running":
        return None  # its final figures are in: a later sample cannot add to them
    res = usage.merge(None if old is None else stored(old), reported(u))
    t = res.totals
    vals: dict[str, Any] = dict(
        cpu_us=t.cpu_us, maxrss_kb=t.maxrss_kb, rchar=t.rchar, wchar=t.wchar, rbytes=t.rbytes,
        wbytes=t.wbytes, net_rx=t.net_rx, net_tx=t.net_tx, syscalls_json=to_json(t.syscalls),
        state="exited" if u.final else "running", ended=now if u.final else None,
        exit_status=u.exit_status, signal=u.signal,
    )  # fmt: skip
    if old is None:
        c.execute(
            "INSERT INTO processes(program_id, instance, pid, started, parent_instance,"
            " parent_pid, session_pid, argv, "
            + ", ".join(vals)
            + ") VALUES(?,?,?,?,?,?,?,?"
            + ",?" * len(vals)
            + ")",
            (*key, u.parent_instance, u.parent_pid, u.session, to_json(u.argv), *vals.values()),
        )
    else:
        if u.argv:
            vals["argv"] = to_json(u.argv)
        c.execute(
            "UPDATE processes SET "
            + ", ".join(f"{k}=?" for k in vals)
            + " WHERE program_id=? AND instance=? AND pid=? AND started=?",
            (*vals.values(), *key),
        )
    d = res.delta
    if d.net_bytes:
        c.execute(
            "INSERT INTO measured_net VALUES(?,?,0) ON CONFLICT(program_id)"
            " DO UPDATE SET bytes=bytes+excluded.bytes",
            (u.program_id, d.net_bytes),
        )
    return None if d.empty() else d


def take_net(c: Conn) -> dict[str, int]:
    """Measured network bytes per program not billed yet, marked billed (in the caller's
    transaction: billing's metering pass, so a failed pass bills them next time)."""
    rows = c.execute(
        "SELECT program_id, bytes - billed FROM measured_net WHERE bytes > billed"
    ).fetchall()
    c.execute("UPDATE measured_net SET billed=bytes WHERE bytes > billed")
    return {r[0]: int(r[1]) for r in rows}


STORAGE_FRESH = 120.0  # seconds a storage walk stands for the program's storage


def storage_mb(c: Conn, program_id: str, now: float) -> int | None:
    """The storage a program's view holds in MB, as measured within STORAGE_FRESH
    seconds (the largest figure of its instances: they walk the same view); None when
    no instance measured it lately."""
    r = c.execute(
        "SELECT max(kb) FROM measured_storage WHERE program_id=? AND at >= ?",
        (program_id, now - STORAGE_FRESH),
    ).fetchone()
    return None if r is None or r[0] is None else -(-int(r[0]) // 1024)


def process_row(r: sqlite3.Row) -> m.ProcessRow:
    """The wire form of a stored process."""
    parent = (
        f"{r['parent_instance']}:{r['parent_pid']}" if r["parent_instance"] is not None else None
    )
    return m.ProcessRow(
        pid=r["pid"], instance=r["instance"], started=r["started"], parent=parent,
        session=r["session_pid"],
        argv=json.loads(r["argv"]), state=r["state"], ended=r["ended"],
        exit_status=r["exit_status"], signal=r["signal"], cpu_seconds=r["cpu_us"] / 1e6,
        max_rss_kb=r["maxrss_kb"], io_read_bytes=r["rchar"], io_write_bytes=r["wchar"],
        storage_read_bytes=r["rbytes"], storage_write_bytes=r["wbytes"],
        net_rx_bytes=r["net_rx"], net_tx_bytes=r["net_tx"],
        syscalls_by_service=json.loads(r["syscalls_json"]),
        moved_to=r["moved_to"], freeze_ms=r["freeze_ms"], move_reason=r["move_reason"],
    )  # fmt: skip


def measured_counters(f: usage.Figures, instance: str) -> m.MetricsReport:
    """An increment (or totals) as the metrics collector takes it."""
    return m.MetricsReport(
        instance=instance,
        syscalls={k: v for k, v in f.syscalls.items() if k in _SERVICES},  # type: ignore[misc]
        cpu_seconds=f.cpu_us / 1e6,
        memory_bytes=f.maxrss_kb * 1024 if f.maxrss_kb else None,
        io_read_bytes=f.rchar,
        io_write_bytes=f.wchar,
        net_rx_bytes=f.net_rx,
        net_tx_bytes=f.net_tx,
    )


_SERVICES = frozenset(("compute", "memory", "storage", "network", "ipc", "local"))


def seeded(rows: Sequence[sqlite3.Row]) -> list[tuple[str, str, usage.Figures]]:
    """(program, instance, totals) from `Processes.totals` rows."""
    out = []
    for r in rows:
        calls: dict[str, int] = {}
        for d in json.loads(r["calls"]):
            for k, v in d.items():
                calls[k] = calls.get(k, 0) + int(v)
        f = usage.Figures(
            cpu_us=r["cpu_us"], rchar=r["rchar"], wchar=r["wchar"], rbytes=r["rbytes"],
            wbytes=r["wbytes"], net_rx=r["net_rx"], net_tx=r["net_tx"],
            maxrss_kb=r["maxrss_kb"], syscalls=calls,
        )  # fmt: skip
        out.append((r["program_id"], r["instance"], f))
    return out
