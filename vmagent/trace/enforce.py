"""Limits act on an instance: freeze, kill and thaw a program's processes (issue 10).

Each exec session's program is put in a cgroup of its own program when it
starts (`SessionHooks.started`): `.../dcp/<instance>/<program>` in the v1
freezer hierarchy (this host), or in the v2 unified hierarchy (the guests'
`cgroup.freeze`).  The OSS's stop orders (heartbeat reply `commands`) name the
program and the tickets its sessions came with; for each matching session:

- `freeze`: the whole cgroup stops at once (v1 `freezer.state`, v2
  `cgroup.freeze`; waited for until the kernel says frozen, 1 s at most).
  Without a usable cgroup: SIGSTOP to the session's process group.
- `kill`: SIGKILL to every pid in the cgroup and to the session's process
  group, then thaw: a SIGKILL sent to a frozen task only lands once it is
  thawed (measured on cgroup v1, docs/OSS.md).  The agent's reaper then
  reports the deaths to the deputies as usual.
- `thaw`: the reverse of freeze.
- `kill` with `"checkpoint": true` (issue 12, a budget stop): each session is
  thawed and suspended first (`Suspension.suspend`: CRIU dump, then the tree
  is killed without its deputy hearing); one that cannot be checkpointed is
  killed as above, with one line saying why.
- `resume` (issue 12): each suspended session of the program is restored with
  its pids and continued (`Suspension.resume`).

Each act is one event (`frozen`, `killed`, `thawed`: a log line now, and in
`events` for the telemetry uplink).  Programs whose session started before a
cgroup could be made fall back to signals, said once in the log.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
import signal
import time
from collections import deque
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from vmagent.exec.session import Session

log = logging.getLogger(__name__)

CGROUP_ROOT = Path("/sys/fs/cgroup")
FREEZE_WAIT = 1.0  # seconds a freeze may take before the kill goes ahead anyway
_SAFE = re.compile(r"[^A-Za-z0-9_.-]")
ACTIONS = ("freeze", "kill", "thaw", "resume")


class Suspension(Protocol):
    """Suspend and resume of sessions (vmagent.checkpoint.local.Checkpointer.suspension)."""

    def holds(self, session: Session) -> bool:
        """Is `session` suspended (dumped and killed, waiting for resume)?"""

    async def suspend(self, session: Session) -> str | None:
        """Checkpoint and kill `session`'s tree; None, or why it could not (it runs on)."""

    async def resume(self, session: Session) -> str | None:
        """Restore a suspended session's tree; None, or why it could not."""

    def drop(self, session: Session) -> None:
        """End a suspended session for good (killed by SIGKILL at its deputy)."""


class Groups(Protocol):
    """Per-program process groups that can be frozen as a whole (a cgroup hierarchy)."""

    kind: str

    def make(self, key: str) -> Path:
        """The group for `key` (created if missing)."""

    def add(self, group: Path, pid: int) -> None:
        """Move process `pid` into `group`."""

    def pids(self, group: Path) -> list[int]:
        """The processes in `group` now."""

    def set_frozen(self, group: Path, frozen: bool) -> None:
        """Ask the kernel to freeze or thaw `group`."""

    def is_frozen(self, group: Path) -> bool:
        """Has the freeze of `group` completed?"""

    def remove(self, group: Path) -> None:
        """Remove an empty group (OSError if it is not empty)."""


class FreezerV1:
    """The cgroup v1 freezer hierarchy (`freezer.state`: THAWED, FREEZING, FROZEN)."""

    kind = "cgroup v1 freezer"

    def __init__(self, base: Path) -> None:
        self.base = base

    def make(self, key: str) -> Path:
        group = self.base / key
        group.mkdir(parents=True, exist_ok=True)
        return group

    def add(self, group: Path, pid: int) -> None:
        (group / "cgroup.procs").write_text(f"{pid}\n")

    def pids(self, group: Path) -> list[int]:
        return _read_pids(group / "cgroup.procs")

    def set_frozen(self, group: Path, frozen: bool) -> None:
        (group / "freezer.state").write_text("FROZEN\n" if frozen else "THAWED\n")

    def is_frozen(self, group: Path) -> bool:
        return (group / "freezer.state").read_text().strip() == "FROZEN"

    def remove(self, group: Path) -> None:
        group.rmdir()


class FreezerV2(FreezerV1):
    """The cgroup v2 unified hierarchy (`cgroup.freeze`, `cgroup.events` frozen 0/1)."""

    kind = "cgroup v2"

    def set_frozen(self, group: Path, frozen: bool) -> None:
        (group / "cgroup.freeze").write_text("1\n" if frozen else "0\n")

    def is_frozen(self, group: Path) -> bool:
        for line in (group / "cgroup.events").read_text().splitlines():
            if line.startswith("frozen "):
                return line.split()[1] == "1"
        return False


def _read_pids(path: Path) -> list[int]:
    try:
        return [int(x) for x in path.read_text().split() if int(x) > 0]
    except (OSError, ValueError):
        return []


def detect(instance: str, root: Path = CGROUP_ROOT) -> Groups | None:
    """The freezer this host offers for `instance`'s programs (None: signals only)."""
    if os.geteuid() != 0:
        return None
    name = _SAFE.sub("_", instance)
    if (root / "freezer" / "cgroup.procs").exists():
        groups: Groups = FreezerV1(root / "freezer" / "dcp" / name)
    elif (root / "cgroup.controllers").exists():
        groups = FreezerV2(root / "dcp" / name)
    else:
        return None
    base = getattr(groups, "base", None)
    if isinstance(base, Path):
        sweep(base.parent)  # what agents that died left behind
    try:
        groups.make(".probe").rmdir()
    except OSError as exc:
        log.warning("limits: no %s for programs (%s): stops use signals", groups.kind, exc)
        return None
    return groups


@dataclass(frozen=True, slots=True)
class Event:
    """One act of enforcement (for the log and the telemetry uplink)."""

    ts: float
    kind: str  # frozen | killed | thawed
    program: str
    pids: tuple[int, ...]
    reason: str
    how: str  # the mechanism: the cgroup kind or "signals"
    took_ms: float


class Enforcer:
    """Session hooks that group programs, and the executor of the OSS's stop orders."""

    def __init__(
        self,
        instance: str,
        groups: Groups | None,
        keep_events: int = 1000,
        on_event: Callable[[str, str, str], object] | None = None,
    ) -> None:
        self.instance = instance
        self.groups = groups
        self.events: deque[Event] = deque(maxlen=keep_events)
        # (program, kind, text) of each act, for the telemetry uplink (logs stream `event`).
        self.on_event = on_event
        self._group_of: dict[Session, Path] = {}
        self._done: set[int] = set()
        self.suspension: Suspension | None = None  # set by the agent where CRIU may work

    # -- SessionHooks ----------------------------------------------------------

    @staticmethod
    def key_of(session: Session) -> str:
        """The cgroup of a session: its OSS program when known, else the session itself."""
        program = getattr(session, "program_id", None)
        if isinstance(program, str) and program:
            return "p-" + _SAFE.sub("_", program)
        return "s-" + session.sid.hex()

    def started(self, session: Session) -> None:
        """Move the new program into its program's cgroup."""
        if self.groups is None or not session.pid:
            return
        try:
            group = self.groups.make(self.key_of(session))
            self.groups.add(group, session.pid)
        except OSError as exc:
            log.warning("limits: pid %d stays outside a cgroup (%s)", session.pid, exc)
            return
        self._group_of[session] = group

    def output(self, session: Session, fd: int, data: bytes) -> None:
        """Nothing."""

    def ended(self, session: Session, status: int) -> None:
        """Drop the session's cgroup once nothing of its program is left in it."""
        group = self._group_of.pop(session, None)
        if group is not None and group not in self._group_of.values():
            self._remove(group)

    def trace_message(self, session: Session, record: dict[bytes, bytes]) -> None:
        """Nothing."""

    def _remove(self, group: Path) -> None:
        assert self.groups is not None
        if self.groups.pids(group):
            return  # an orphan of the program still runs in it: removed at close
        with contextlib.suppress(OSError):
            self.groups.remove(group)

    def close(self, wait: float = 2.0) -> None:
        """The agent stops: kill what is left in its groups, then remove them."""
        if self.groups is None:
            return
        base = getattr(self.groups, "base", None)
        groups = set(self._group_of.values())
        if isinstance(base, Path) and base.is_dir():
            groups |= {g for g in base.iterdir() if g.is_dir()}
        deadline = time.monotonic() + wait
        for group in groups:
            while True:
                pids = self.groups.pids(group)
                for pid in pids:  # orphans outside the program's process group too
                    with contextlib.suppress(OSError):
                        os.kill(pid, signal.SIGKILL)
                with contextlib.suppress(OSError):
                    self.groups.set_frozen(group, False)  # a frozen task dies once thawed
                if not pids or time.monotonic() > deadline:
                    break
                time.sleep(0.01)
            self._remove(group)
        if isinstance(base, Path):
            sweep(base.parent)

    # -- stop orders -----------------------------------------------------------

    def matching(
        self, sessions: Iterable[Session], program: str, tickets: Sequence[str]
    ) -> list[Session]:
        """The live sessions of `program`: started with one of `tickets`, or tagged with it."""
        nonces = set(tickets)
        return [
            s
            for s in sessions
            if s.pid
            and s.status is None
            and (s.nonce in nonces or getattr(s, "program_id", None) == program)
        ]

    async def carry_out(
        self, commands: Sequence[Mapping[str, Any]], sessions: Iterable[Session]
    ) -> list[int]:
        """Carry out the OSS's commands in order; return the ids done (ignored ones too)."""
        done = []
        live = list(sessions)
        for cmd in commands:
            try:
                cid = int(cmd["id"])
                action = str(cmd["action"])
                program = str(cmd["program"])
                reason = str(cmd.get("reason", ""))
                tickets = [str(t) for t in cmd.get("tickets", [])]
                checkpoint = cmd.get("checkpoint") is True
            except (KeyError, TypeError, ValueError):
                log.warning("limits: malformed command from the OSS ignored: %.200r", cmd)
                continue
            if cid in self._done:
                done.append(cid)  # the reply that carried it again crossed our last beat
                continue
            if action in ("migrate", "signal", "network"):
                pass  # vmagent.checkpoint.orders (issue 12), vmagent.trace.signals (issue 11),
                # vmagent.network.orders (issue 13)
            elif action in ("mount", "unmount"):
                pass  # issue 14: vmagent.storage.mounts.StorageOrders carries it out
            elif action in ("checkpoint", "restore"):
                pass  # issue 12, failover: vmagent.checkpoint.periodic.FailoverOrders
            elif action not in ACTIONS:
                log.warning("limits: unknown action %r for program %s ignored", action, program)
            else:
                found = self.matching(live, program, tickets)
                log.info(
                    "limits: %s %s: %d of %d sessions match its %d tickets",
                    action, program, len(found), len(live), len(tickets),
                )  # fmt: skip
                if action == "kill" and checkpoint:
                    found = await self._suspend(program, found)
                elif action == "kill":
                    found = self._drop(program, found)
                if action == "resume":
                    await self._resume(program, found)
                else:
                    await self._act(action, program, reason, found)
            self._done.add(cid)
            if len(self._done) > 10_000:
                self._done.clear()
            done.append(cid)
        return done

    async def _suspend(self, program: str, sessions: list[Session]) -> list[Session]:
        """Suspend what can be checkpointed; the sessions left to kill."""
        left = []
        for s in sessions:
            if self.suspension is not None and self.suspension.holds(s):
                continue  # suspended already: nothing of it runs
            group = self._group_of.get(s)
            if group is not None:
                self._thaw(group)  # a frozen tree cannot be detached by its tracer
            else:
                _signal_group(s.pid, signal.SIGCONT)
            why = (
                "this instance cannot checkpoint"
                if self.suspension is None
                else await self.suspension.suspend(s)
            )
            if why is None:
                self._said(program, "suspended", f"pid {s.pid} checkpointed and stopped")
                continue
            self._said(program, "killed", f"pid {s.pid} cannot be checkpointed ({why}): killed")
            left.append(s)
        return left

    def _drop(self, program: str, sessions: list[Session]) -> list[Session]:
        """A plain kill ends suspended sessions for good; the sessions left to kill."""
        left = []
        for s in sessions:
            if self.suspension is not None and self.suspension.holds(s):
                self.suspension.drop(s)  # nothing of it runs: its pids may be anyone's now
                self._said(program, "killed", f"pid {s.pid} suspended: killed with its images")
            else:
                left.append(s)
        return left

    async def _resume(self, program: str, sessions: list[Session]) -> None:
        for s in sessions:
            if self.suspension is None or not self.suspension.holds(s):
                continue
            why = await self.suspension.resume(s)
            if why is None:
                self._said(program, "resumed", f"pid {s.pid} restored from its checkpoint")
            else:
                self._said(program, "lost", f"pid {s.pid} could not be restored: {why}")

    def _said(self, program: str, kind: str, text: str) -> None:
        log.warning("limits: program %s on %s: %s", program, self.instance, text)
        if self.on_event is not None:
            self.on_event(program, kind, text)

    async def _act(self, action: str, program: str, reason: str, sessions: list[Session]) -> None:
        t0 = time.monotonic()
        grouped = {self._group_of[s] for s in sessions if s in self._group_of}
        loose = [s for s in sessions if s not in self._group_of]
        pids: set[int] = {s.pid for s in sessions}
        for group in grouped:
            assert self.groups is not None
            pids.update(self.groups.pids(group))
        if action == "freeze":
            for group in grouped:
                await self._freeze(group)
            for s in loose:
                _signal_group(s.pid, signal.SIGSTOP)
        elif action == "kill":
            for pid in sorted(pids):
                with contextlib.suppress(OSError):
                    os.kill(pid, signal.SIGKILL)
            for s in sessions:
                _signal_group(s.pid, signal.SIGKILL)
            for group in grouped:  # a frozen task dies only once thawed
                self._thaw(group)
            for s in loose:
                _signal_group(s.pid, signal.SIGCONT)
        else:
            for group in grouped:
                self._thaw(group)
            for s in loose:
                _signal_group(s.pid, signal.SIGCONT)
        how = ", ".join(
            sorted(
                {self.groups.kind for _ in grouped if self.groups is not None}
                | ({"signals"} if loose else set())
            )
        )
        kind = {"freeze": "frozen", "kill": "killed", "thaw": "thawed"}[action]
        ev = Event(
            time.time(),
            kind,
            program,
            tuple(sorted(pids)),
            reason,
            how or "nothing running",
            (time.monotonic() - t0) * 1000,
        )
        self.events.append(ev)
        if self.on_event is not None:
            self.on_event(program, kind, f"{kind} by {ev.how}: {reason}")
        log.warning(
            "limits: program %s %s on %s: %d process(es) %s by %s in %.1f ms: %s",
            program,
            kind,
            self.instance,
            len(ev.pids),
            list(ev.pids)[:20],
            ev.how,
            ev.took_ms,
            reason,
        )

    async def _freeze(self, group: Path) -> None:
        assert self.groups is not None
        try:
            self.groups.set_frozen(group, True)
            deadline = time.monotonic() + FREEZE_WAIT
            while not self.groups.is_frozen(group) and time.monotonic() < deadline:
                await asyncio.sleep(0.002)
        except OSError as exc:
            log.warning("limits: cannot freeze %s: %s", group, exc)

    def _thaw(self, group: Path) -> None:
        assert self.groups is not None
        try:
            self.groups.set_frozen(group, False)
        except OSError as exc:
            log.warning("limits: cannot thaw %s: %s", group, exc)


def sweep(root: Path) -> None:
    """Remove the empty program groups under `root` (`.../dcp`), and it if empty.

    Agents that died (kill -9) leave their groups behind; any agent of the host
    removes those once empty.  A group in use is not empty: rmdir refuses it.
    """
    try:
        instances = [d for d in root.iterdir() if d.is_dir()]
    except OSError:
        return
    for inst in instances:
        with contextlib.suppress(OSError):
            for group in inst.iterdir():
                if group.is_dir():
                    with contextlib.suppress(OSError):
                        group.rmdir()
        with contextlib.suppress(OSError):
            inst.rmdir()
    with contextlib.suppress(OSError):
        root.rmdir()


def _signal_group(pid: int, sig: int) -> None:
    """`sig` to the session's process group (the program is its leader), else to it alone."""
    try:
        os.killpg(pid, sig)
    except OSError:
        with contextlib.suppress(OSError):
            os.kill(pid, sig)
