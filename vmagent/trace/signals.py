"""The agent's side of signals for pids forked on another instance (issue 11, item 7).

An instance tracer T sends `op=kill req pid sig` for a program pid its
instance does not hold.  A pid below 2^22 is one the home numbered: the
session sends it home through its deputy (`Session`).  A pid above is
`base + pid` of a process forked on some instance (`vmagent.trace.pidspace`),
which only that instance can reach: `Signaller` (a `SessionHooks` observer)
asks the OSS (`POST /v1/agents/programs/{program}/signals`, the instance
token), which orders every instance of the program to send it (a heartbeat
command `signal`); T gets `op=killed req errno` at once: 0 once the OSS took
it, ESRCH when the program runs nowhere the OSS knows (or there is no OSS).

On a `signal` command, `Signaller.on_commands` looks for the pid among the
program's sessions here: the session whose numbering base it falls in, and a
process of that session's tree (never another process of the instance).
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import errno
import logging
import os
from collections.abc import Callable, Iterable, Mapping
from typing import TYPE_CHECKING, Any

import aiohttp

from vmagent.trace import channel
from vmagent.trace.pidspace import PID_MAX_LIMIT, base_for
from vmagent.trace.placer import NO_PROGRAM, OssPlacements

if TYPE_CHECKING:
    from vmagent.exec.session import Session

log = logging.getLogger(__name__)

SYS_TGKILL = {"x86_64": 234, "aarch64": 131}


def forked_elsewhere(pid: int) -> bool:
    """`pid` is a program pid a home cannot hold (a process forked on an instance)."""
    return pid >= PID_MAX_LIMIT


class Signaller:
    """Session hooks: `op=kill` of a pid forked elsewhere goes to the OSS; its orders here."""

    def __init__(
        self, instance: str, oss: OssPlacements | None, sessions: Callable[[], Iterable[Session]]
    ) -> None:
        self.instance = instance
        self.oss = oss
        self.sessions = sessions
        self._tasks: set[asyncio.Task[None]] = set()
        self._done: set[int] = set()  # ids delivered (a reply that carried one is repeated)

    def started(self, session: Session) -> None:
        """Nothing."""

    def output(self, session: Session, fd: int, data: bytes) -> None:
        """Nothing."""

    def ended(self, session: Session, status: int) -> None:
        """Nothing."""

    def trace_message(self, session: Session, record: dict[bytes, bytes]) -> None:
        """`op=kill` of a pid forked elsewhere: ask the OSS (the session sent the rest home)."""
        if record.get(b"op") != channel.OP_KILL:
            return
        try:
            pid, sig = channel.number(record, b"pid"), channel.number(record, b"sig")
        except channel.ChannelError:
            return
        if not forked_elsewhere(pid):
            return
        thread = record.get(b"thread") == b"1"
        try:
            sender = channel.number(record, b"from") if b"from" in record else 0
        except channel.ChannelError:
            sender = 0
        task = asyncio.get_running_loop().create_task(
            self._ask(session, record.get(b"req", b""), pid, sig, thread, sender)
        )
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _ask(
        self, session: Session, req: bytes, pid: int, sig: int, thread: bool, sender: int
    ) -> None:
        view = getattr(session.request, "view", None)
        program = session.program_id or (view.program if view is not None else "")
        err = errno.ESRCH
        if self.oss is not None and program and program != NO_PROGRAM:
            try:
                if await self.oss.signal(program, pid, sig, thread, sender):
                    err = 0
            except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
                log.warning("a signal for pid %d did not reach the OSS: %s", pid, exc)
        session.killed(req, err)

    def on_commands(self, commands: list[dict[str, Any]]) -> None:
        """The OSS's `signal` commands: deliver each to the pid if a session here holds it."""
        for cmd in commands:
            if cmd.get("action") != "signal" or cmd.get("id") in self._done:
                continue
            self.deliver(cmd)
            if isinstance(cmd.get("id"), int):
                if len(self._done) > 10_000:
                    self._done.clear()
                self._done.add(cmd["id"])

    def deliver(self, cmd: Mapping[str, Any]) -> None:
        """Send `cmd`'s signal to its program pid, if a session of its program numbered it."""
        try:
            program, pid, sig = str(cmd["program"]), int(cmd["pid"]), int(cmd["signal"])
        except (KeyError, TypeError, ValueError):
            log.warning("signals: malformed command from the OSS ignored: %.200r", cmd)
            return
        for s in self.sessions():
            view = getattr(s.request, "view", None)
            ours = s.program_id == program or (view is not None and view.program == program)
            if not ours or not s.pid or s.status is not None:
                continue
            real = pid - (s.pid_base or base_for(self.instance))
            if not 0 < real < PID_MAX_LIMIT:
                continue
            sender = cmd.get("sender")
            if cmd.get("thread"):
                tgid = tgid_of(real)  # a thread: of a process of this session
                if tgid and descends(tgid, s.pid):
                    if isinstance(sender, int) and sender > 0:
                        s.tell_sender(tgid, sig, sender, s.request.uid)
                    with contextlib.suppress(OSError):
                        tgkill(tgid, real, sig)
                    return
            elif descends(real, s.pid):
                if isinstance(sender, int) and sender > 0:
                    s.tell_sender(real, sig, sender, s.request.uid)
                with contextlib.suppress(OSError):
                    os.kill(real, sig)
                return

    async def close(self) -> None:
        """Cancel what is in flight."""
        for task in list(self._tasks):
            task.cancel()
        for task in list(self._tasks):
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task


def descends(pid: int, root: int) -> bool:
    """`pid` is `root` or a descendant of it (from /proc; False once gone)."""
    seen = 0
    while pid > 1 and seen < 4096:
        if pid == root:
            return True
        try:
            with open(f"/proc/{pid}/stat", "rb") as f:
                pid = int(f.read().rpartition(b")")[2].split()[1])
        except (OSError, ValueError, IndexError):
            return False
        seen += 1
    return pid == root


def tgid_of(tid: int) -> int:
    """The process (thread group) of thread `tid`, from /proc; 0 when gone."""
    try:
        with open(f"/proc/{tid}/status", "rb") as f:
            for line in f:
                if line.startswith(b"Tgid:"):
                    return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return 0


def tgkill(tgid: int, tid: int, sig: int) -> None:
    """tgkill(2): `sig` to thread `tid` of process `tgid` alone (OSError on failure)."""
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.syscall(SYS_TGKILL[os.uname().machine], tgid, tid, sig) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))
