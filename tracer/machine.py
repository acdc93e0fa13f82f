"""The tracer's per-stop state machine: `Machine.step(stop) -> actions`.

Pure: it never calls ptrace, reads memory or talks to the coordinator.  The
runner (`tracer.runner`) decodes each waitpid result into a `Stop` value, feeds
it here, and carries out the returned `Action` values.  The machine keeps its
bookkeeping in place rather than returning a new state per stop: a copy of every
thread's state per syscall would cost O(threads) on the hottest path.

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
from dataclasses import dataclass, field
from typing import Any

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


@dataclass(frozen=True, slots=True)
class SeccompStop:
    tid: int
    nr: int
    args: tuple[int, ...]
    foreign: bool = False  # a call of another ABI (i386 int 0x80, x32): nr is not ours


@dataclass(frozen=True, slots=True)
class SyscallExitStop:
    tid: int
    rval: int


@dataclass(frozen=True, slots=True)
class ForkStop:
    tid: int
    child: int
    thread: bool


@dataclass(frozen=True, slots=True)
class ExecStop:
    tid: int  # the thread-group leader after exec
    former: int  # the thread that called execve
    argv: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class SignalStop:
    tid: int
    sig: int


@dataclass(frozen=True, slots=True)
class GroupStop:
    tid: int
    sig: int


@dataclass(frozen=True, slots=True)
class EventStop:
    """Any other ptrace-stop: a new child's first stop, a wake-up after LISTEN."""

    tid: int


@dataclass(frozen=True, slots=True)
class ExitingStop:
    """PTRACE_EVENT_EXIT: the thread is exiting; /proc still shows its process."""

    tid: int


@dataclass(frozen=True, slots=True)
class ExitStop:
    tid: int
    exit_status: int | None
    signal: int | None
    cpu_us: int = 0  # utime + stime of wait4's rusage
    maxrss_kb: int = 0


@dataclass(frozen=True, slots=True)
class Decided:
    """The coordinator's answer to a `Consult`."""

    tid: int
    decision: Decision


@dataclass(frozen=True, slots=True)
class Observed:
    """The final result of a call after `Coordinator.on_result`."""

    tid: int
    rval: int


Stop = (
    SeccompStop | SyscallExitStop | ForkStop | ExecStop | SignalStop | GroupStop
    | EventStop | ExitingStop | ExitStop | Decided | Observed
)  # fmt: skip


# ---- actions (what the runner must do) ---------------------------------------


@dataclass(frozen=True, slots=True)
class Resume:
    tid: int
    mode: Mode
    sig: int = 0


@dataclass(frozen=True, slots=True)
class Consult:
    """Build a SyscallCall for the pending call and ask the coordinator."""

    tid: int
    nr: int
    args: tuple[int, ...]


@dataclass(frozen=True, slots=True)
class ApplyRewrite:
    tid: int
    rewrite: Rewrite


@dataclass(frozen=True, slots=True)
class ApplyComplete:
    tid: int
    complete: Complete


@dataclass(frozen=True, slots=True)
class RestoreArgs:
    """Put back the argument registers a rewrite changed (the ABI preserves them)."""

    tid: int


@dataclass(frozen=True, slots=True)
class Observe:
    tid: int
    rval: int


@dataclass(frozen=True, slots=True)
class Record:
    """One finished syscall, for --trace lines, --summary and --record."""

    tid: int
    nr: int
    args: tuple[int, ...]
    rval: int
    seconds: float


@dataclass(frozen=True, slots=True)
class Notify:
    event: ProcessEvent


@dataclass(frozen=True, slots=True)
class Meter:
    """Measure process `pid` now: its last live thread is stopped on its way out."""

    pid: int


@dataclass(frozen=True, slots=True)
class MirrorStop:
    """The main process stopped from the terminal: stop dcptrace too, as a shell expects."""

    sig: int


Action = (
    Resume | Consult | ApplyRewrite | ApplyComplete | RestoreArgs | Observe | Record
    | Notify | Meter | MirrorStop
)  # fmt: skip


@dataclass(slots=True)
class Pending:
    nr: int
    args: tuple[int, ...]
    started: float
    want_exit: bool = False
    rewritten: bool = False
    observe: bool = False
    exec_seen: bool = False


@dataclass(slots=True)
class Thread:
    tid: int
    tgid: int
    pending: Pending | None = None


@dataclass(slots=True)
class Process:
    pid: int
    ppid: int
    argv: tuple[str, ...] = ()
    exit_status: int | None = None
    signal: int | None = None
    threads: set[int] = field(default_factory=set)
    exiting: set[int] = field(default_factory=set)  # threads seen at their exit stop
    metered: bool = False


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
