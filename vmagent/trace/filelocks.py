"""The instance tracer's side of file locks (issue 14): lock calls go to the agent.

`LockForwarder` stops flock and fcntl's lock commands (`vmagent.exec.filelocks`
has the why and the records): it asks the agent, `Defer`s the call (the
thread stays stopped, the rest of the tree runs on) and turns the answer into
the call's decision: the deputy's result (with F_GETLK's struct flock written
back), or `Allow` for a descriptor the instance's own kernel serves.

Lock traffic has a socket of its own (a SEQPACKET pair whose other end T
hands the agent once, `op=lockchan`), so answers never wake T's channel
watcher.  An answer that comes within `WINDOW` (an uncontended lock: one round
trip) completes the call at once, with no deferral; a call still unanswered
then is deferred, and the runner's waker watches the lock socket until it is.

A waiting call is interruptible as natively: while calls wait, T looks at their
threads' pending signals (`interrupting`, every `POLL` seconds); one the thread
catches, or one that kills it, ends the wait with EINTR, and the deputy undoes
a grant that arrives after that.  Stop signals and signals whose default is to
be ignored do not interrupt (natively the wait resumes after them).
"""

from __future__ import annotations

import errno
import logging
import os
import select
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass

from tracer.coordinator import Allow, Complete, Decision, Defer, SyscallCall
from tracer.decode import signed
from vmagent.exec import filelocks as L
from vmagent.trace import channel
from vmagent.trace.channel import Record

log = logging.getLogger(__name__)

# Where each instance mounts the program's namespace (vmagent.storage.mounts.FS_ROOT):
# its dcpfs serves locks for every instance, so it must name lockers in the program's
# pids, which this tracer knows (vmagent.storage.dcpfs.PID_XATTR, GETLK_XATTR).
NAMESPACE_ROOT = "/run/dcp/fs/"
PID_XATTR = "user.dcp.lockpid"
GETLK_XATTR = "user.dcp.getlk"

POLL = 0.05  # s between looks at a waiting thread's pending signals
WINDOW = 0.05  # s T waits for an answer before deferring the call
LOCK_CALLS = frozenset({"flock", "fcntl"})
# Signals that leave a waiting lock call waiting unless caught: default-ignored
# (CHLD, CONT, URG, WINCH) and the stop signals (STOP, TSTP, TTIN, TTOU).
NOT_INTERRUPTING = frozenset({17, 18, 23, 28, 19, 20, 21, 22})

Send = Callable[[bytes, tuple[int, ...]], bool]
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


def interrupted(tids: frozenset[int]) -> bool:
    """Would a pending signal interrupt the lock call of one of these threads?"""
    for tid in tids:
        state = signal_state(tid)
        if state is None or interrupts(state):
            return True
    return False


@dataclass(slots=True)
class Waiting:
    """A lock call sent to the agent, not answered yet."""

    req: int
    call: SyscallCall
    may_block: bool
    out: int  # where F_GETLK's struct flock goes (0: nowhere)


class LockForwarder:
    """Lock calls of one session's tree, answered by the agent (and the deputy).

    `hand_over(message, fds)` sends a record with descriptors on T's channel
    (False: no agent).
    """

    def __init__(
        self,
        hand_over: Send,
        read_memory: ReadMemory,
        signals: Signals = signal_state,
        window: float = WINDOW,
    ):
        self._hand_over = hand_over
        self._read = read_memory
        self._signals = signals
        self.window = window
        self._req = 0
        self.sock: socket.socket | None = None  # T's end of the lock socket
        self._broken = False
        self.waiting: dict[int, Waiting] = {}  # req -> call
        self.ready: list[tuple[int, Decision]] = []  # answers read for deferred calls
        # A process's program pid (set by the session's coordinator); named: the
        # (pid, program pid) pairs dcpfs was told already.
        self.program: Callable[[int], int] | None = None
        self._named: set[tuple[int, int]] = set()

    def _socket(self) -> socket.socket | None:
        if self.sock is None and not self._broken:
            ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
            try:
                handed = self._hand_over(channel.encode(L.OP_LOCKCHAN), (theirs.fileno(),))
            finally:
                theirs.close()
            if handed:
                self.sock = ours
            else:
                ours.close()
                self._broken = True
        return self.sock

    def _send(self, message: bytes) -> bool:
        sock = self._socket()
        if sock is None:
            return False
        try:
            sock.send(message)
        except OSError:
            return False
        return True

    def drain(self, wait_for: int = 0, timeout: float = 0.0) -> Decision | None:
        """Read the answers there are (into `ready`); the decision for `wait_for`, if it came.

        Waits up to `timeout` for that one.
        """
        sock = self.sock
        if sock is None:
            return None
        deadline = time.monotonic() + timeout
        while True:
            left = max(0.0, deadline - time.monotonic())
            try:
                if not select.select([sock], [], [], left)[0]:
                    return None
                data, fds = channel.receive(sock)
            except OSError:
                return None
            for fd in fds:
                os.close(fd)
            if not data:
                self.sock = None
                self._broken = True
                sock.close()
                return None
            try:
                record = channel.decode(data)
            except channel.ChannelError:
                continue
            req = record.get(b"req", b"")
            found = self.answer(record)
            if found is None:
                continue
            if wait_for and req == b"%d" % wait_for:
                return found[1]
            self.ready.append(found)

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
        req = self._req
        record = L.lock_record(req, call.pid, fd, call.name, cmd, arg)
        if not self._send(record):
            return Allow()  # no agent: the instance's kernel is all there is
        may_block = L.blocking(call.name, cmd, call.args[1] & 0xFFFFFFFF)
        self.waiting[req] = Waiting(req, call, may_block, out)
        decided = self.drain(req, self.window)
        return decided if decided is not None else Defer()

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
            # F_GETLK on this kernel: its l_pid is shown in the program's pids at exit.
            if not wait.out:
                self._name_locker(wait.call)
            return wait.call.tid, Allow(observe_result=bool(wait.out))
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

    def _namespace_file(self, call: SyscallCall) -> str | None:
        """The /proc path of the call's descriptor if it is a file of the program's
        namespace (dcpfs), else None."""
        link = f"/proc/{call.pid}/fd/{signed(call.args[0], 32)}"
        try:
            return link if os.readlink(link).startswith(NAMESPACE_ROOT) else None
        except OSError:
            return None

    def _name_locker(self, call: SyscallCall) -> None:
        """Tell dcpfs the locker's program pid before its lock call runs (what another
        instance's F_GETLK then shows)."""
        if self.program is None:
            return
        named = (call.pid, self.program(call.pid))
        if named[0] == named[1] or named in self._named:
            return
        path = self._namespace_file(call)
        if path is None:
            return
        try:
            os.setxattr(path, PID_XATTR, b"%d %d" % named)
        except OSError as exc:  # an older dcpfs: the holder shows its instance's pid
            log.debug("lock holder not named to dcpfs: %s", exc)
            return
        self._named.add(named)

    def getlk_result(
        self, call: SyscallCall, result: int, program: Callable[[int], int]
    ) -> Complete | None:
        """A native F_GETLK's holder pid (this instance's number) in the program's pids;
        on the namespace's files, the holder dcpfs found (on any instance)."""
        if result != 0:
            return None
        addr = call.args[2]
        data = self._read(call.tid, addr, L.FLOCK_SIZE)
        if len(data) != L.FLOCK_SIZE or int.from_bytes(data[:2], "little") == L.F_UNLCK:
            return None
        real = int.from_bytes(data[L.L_PID : L.L_PID + 4], "little", signed=True)
        mapped = program(real) if real > 0 else real
        path = self._namespace_file(call)
        if path is not None:
            try:
                mapped = int(os.getxattr(path, f"{GETLK_XATTR}.{call.pid}"))
            except (OSError, ValueError):
                pass  # an older dcpfs: as the kernel says
        if mapped == real:
            return None
        out = data[: L.L_PID] + mapped.to_bytes(4, "little", signed=True) + data[L.L_PID + 4 :]
        return Complete(0, ((addr, out),))

    def interrupt_all(self) -> list[tuple[int, Decision]]:
        """EINTR for every waiting call (the tree is being detached for a checkpoint)."""
        out = self.take_ready()
        for req, wait in list(self.waiting.items()):
            del self.waiting[req]
            self._send(L.cancel_record(req))
            out.append((wait.call.tid, Complete(-errno.EINTR)))
        return out

    def abandon(self) -> list[tuple[int, Decision]]:
        """No agent any more: every waiting call runs on this kernel as it is."""
        out: list[tuple[int, Decision]] = [*self.take_ready()]
        out += [(w.call.tid, Allow()) for w in self.waiting.values()]
        self.waiting.clear()
        return out

    def take_ready(self) -> list[tuple[int, Decision]]:
        """The answers `drain` set aside, for their threads."""
        ready, self.ready = self.ready, []
        return ready

    def blocked_tids(self) -> frozenset[int]:
        """The threads whose calls may wait long (their signals are watched)."""
        return frozenset(w.call.tid for w in self.waiting.values() if w.may_block)

    def blocked(self) -> bool:
        """Whether some call may wait long (T then looks at signals every POLL)."""
        return any(w.may_block for w in self.waiting.values())
