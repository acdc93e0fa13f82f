"""The tracer's per-stop state machine: `Machine.step(stop) -> actions`.

Pure: it never calls ptrace, reads memory or talks to the coordinator.  The
runner (`tracer.runner`) decodes each waitpid result into a `Stop` value, feeds
it here, and carries out the returned `Action` values.  The machine keeps its
bookkeeping in place rather than returning a new state per stop: a copy of every
thread's state per syscall would cost O(threads) on the hottest path.

Stops and actions are immutable values, `typing.NamedTuple`s rather than frozen
dataclasses: a dataclass costs ~0.7 ms to define (six generated methods, each
compiled at import) and its frozen `__init__` is slower on the hottest path; the
two dozen here made `tracer.machine` the largest part of dcptrace's start-up.
Being tuples, two values of different types with equal fields compare equal:
code that must tell them apart matches on the type, as `step` does.

Invariants:
- every stop of a live tracee yields exactly one `Resume` for it, except a
  seccomp stop answered by `Consult` and an exit answered by `Observe`: those
  resume once the runner feeds back `Decided` / `Observed`;
- a thread has a `pending` call exactly between its seccomp stop and the
  matching syscall-exit stop (or until a `Complete` decision skips the call).
"""

from __future__ import annotations

import enum
import errno
import signal
import time
from collections.abc import Callable
from typing import Any, NamedTuple

from tracer.coordinator import (
    Allow,
    Complete,
    Decision,
    ProcessEvent,
    ProcessExec,
    ProcessExited,
    ProcessSpawned,
    Rewrite,
)

STOP_SIGNALS = frozenset({signal.SIGSTOP, signal.SIGTSTP, signal.SIGTTIN, signal.SIGTTOU})
TTY_STOP_SIGNALS = frozenset({signal.SIGTSTP, signal.SIGTTIN, signal.SIGTTOU})


class Mode(enum.IntEnum):
    """How to restart a stopped tracee (the ptrace request number)."""

    CONT = 7
    SYSCALL = 24  # run to the syscall-exit stop
    LISTEN = 0x4208  # stay in group-stop, but report SIGCONT


# ---- stops (what waitpid said, decoded) -------------------------------------


class SeccompStop(NamedTuple):
    tid: int
    nr: int
    args: tuple[int, ...]
    foreign: bool = False  # a call of another ABI (i386 int 0x80, x32): nr is not ours


class SyscallExitStop(NamedTuple):
    tid: int
    rval: int


class ForkStop(NamedTuple):
    tid: int
    child: int
    thread: bool


class ExecStop(NamedTuple):
    tid: int  # the thread-group leader after exec
    former: int  # the thread that called execve
    argv: tuple[str, ...]


class SignalStop(NamedTuple):
    tid: int
    sig: int


class GroupStop(NamedTuple):
    tid: int
    sig: int


class EventStop(NamedTuple):
    """Any other ptrace-stop: a new child's first stop, a wake-up after LISTEN."""

    tid: int


class ExitingStop(NamedTuple):
    """PTRACE_EVENT_EXIT: the thread is exiting; /proc still shows its process."""

    tid: int


class ExitStop(NamedTuple):
    tid: int
    exit_status: int | None
    signal: int | None
    cpu_us: int = 0  # utime + stime of wait4's rusage
    maxrss_kb: int = 0


class Decided(NamedTuple):
    """The coordinator's answer to a `Consult`."""

    tid: int
    decision: Decision


class Observed(NamedTuple):
    """The final result of a call after `Coordinator.on_result`."""

    tid: int
    rval: int


Stop = (
    SeccompStop | SyscallExitStop | ForkStop | ExecStop | SignalStop | GroupStop
    | EventStop | ExitingStop | ExitStop | Decided | Observed
)  # fmt: skip


# ---- actions (what the runner must do) ---------------------------------------


class Resume(NamedTuple):
    tid: int
    mode: Mode
    sig: int = 0


class Consult(NamedTuple):
    """Build a SyscallCall for the pending call and ask the coordinator."""

    tid: int
    nr: int
    args: tuple[int, ...]


class ApplyRewrite(NamedTuple):
    tid: int
    rewrite: Rewrite


class ApplyComplete(NamedTuple):
    tid: int
    complete: Complete


class RestoreArgs(NamedTuple):
    """Put back the argument registers a rewrite changed (the ABI preserves them)."""

    tid: int


class Observe(NamedTuple):
    tid: int
    rval: int


class Record(NamedTuple):
    """One finished syscall, for --trace lines, --summary and --record."""

    tid: int
    nr: int
    args: tuple[int, ...]
    rval: int
    seconds: float


class Notify(NamedTuple):
    event: ProcessEvent


class Meter(NamedTuple):
    """Measure process `pid` now: its last live thread is stopped on its way out."""

    pid: int


class MirrorStop(NamedTuple):
    """The main process stopped from the terminal: stop dcptrace too, as a shell expects."""

    sig: int


Action = (
    Resume | Consult | ApplyRewrite | ApplyComplete | RestoreArgs | Observe | Record
    | Notify | Meter | MirrorStop
)  # fmt: skip


class Pending:
    """The call a thread is in, from its entry stop to its exit stop."""

    __slots__ = ("nr", "args", "started", "want_exit", "rewritten", "observe", "exec_seen")

    def __init__(
        self, nr: int, args: tuple[int, ...], started: float, want_exit: bool = False
    ) -> None:
        self.nr = nr
        self.args = args
        self.started = started
        self.want_exit = want_exit
        self.rewritten = False
        self.observe = False
        self.exec_seen = False


class Thread:
    """One traced thread (its `tgid` is its process)."""

    __slots__ = ("tid", "tgid", "pending")

    def __init__(self, tid: int, tgid: int) -> None:
        self.tid = tid
        self.tgid = tgid
        self.pending: Pending | None = None


class Process:
    """One traced process: its threads, argv and how it ended."""

    __slots__ = ("pid", "ppid", "argv", "exit_status", "signal", "threads", "exiting", "metered")

    def __init__(
        self,
        pid: int,
        ppid: int,
        argv: tuple[str, ...] = (),
        exit_status: int | None = None,
        signal: int | None = None,
        threads: set[int] | None = None,
    ) -> None:
        self.pid = pid
        self.ppid = ppid
        self.argv = argv
        self.exit_status = exit_status
        self.signal = signal
        self.threads: set[int] = set() if threads is None else threads
        self.exiting: set[int] = set()  # threads seen at their exit stop
        self.metered = False


class Machine:
    """Bookkeeping of every traced thread and process, advanced one stop at a time."""

    def __init__(
        self,
        main_pid: int,
        intercept: frozenset[int],
        trace_all: bool,
        argv: tuple[str, ...] = (),
    ) -> None:
        self.main_pid = main_pid
        self.intercept = intercept
        self.trace_all = trace_all
        self.threads: dict[int, Thread] = {main_pid: Thread(main_pid, main_pid)}
        self.processes: dict[int, Process] = {
            main_pid: Process(main_pid, 0, argv, threads={main_pid})
        }
        self.main_exit: tuple[int | None, int | None] | None = None
        # Exits of tasks whose fork event had not arrived yet (waitpid order):
        # status, signal, cpu_us, maxrss_kb.
        self._early_exits: dict[int, tuple[int | None, int | None, int, int]] = {}
        self._now = time.perf_counter

    @property
    def alive(self) -> bool:
        """True while any traced thread remains."""
        return bool(self.threads)

    def step(self, stop: Stop) -> list[Action]:
        """Advance on one stop; return what the runner must do."""
        handler: Callable[[Machine, Stop], list[Action]] = _HANDLERS[type(stop)]
        return handler(self, stop)

    # -- helpers

    def _thread(self, tid: int) -> Thread:
        th = self.threads.get(tid)
        if th is None:
            # A new child's first stop can beat its parent's fork event.
            th = self.threads[tid] = Thread(tid, tid)
        return th

    def _mode(self, th: Thread) -> Mode:
        p = th.pending
        return Mode.SYSCALL if p is not None and p.want_exit else Mode.CONT

    # -- handlers

    def _seccomp(self, stop: SeccompStop) -> list[Action]:
        th = self._thread(stop.tid)
        if stop.foreign:
            # The table cannot interpret it; when calls are being served (paths
            # mapped, programs placed) refuse it so nothing escapes the OSS.
            if self.intercept:
                return [
                    ApplyComplete(stop.tid, Complete(-errno.ENOSYS)),
                    Resume(stop.tid, Mode.CONT),
                ]
            return [Resume(stop.tid, Mode.CONT)]
        th.pending = Pending(stop.nr, stop.args, self._now(), want_exit=self.trace_all)
        if stop.nr in self.intercept:
            return [Consult(stop.tid, stop.nr, stop.args)]
        if not self.trace_all:
            th.pending = None
        return [Resume(stop.tid, self._mode(th))]

    def _decided(self, stop: Decided) -> list[Action]:
        th = self._thread(stop.tid)
        p = th.pending
        if p is None:
            return [Resume(stop.tid, Mode.CONT)]
        d = stop.decision
        if isinstance(d, Complete):
            th.pending = None
            out: list[Action] = [ApplyComplete(stop.tid, d)]
            if self.trace_all:
                out.append(Record(stop.tid, p.nr, p.args, d.result, self._now() - p.started))
            out.append(Resume(stop.tid, Mode.CONT))
            return out
        p.observe = d.observe_result
        p.want_exit = self.trace_all or p.observe
        if isinstance(d, Rewrite):
            p.rewritten = p.want_exit = True
            return [ApplyRewrite(stop.tid, d), Resume(stop.tid, Mode.SYSCALL)]
        assert isinstance(d, Allow)
        if not p.want_exit:
            th.pending = None
        return [Resume(stop.tid, self._mode(th))]

    def _syscall_exit(self, stop: SyscallExitStop) -> list[Action]:
        th = self._thread(stop.tid)
        p = th.pending
        if p is None:
            return [Resume(stop.tid, Mode.CONT)]
        out: list[Action] = []
        if p.rewritten and not p.exec_seen:
            out.append(RestoreArgs(stop.tid))
        if p.observe and not p.exec_seen:
            out.append(Observe(stop.tid, stop.rval))
            return out
        return out + self._finish(th, stop.rval)

    def _observed(self, stop: Observed) -> list[Action]:
        th = self._thread(stop.tid)
        if th.pending is None:
            return [Resume(stop.tid, Mode.CONT)]
        return self._finish(th, stop.rval)

    def _finish(self, th: Thread, rval: int) -> list[Action]:
        p = th.pending
        assert p is not None
        th.pending = None
        out: list[Action] = []
        if self.trace_all:
            out.append(Record(th.tid, p.nr, p.args, rval, self._now() - p.started))
        out.append(Resume(th.tid, Mode.CONT))
        return out

    def _fork(self, stop: ForkStop) -> list[Action]:
        parent = self._thread(stop.tid)
        early = self._early_exits.pop(stop.child, None)
        if early is not None:
            out: list[Action] = [Notify(ProcessSpawned(stop.child, parent.tgid, stop.thread))]
            if not stop.thread:
                self.processes[stop.child] = Process(stop.child, parent.tgid, (), *early[:2])
                out.append(Notify(ProcessExited(stop.child, *early)))
            out.append(Resume(stop.tid, self._mode(parent)))
            return out
        child = self._thread(stop.child)
        out = []
        if stop.thread:
            child.tgid = parent.tgid
            proc = self.processes.get(parent.tgid)
            if proc is not None:
                proc.threads.add(stop.child)
        else:
            child.tgid = stop.child
            parent_proc = self.processes.get(parent.tgid)
            argv = parent_proc.argv if parent_proc else ()
            self.processes[stop.child] = Process(
                stop.child, parent.tgid, argv, threads={stop.child}
            )
        out.append(Notify(ProcessSpawned(stop.child, parent.tgid, stop.thread)))
        out.append(Resume(stop.tid, self._mode(parent)))
        return out

    def _exec(self, stop: ExecStop) -> list[Action]:
        th = self.threads.pop(stop.former, None) or self._thread(stop.tid)
        proc = self.processes.get(th.tgid)
        if proc is not None:
            # Every other thread of the group is gone after a successful execve.
            for tid in proc.threads - {stop.former, stop.tid}:
                self.threads.pop(tid, None)
            proc.threads = {stop.tid}
            proc.exiting.clear()  # the old leader's exit stop had this tid
            proc.argv = stop.argv
        th.tid = stop.tid
        self.threads[stop.tid] = th
        if th.pending is not None:
            th.pending.exec_seen = True
        return [
            Notify(ProcessExec(th.tgid, stop.argv)),
            Resume(stop.tid, self._mode(th)),
        ]

    def _signal(self, stop: SignalStop) -> list[Action]:
        th = self._thread(stop.tid)
        return [Resume(stop.tid, self._mode(th), stop.sig)]

    def _group_stop(self, stop: GroupStop) -> list[Action]:
        self._thread(stop.tid)
        out: list[Action] = [Resume(stop.tid, Mode.LISTEN)]
        if stop.tid == self.main_pid and stop.sig in TTY_STOP_SIGNALS:
            out.append(MirrorStop(stop.sig))
        return out

    def _event(self, stop: EventStop) -> list[Action]:
        th = self._thread(stop.tid)
        return [Resume(stop.tid, self._mode(th))]

    def _exiting(self, stop: ExitingStop) -> list[Action]:
        th = self._thread(stop.tid)
        out: list[Action] = []
        proc = self.processes.get(th.tgid)
        if proc is not None:
            proc.exiting.add(stop.tid)
            if not proc.metered and proc.threads <= proc.exiting:
                proc.metered = True  # the last live thread: the process's totals are final
                out.append(Meter(proc.pid))
        out.append(Resume(stop.tid, Mode.CONT))
        return out

    def _exit(self, stop: ExitStop) -> list[Action]:
        th = self.threads.pop(stop.tid, None)
        if th is None:
            return []
        proc = self.processes.get(th.tgid)
        out: list[Action] = []
        if proc is None:
            self._early_exits[stop.tid] = (
                stop.exit_status, stop.signal, stop.cpu_us, stop.maxrss_kb
            )  # fmt: skip
        else:
            proc.threads.discard(stop.tid)
            if stop.tid == proc.pid:
                proc.exit_status, proc.signal = stop.exit_status, stop.signal
                out.append(
                    Notify(
                        ProcessExited(
                            proc.pid, stop.exit_status, stop.signal, stop.cpu_us, stop.maxrss_kb
                        )
                    )
                )
                # Threads of an exited group can no longer report anything.
                for tid in proc.threads:
                    self.threads.pop(tid, None)
                proc.threads.clear()
        if stop.tid == self.main_pid:
            self.main_exit = (stop.exit_status, stop.signal)
        return out


_HANDLERS: dict[type, Any] = {
    SeccompStop: Machine._seccomp,
    SyscallExitStop: Machine._syscall_exit,
    ForkStop: Machine._fork,
    ExecStop: Machine._exec,
    SignalStop: Machine._signal,
    GroupStop: Machine._group_stop,
    EventStop: Machine._event,
    ExitingStop: Machine._exiting,
    ExitStop: Machine._exit,
    Decided: Machine._decided,
    Observed: Machine._observed,
}
