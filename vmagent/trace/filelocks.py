"""The instance tracer's side of file locks (issue 14): lock calls go to the agent.

`LockForwarder` stops flock and fcntl's lock commands (`vmagent.exec.filelocks`
has the why and the records): it asks the agent, `Defer`s the call (the
thread stays stopped, the rest of the tree runs on) and turns the answer into
the call's decision: the deputy's result (with F_GETLK's struct flock written
back), or `Allow` for a descriptor the instance's own kernel serves.

A waiting call is interruptible as natively: while calls wait, T looks at their
threads' pending signals (`interrupting`, every `POLL` seconds); one the thread
catches, or one that kills it, ends the wait with EINTR, and the deputy undoes
a grant that arrives after that.  Stop signals and signals whose default is to
be ignored do not interrupt (natively the wait resumes after them).
"""

from __future__ import annotations

import errno
import logging
from collections.abc import Callable
from dataclasses import dataclass

from tracer.coordinator import Allow, Complete, Decision, Defer, SyscallCall
from tracer.decode import signed
from vmagent.exec import filelocks as L
from vmagent.trace.channel import Record

log = logging.getLogger(__name__)

POLL = 0.05  # s between looks at a waiting thread's pending signals
LOCK_CALLS = frozenset({"flock", "fcntl"})
# Signals that leave a waiting lock call waiting unless caught: default-ignored
# (CHLD, CONT, URG, WINCH) and the stop signals (STOP, TSTP, TTIN, TTOU).
NOT_INTERRUPTING = frozenset({17, 18, 23, 28, 19, 20, 21, 22})

Send = Callable[[bytes], bool]
ReadMemory = Callable[[int, int, int], bytes]
Signals = Callable[[int], "SignalState | None"]


@dataclass(frozen=True, slots=True)
class SignalState:
    """A thread's signal masks (from /proc/TID/status)."""

    pending: int  # SigPnd | ShdPnd
    blocked: int
    ignored: int
    caught: int


def interrupts(state: SignalState) -> bool:
    """Would a pending signal interrupt a blocking lock call natively?"""
    live = state.pending & ~state.blocked & ~state.ignored
    for sig in range(1, 65):
        bit = 1 << (sig - 1)
        if live & bit and (state.caught & bit or sig not in NOT_INTERRUPTING):
            return True
    return False


def signal_state(tid: int) -> SignalState | None:
    """The signal masks of thread `tid` (None once it is gone)."""
    fields: dict[bytes, int] = {}
    try:
        with open(f"/proc/{tid}/status", "rb") as f:
            for line in f:
                key, _, value = line.partition(b":")
                if key in (b"SigPnd", b"ShdPnd", b"SigBlk", b"SigIgn", b"SigCgt"):
                    fields[key] = int(value.strip(), 16)
    except (OSError, ValueError):
        return None
    return SignalState(
        fields.get(b"SigPnd", 0) | fields.get(b"ShdPnd", 0),
        fields.get(b"SigBlk", 0),
        fields.get(b"SigIgn", 0),
        fields.get(b"SigCgt", 0),
    )


@dataclass(slots=True)
class Waiting:
    """A lock call sent to the agent, not answered yet."""

    req: int
    call: SyscallCall
    may_block: bool
    out: int  # where F_GETLK's struct flock goes (0: nowhere)


class LockForwarder:
    """Lock calls of one session's tree, answered by the agent (and the deputy)."""

    def __init__(self, send: Send, read_memory: ReadMemory, signals: Signals = signal_state):
        self._send = send
        self._read = read_memory
        self._signals = signals
        self._req = 0
        self.waiting: dict[int, Waiting] = {}  # req -> call

    def on_call(self, call: SyscallCall) -> Decision | Defer:
        """flock, or fcntl with a lock command: ask the agent; anything else runs."""
        fd = signed(call.args[0], 32)
        if call.name == "flock":
            cmd, arg, out = 0, b"%d" % (call.args[1] & 0xFFFFFFFF), 0
        else:
            cmd = call.args[1] & 0xFFFFFFFF
            if cmd not in L.LOCK_CMDS:
                return Allow()
            try:
                arg = self._read(call.tid, call.args[2], L.FLOCK_SIZE)
            except OSError:
                return Complete(-errno.EFAULT)
            if len(arg) != L.FLOCK_SIZE:
                return Complete(-errno.EFAULT)
            out = call.args[2] if cmd in L.GET_CMDS else 0
        if fd < 0:
            return Allow()  # the kernel's EBADF
        self._req += 1
        record = L.lock_record(self._req, call.pid, fd, call.name, cmd, arg)
        if not self._send(record):
            return Allow()  # no agent: the instance's kernel is all there is
        may_block = L.blocking(call.name, cmd, call.args[1] & 0xFFFFFFFF)
        self.waiting[self._req] = Waiting(self._req, call, may_block, out)
        return Defer()

    def answer(self, record: Record) -> tuple[int, Decision] | None:
        """The decision an agent's `op=locked`/`op=native` gives, for its thread."""
        op = record.get(b"op")
        if op not in (L.OP_LOCKED, L.OP_NATIVE):
            return None
        raw = record.get(b"req", b"")
        wait = self.waiting.pop(int(raw), None) if raw.isdigit() else None
        if wait is None:
            return None  # cancelled meanwhile
        if op == L.OP_NATIVE:
            return wait.call.tid, Allow()
        try:
            result = int(record.get(b"result", b""))
        except ValueError:
            result = -errno.EIO
        data = record.get(b"data", b"")
        writes: tuple[tuple[int, bytes], ...] = ()
        if result == 0 and wait.out and len(data) == L.FLOCK_SIZE:
            writes = ((wait.out, data),)
        return wait.call.tid, Complete(result, writes)

    def interrupting(self) -> list[tuple[int, Decision]]:
        """EINTR for the waiting calls a pending signal interrupts (their requests cancelled)."""
        out: list[tuple[int, Decision]] = []
        for req, wait in list(self.waiting.items()):
            if not wait.may_block:
                continue
            state = self._signals(wait.call.tid)
            if state is not None and not interrupts(state):
                continue
            del self.waiting[req]
            self._send(L.cancel_record(req))
            out.append((wait.call.tid, Complete(-errno.EINTR)))
        return out

    def gone(self, pid: int) -> None:
        """Process `pid` ended: what its threads waited for is given up."""
        for req, wait in list(self.waiting.items()):
            if wait.call.pid == pid:
                del self.waiting[req]
                self._send(L.cancel_record(req))

    def blocked(self) -> bool:
        """Whether some call may wait long (T then looks at signals every POLL)."""
        return any(w.may_block for w in self.waiting.values())
