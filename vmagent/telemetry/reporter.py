"""The telemetry observer of exec sessions: what a placed program does, to the uplink.

For each session of an OSS program (`session.program_id`, vouched for by its exec
ticket) it reports:
- every line the program writes on stdout/stderr (`LineSplitter` per descriptor;
  the terminal path is untouched: this sees the data after it was queued);
- the instance tracer's records (`trace_message`): `op=event` as lifecycle events
  and `op=usage` as final usage rows;
- live totals of the program's processes every `interval` seconds (/proc, for
  budgets), and, for processes whose final figures the tracer did not send, the
  last sample as final figures once the session has ended.

Rows carry `started` so a reused pid is another process; a pid's start time is
taken once (the session start, a spawn event or /proc) and kept.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from net.sockdiag import NetMeter
from tracer.syscalls import Service
from vmagent.exec import protocol as P
from vmagent.telemetry import sampler
from vmagent.telemetry.lines import LineSplitter
from vmagent.telemetry.uplink import Row, Uplink

if TYPE_CHECKING:
    from vmagent.exec.session import Session

log = logging.getLogger(__name__)

STREAMS = {1: "stdout", 2: "stderr"}
SETTLE = 0.05  # seconds between looks for a session's output to be drained
STORAGE_EVERY = 30.0  # seconds between walks of a program's view (storage billing)


@dataclass
class Watch:
    """What the reporter keeps for one live session."""

    program: str
    root: int
    parent: tuple[str, int] | None
    live: dict[int, float] = field(default_factory=dict)  # pid -> started
    last: dict[int, dict[str, int]] = field(default_factory=dict)  # pid -> last sample
    argv: dict[int, list[str]] = field(default_factory=dict)
    splitters: dict[int, LineSplitter] = field(default_factory=dict)
    traced: bool = False  # the instance tracer reports this session
    ended: bool = False
    start_ts: float = 0.0
    held: dict[int, Row] = field(default_factory=dict)  # final rows awaiting their exit
    exits: dict[int, tuple[int | None, int | None]] = field(default_factory=dict)
    root_final: Row | None = None  # the program's final row, sent when the session settles
    drained: bool = False  # the session's output ended: its last lines were sent
    gone: set[int] = field(default_factory=set)  # pids whose final row the tracer sent
    view_dirs: tuple[str, ...] = ()  # the real directories the program's view maps


# What the OSS accepts (oss.models): a row outside these bounds would have the OSS
# refuse the whole batch, so rows are cut to fit here.
MAX_ARGV = 256
MAX_ARG = 4096
SERVICES = frozenset(s.value for s in Service)
NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$")


def _text(v: bytes) -> str:
    return v.decode("utf-8", "replace")


def _argv(items: list[bytes] | tuple[bytes, ...]) -> list[str]:
    return [_text(a[: MAX_ARG * 4])[:MAX_ARG] for a in items[:MAX_ARGV]]


def _int(record: dict[bytes, bytes], key: bytes) -> int | None:
    v = record.get(key)
    if v is None or not 0 < len(v) < 20:
        return None
    try:
        n = int(v)
    except ValueError:
        return None
    return n if 0 <= n <= 2**62 else None


def view_dirs(session: Session) -> tuple[str, ...]:
    """The real directories of the session's view (`--map VIRTUAL=REAL`), if any."""
    view = getattr(session.request, "view", None)  # vmagent.exec.view.View (chunk B)
    maps = getattr(view, "maps", ()) or ()
    return tuple(sorted({real for _virtual, real in maps if isinstance(real, str)}))


def parse_parent(raw: bytes) -> tuple[str, int] | None:
    """`INSTANCE:PID` of the process that placed this one (None if absent or malformed)."""
    inst, _, pid = raw.decode("ascii", "replace").rpartition(":")
    if not NAME.match(inst) or not pid.isdigit() or not 0 < int(pid) < 2**31:
        return None
    return inst, int(pid)


class Reporter:
    """SessionHooks that feed the uplink (install with `service.hooks.add`)."""

    def __init__(
        self, uplink: Uplink, interval: float = 1.0, clock: Callable[[], float] = time.time
    ) -> None:
        self.uplink = uplink
        self.interval = interval
        self.clock = clock
        self.watches: dict[bytes, Watch] = {}  # session id -> watch
        self.loop: asyncio.AbstractEventLoop | None = None
        # session id -> (raw wait status, when reaped)
        self._final_status: dict[bytes, tuple[int, float]] = {}
        self.net = NetMeter()  # per-process TCP bytes (samples, tracer exit stops)
        self._walked: dict[str, float] = {}  # program -> when its view was last walked

    # -- hooks -------------------------------------------------------------------------
    def started(self, session: Session) -> None:
        """Watch a session of an OSS program."""
        program = session.program_id
        if program is None or not session.pid:
            return
        parent = parse_parent(getattr(session.request, "parent", b""))
        w = Watch(program, session.pid, parent)
        now = self.clock()
        argv = _argv(session.request.argv)
        w.live[session.pid] = round(now, 6)
        w.argv[session.pid] = argv
        w.start_ts = now
        w.view_dirs = view_dirs(session)
        self.watches[session.sid] = w
        self.uplink.usage(self._row(w, session.pid, {}))  # the record waits for it
        self.uplink.urgent()

    def output(self, session: Session, fd: int, data: bytes) -> None:
        """Cut the program's output into log lines."""
        w = self.watches.get(session.sid)
        stream = STREAMS.get(fd)
        if w is None or stream is None:
            return
        sp = w.splitters.get(fd)
        if sp is None:
            sp = w.splitters[fd] = LineSplitter()
        lines = sp.feed(data)
        if lines:
            now = self.clock()
            for text in lines:
                self.uplink.line(w.program, w.root, stream, text, now)

    def ended(self, session: Session, status: int) -> None:
        """The session's program was reaped: settle its figures shortly."""
        w = self.watches.get(session.sid)
        if w is None:
            return
        w.ended = True
        w.last.setdefault(w.root, {})
        self._final_status[session.sid] = (status, self.clock())
        (self.loop or asyncio.get_running_loop()).call_soon(self._settle, session)

    def trace_message(self, session: Session, record: dict[bytes, bytes]) -> None:
        """A record of the session's instance tracer."""
        w = self.watches.get(session.sid)
        if w is None:
            return
        op = record.get(b"op")
        if op == b"migrated":
            # The tree runs on another instance now, whose agent reports it from here on
            # (the OSS ends these rows as `migrated`): no final rows from this husk.
            self.uplink.urgent()
            del self.watches[session.sid]
            return
        w.traced = True
        pid = _int(record, b"pid")
        if pid is None or not 0 < pid <= 2**31:
            return
        if op == b"event":
            self._trace_event(w, pid, record)
        elif op == b"usage":
            self._trace_usage(w, pid, record)

    def program_event(self, program_id: str, kind: str, text: str = "") -> int:
        """A lifecycle event of a whole program here (`frozen`, `killed`: limits), logged
        for each of its sessions on this instance; how many."""
        now = self.clock()
        n = 0
        for w in list(self.watches.values()):
            if w.program == program_id:
                self.uplink.event(self._event(w, w.root, kind, now, text=text[:4096]))
                n += 1
        if n:
            self.uplink.urgent()
        return n

    # -- tracer records -----------------------------------------------------------------
    def _trace_event(self, w: Watch, pid: int, record: dict[bytes, bytes]) -> None:
        kind = _text(record.get(b"kind", b""))
        ts_raw = record.get(b"ts")
        try:
            ts = float(ts_raw) if ts_raw else self.clock()
        except ValueError:
            ts = self.clock()
        try:
            argv = _argv(P.unrecord(record.get(b"argv", b"")))
        except P.FrameError:
            argv = []
        if kind == "spawn":
            w.gone.discard(pid)  # a reused pid: a new process
            w.live.setdefault(pid, round(ts, 6))
            return  # the exec that follows is what the log shows
        if kind == "exec":
            w.live.setdefault(pid, round(ts, 6))
            if argv:
                w.argv[pid] = argv
            self.uplink.event(self._event(w, pid, "exec", ts, argv=argv))
        elif kind == "exit":
            sig = _int(record, b"signal")
            sig = sig if sig is not None and 0 < sig <= 64 else None
            status = _int(record, b"status")
            status = status if status is not None and status <= 255 else None
            if sig:
                self.uplink.event(self._event(w, pid, "signal", ts, signal=sig))
            else:
                self.uplink.event(self._event(w, pid, "exit", ts, status=status))
            w.exits[pid] = (status, sig)
            row = w.held.pop(pid, None)  # its usage came first: it waited for this
            if row is not None:
                self._send_final(w, pid, row)

    def _trace_usage(self, w: Watch, pid: int, record: dict[bytes, bytes]) -> None:
        figures = {
            k: v
            for k in (
                "cpu_us",
                "maxrss_kb",
                "rchar",
                "wchar",
                "rbytes",
                "wbytes",
                "net_rx",
                "net_tx",
            )
            if (v := _int(record, k.encode())) is not None and v >= 0
        }
        hwm = _int(record, b"hwm_kb")
        if hwm is not None and hwm > 0:
            # The peak of the program itself (VmHWM, reset at exec): rusage's maxrss also
            # counts the agent's memory the child had before it exec'd.
            figures["maxrss_kb"] = hwm
        calls: dict[str, int] = {}
        for part in record.get(b"sys", b"").split(b","):
            name, _, n = part.partition(b"=")
            if _text(name) in SERVICES and n.isdigit() and len(n) < 19:
                calls[_text(name)] = int(n)
        final = record.get(b"final") in (b"1", b"true")
        if final:
            # What the exit stop read of the sockets still held (io counters present:
            # the stop happened), plus the sockets the samples saw closed before.
            at_exit = (
                (figures.get("net_rx", 0), figures.get("net_tx", 0)) if "rchar" in figures else None
            )
            figures["net_rx"], figures["net_tx"] = self.net.final(pid, at_exit)
        row = self._row(w, pid, figures, final=final)
        if calls:
            row["syscalls"] = calls
        if final:
            w.live.pop(pid, None)
            w.last.pop(pid, None)
            w.gone.add(pid)  # a sample read just before its end must not bring it back
            if pid in w.exits:
                self._send_final(w, pid, row)
            else:
                w.held[pid] = row  # sent with the exit status the exit event brings
            return
        self.uplink.usage(row)

    def _send_final(self, w: Watch, pid: int, row: Row) -> None:
        """A final row with the process's exit status or signal.

        The session's program's own row waits for the session to settle: once its
        final figures are in, every line of its output is too (one batch)."""
        status, sig = w.exits.pop(pid)
        if sig:
            row["signal"] = sig
        elif status is not None and 0 <= status <= 255:
            row["exit_status"] = status
        if pid == w.root and not w.drained:
            w.root_final = row
        else:
            self.uplink.usage(row)

    # -- live samples --------------------------------------------------------------------
    async def run(self) -> None:
        """Sample the live processes of every watched session each `interval` seconds;
        walk the views of the programs running here each STORAGE_EVERY seconds."""
        self.loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(self.interval)
            with contextlib.suppress(OSError):
                await asyncio.to_thread(self.sample_once)
            with contextlib.suppress(OSError):
                await asyncio.to_thread(self.walk_views, self.loop.time())

    def walk_views(self, now: float) -> None:
        """The storage each program's view holds, from the real directories it maps
        (off the loop): a program new here at once, then every STORAGE_EVERY seconds.
        A walk cut at its cap reports nothing: the OSS bills the declared figure."""
        dirs: dict[str, set[str]] = {}
        for w in list(self.watches.values()):
            dirs.setdefault(w.program, set()).update(w.view_dirs)
        for program in list(self._walked):
            if program not in dirs:
                del self._walked[program]  # nothing of it runs here any more
        for program, real in dirs.items():
            if not real or now - self._walked.get(program, -STORAGE_EVERY) < STORAGE_EVERY:
                continue
            self._walked[program] = now
            kb = sampler.storage_kb(sorted(real))
            if kb is not None and self.loop is not None:
                self.loop.call_soon_threadsafe(self.uplink.storage, program, kb)

    def sample_once(self) -> None:
        """One sample of every watched session (off the loop: it reads /proc)."""
        roots = {w.root: w for w in list(self.watches.values())}
        members = sampler.sessions_members(set(roots))
        self.net.look([st.pid for group in members.values() for st in group])
        rows: list[Row] = []
        at = round(self.clock(), 3)  # when these totals were read (issue 12: profiles)
        for root, w in roots.items():
            for st in members.get(root, ()):
                if st.pid in w.gone:
                    continue
                if st.pid not in w.live:
                    w.live[st.pid] = st.started
                fig = sampler.usage_of(st.pid)
                if fig is None:
                    continue
                fig["net_rx"], fig["net_tx"] = self.net.totals(st.pid)
                w.last[st.pid] = fig
                rows.append({**self._row(w, st.pid, fig), "at": at})
        if rows and self.loop is not None:
            self.loop.call_soon_threadsafe(self._send_samples, rows)

    def _send_samples(self, rows: list[Row]) -> None:
        for row in rows:
            self.uplink.usage(row)

    # -- end of a session ------------------------------------------------------------------
    def _settle(self, session: Session) -> None:
        """The end of a session, in steps, looked at every SETTLE seconds.

        1. Once its output is drained: the unterminated lines go, then the program's
           final row if the tracer sent it (so a final row means its lines are in).
        2. Once its tracer is done (or it had none): events and final rows the
           tracer did not send are made up from the last samples, and the watch ends.
           Until then the session's orphans are still traced: they keep being sampled.
        """
        w = self.watches.get(session.sid)
        if w is None:
            return
        loop = self.loop or asyncio.get_running_loop()
        if not (session.finished or not session.outs):
            loop.call_later(SETTLE, self._settle, session)
            return
        now = self.clock()
        if not w.drained:
            w.drained = True
            for fd, sp in w.splitters.items():
                for text in sp.flush():
                    self.uplink.line(w.program, w.root, STREAMS[fd], text, now)
            self.uplink.urgent()
        if w.root_final is not None:
            self.uplink.usage(w.root_final)
            w.root_final = None
        if getattr(session, "trace_sock", None) is not None:  # the tracer still runs
            loop.call_later(SETTLE if w.root in w.live else self.interval, self._settle, session)
            return
        status, reaped = self._final_status.pop(session.sid, (None, now))
        if not w.traced:  # no tracer told the root's exec and exit: say them here
            argv = w.argv.get(w.root, [])
            self.uplink.event(self._event(w, w.root, "exec", w.start_ts, argv=argv))
            if status is not None and os.WIFSIGNALED(status):
                self.uplink.event(
                    self._event(w, w.root, "signal", reaped, signal=os.WTERMSIG(status))
                )
            elif status is not None:
                self.uplink.event(
                    self._event(w, w.root, "exit", reaped, status=os.WEXITSTATUS(status))
                )
        for row in w.held.values():  # exit events that never came
            self.uplink.usage(row)
        for pid in list(w.live):
            fig = dict(w.last.get(pid, {}))
            fig["net_rx"], fig["net_tx"] = self.net.final(pid, None)
            row = self._row(w, pid, fig, final=True)
            if pid == w.root and status is not None:
                if os.WIFSIGNALED(status):
                    row["signal"] = os.WTERMSIG(status)
                else:
                    row["exit_status"] = os.WEXITSTATUS(status)
            self.uplink.usage(row)
        del self.watches[session.sid]
        self.uplink.urgent()

    # -- rows -----------------------------------------------------------------------------
    def _row(self, w: Watch, pid: int, figures: dict[str, int], final: bool = False) -> Row:
        row: Row = {
            "program_id": w.program,
            "pid": pid,
            "started": w.live.get(pid) or round(self.clock(), 6),
            "session": w.root,
            "final": final,
            **figures,
        }
        if pid == w.root and w.parent is not None:
            row["parent_instance"], row["parent_pid"] = w.parent
        argv = w.argv.get(pid)
        if argv:
            row["argv"] = argv
        return row

    def _event(self, w: Watch, pid: int, kind: str, ts: float, **kw: Any) -> Row:
        row: Row = {"program_id": w.program, "pid": pid, "ts": ts, "kind": kind}
        row.update({k: v for k, v in kw.items() if v is not None and v != []})
        return row
