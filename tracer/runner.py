"""The tracer loop: waitpid -> Stop -> Machine.step -> actions -> ptrace.

Runs on one dedicated thread (the one that seized the program), blocking in
waitpid(-1, __WALL); it never sleep-polls.  Everything that talks to the kernel
about tracees lives here or in `ptraceio`; decisions live in `machine` and the
coordinator.
"""

from __future__ import annotations

import errno
import logging
import os
import resource
import signal
import stat
import struct
import time
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, NamedTuple, Protocol

from tracer import ptraceio
from tracer.coordinator import (
    Complete,
    Coordinator,
    Decision,
    Defer,
    ProcessExited,
    ProcessUsage,
    Rewrite,
    SyscallCall,
)
from tracer.decode import (
    AT_FDCWD,
    MEMORY_FORMATS,
    OPEN_FLAGS,
    POINTER_RESULTS,
    Formatter,
    result,
    signal_names,
    signed,
)
from tracer.errors import PtraceRequestError, TracerError
from tracer.machine import (
    STOP_SIGNALS,
    Action,
    ApplyComplete,
    ApplyRewrite,
    Consult,
    Decided,
    EventStop,
    ExecStop,
    ExitingStop,
    ExitStop,
    ForkStop,
    GroupStop,
    Machine,
    Meter,
    MirrorStop,
    Notify,
    Observe,
    Observed,
    Pending,
    Record,
    RestoreArgs,
    Resume,
    SeccompStop,
    SignalStop,
    Stop,
    SyscallExitStop,
    Thread,
)
from tracer.report import RunStats, Writer
from tracer.seccomp import PreparedFilter, build_filter
from tracer.spawn import Spawned, exec_failure, spawn
from tracer.syscalls import SyscallSpec, SyscallTable, by_name

if TYPE_CHECKING:
    from tracer._fastpath import Loop

log = logging.getLogger(__name__)

WALL = 0x40000000  # __WALL: wait for threads and processes alike
_MASK64 = (1 << 64) - 1
_SIGTRAP_SYSGOOD = signal.SIGTRAP | 0x80


class Usage(Protocol):
    """The fields of wait4's rusage the tracer reads."""

    @property
    def ru_utime(self) -> float: ...
    @property
    def ru_stime(self) -> float: ...
    @property
    def ru_maxrss(self) -> int: ...


class _Usage(NamedTuple):
    ru_utime: float
    ru_stime: float
    ru_maxrss: int


class PathSkip(NamedTuple):
    """Calls a coordinator traps for the paths under a few prefixes alone.

    Without --trace the C loop (`tracer._fastpath`) lets go, at their seccomp stop,
    those that cannot name anything under `prefixes`, judged lexically: a path
    without a `..` component that is not under one, absolute or joined to its
    directory's (`paths`); a listing of another directory (`listings`, getdents64).
    The coordinator sees only the others.
    """

    prefixes: tuple[bytes, ...]
    paths: frozenset[str]
    listings: frozenset[str] = frozenset()


class Outcome(NamedTuple):
    """How the traced program ended and what the tracer saw."""

    exit_status: int | None
    signal: int | None
    machine: Machine
    stats: RunStats
    wall_seconds: float
    error: str | None  # the exec failure of the program itself, if any


class Runner:
    """Runs one program under the tracer with a coordinator."""

    def __init__(
        self,
        argv: Sequence[str],
        env: Mapping[str, str],
        path: str,
        table: SyscallTable,
        coordinator: Coordinator,
        trace_all: bool,
        trace_out: Writer | None = None,
        report: Callable[[str], None] | None = None,
        dispositions: Mapping[int, signal.Handlers] | None = None,
        complain: Callable[[str], None] | None = None,
        measure: Callable[[int], dict[str, int]] | None = None,
        skip: PathSkip | None = None,
    ) -> None:
        # Metering (an instance's tracer): `measure(pid)` reads a process's
        # counters at its exit stop; each exit is followed by a ProcessUsage.
        self.measure = measure
        self._measured: dict[int, dict[str, int]] = {}
        self._services: dict[int, dict[str, int]] = {}  # pid -> OSS service -> calls
        self.report = report or (lambda line: None)
        # Told why the program could not be started, before its exit is
        # reported (the front may return, and stderr close, right after).
        self.complain = complain or (lambda message: None)
        self.dispositions = dict(dispositions or {})
        self.argv = tuple(argv)
        self.env = dict(env)
        self.path = path
        self.table = table
        self.names = by_name(table)
        self.coordinator = coordinator
        self.trace_all = trace_all
        self.trace_out = trace_out
        self.stats = RunStats(table)
        self.formatter = Formatter(
            table, ptraceio.read_string, ptraceio.read_memory, ptraceio.read_string_array
        )
        unknown = coordinator.interception() - self.names.keys()
        if unknown:
            raise TracerError(f"coordinator asks for unknown syscalls: {sorted(unknown)}")
        self.intercept = frozenset(self.names[n].nr for n in coordinator.interception())
        self._calls: dict[int, SyscallCall] = {}
        self.deferred: dict[int, SyscallCall] = {}  # tid -> a call awaiting `decide`
        self._saved: dict[int, ptraceio.Registers] = {}
        self._entry_text: dict[int, str] = {}
        # --trace reads the tracee's memory while it is stopped: at entry for
        # these calls' input arguments, at exit for those with an output buffer.
        # Every other part of a line is written once the tracee runs again.
        self._read_at_entry = frozenset(
            nr for nr, s in table.items() if MEMORY_FORMATS.intersection(s.args) - {"buf_out"}
        )
        self._read_at_exit = frozenset(nr for nr, s in table.items() if "buf_out" in s.args)
        # argv of an execve the coordinator rewrote (a placed program runs
        # through its deputy): records show what the program asked to run.
        self._exec_argv: dict[int, tuple[str, ...]] = {}
        self.machine: Machine | None = None
        # The C loop of the --trace hot path (tracer._fastpath), when built; without
        # --trace, the one that lets go the calls `skip` names.
        if trace_all:
            self._fast = fast_loop(table, self.intercept, trace_out)
        else:
            self._fast = fast_loop(table, self.intercept, None, skip) if skip else None
        self._write = self._fast.write if self._fast is not None else None
        self._spawned: Spawned | None = None
        self._exec_error: str | None = None
        self._main_dumped = False  # the main process was killed and dumped core

    # -- the loop

    def run(self) -> Outcome:
        """Spawn the program, trace it until every traced process is gone."""
        filt = interception_filter(
            self.table, self.intercept, self.trace_all, no_new_privs=os.geteuid() != 0
        )
        started = time.perf_counter()
        mask = signal.pthread_sigmask(signal.SIG_BLOCK, [])
        spawned = self._spawned = spawn(
            self.argv, self.env, filt, self.path, mask, self.dispositions
        )
        self.report(f"pid {spawned.pid}")
        return self.attach(spawned.pid, started)

    def attach(self, pid: int, started: float | None = None) -> Outcome:
        """Trace `pid`, already seized by this thread, until every traced process is gone.

        `pid` must be stopped at its gate (or be the fresh child of `run`):
        its first exec is the program's, made under the filter built from
        this runner's interception (`interception_filter`).
        """
        if started is None:
            started = time.perf_counter()
        machine = self.machine = Machine(pid, self.intercept, self.trace_all, argv=self.argv)
        self._loop(machine)
        wall = time.perf_counter() - started
        self._read_exec_error()
        status, sig = machine.main_exit or (None, None)
        return Outcome(status, sig, machine, self.stats, wall, self._exec_error)

    def _read_exec_error(self) -> None:
        """Once the main process has ended: did its exec of the program fail, and why."""
        spawned, self._spawned = self._spawned, None
        if spawned is None:
            return
        self._exec_error = exec_failure(spawned)
        if self._exec_error:
            self.complain(self._exec_error)

    def _loop(self, machine: Machine) -> None:
        if self._fast is not None and self.trace_all:
            self._fast_loop(machine, self._fast)
            return
        step = machine.step
        execute = self._execute
        decode = self._decode
        wait = self._wait
        while machine.alive:
            try:
                pid, status, usage = wait()
            except ChildProcessError:
                log.warning("no traced process left, %d unaccounted for", len(machine.threads))
                return
            stop = decode(pid, status, usage)
            if stop is not None:
                execute(step(stop))

    def _wait(self) -> tuple[int, int, Usage]:
        """The next stop of any traced thread (without --trace: through the C loop,
        which first lets go the calls of `skip` that cannot name its prefixes)."""
        if self._fast is None:
            return os.wait4(-1, WALL)
        pid, status, utime, stime, maxrss, _none = self._fast.next()  # no call in flight
        return pid, status, _Usage(utime, stime, maxrss)

    def _fast_loop(self, machine: Machine, fast: Loop) -> None:
        """`_loop` with the C loop taking the fast calls' stops (tracer._fastpath).

        Each stop it returns comes with that thread's call in flight, which
        goes back into the machine (and its entry text into `_entry_text`), so
        the machine sees what it would have seen had it taken every stop; the
        C loop is told which threads the machine has a call in flight for, and
        hands their stops over.
        """
        step = machine.step
        execute = self._execute
        decode = self._decode
        threads = machine.threads
        try:
            while machine.alive:
                try:
                    pid, status, utime, stime, maxrss, handoff = fast.next()
                except ChildProcessError:
                    log.warning("no traced process left, %d unaccounted for", len(threads))
                    return
                if handoff is not None:
                    nr, args, started, text = handoff
                    th = threads.get(pid)
                    if th is None:
                        th = threads[pid] = Thread(pid, pid)
                    th.pending = Pending(nr, args, started, want_exit=True)
                    if text is not None:
                        self._entry_text[pid] = text
                stop = decode(pid, status, _Usage(utime, stime, maxrss))
                if stop is not None:
                    execute(step(stop))
                th = threads.get(pid)
                fast.hold(pid, th is not None and th.pending is not None)
        finally:
            fast.flush()
            for nr, calls, errors, seconds in fast.stats():
                self.stats.calls[nr] += calls
                self.stats.errors[nr] += errors
                self.stats.seconds[nr] += seconds

    def _decode(self, pid: int, status: int, usage: Usage) -> Stop | None:
        if status & 0xFF != 0x7F:  # not stopped (WIFSTOPPED): exited or killed
            cpu_us = round((usage.ru_utime + usage.ru_stime) * 1e6)
            if os.WIFEXITED(status):
                return ExitStop(pid, os.WEXITSTATUS(status), None, cpu_us, usage.ru_maxrss)
            if os.WCOREDUMP(status) and self.machine and pid == self.machine.main_pid:
                self._main_dumped = True
            return ExitStop(pid, None, os.WTERMSIG(status), cpu_us, usage.ru_maxrss)
        sig = (status >> 8) & 0xFF  # WSTOPSIG
        event = status >> 16
        try:
            if event == ptraceio.EVENT_SECCOMP:
                info = ptraceio.syscall_info(pid)
                if self.trace_out is not None:
                    self._pre_render(pid, info.nr, info.args)
                # A call of another ABI, or (while calls are served) one the
                # table does not know: the machine refuses it with ENOSYS.
                foreign = info.arch != ptraceio.AUDIT_ARCH_X86_64 or (
                    bool(self.intercept) and info.nr not in self.table
                )
                return SeccompStop(pid, info.nr, info.args, foreign)
            if sig == _SIGTRAP_SYSGOOD:
                info = ptraceio.syscall_info(pid)
                if info.op == ptraceio.SYSCALL_INFO_EXIT:
                    return SyscallExitStop(pid, info.rval)
                return EventStop(pid)
            if event in (ptraceio.EVENT_FORK, ptraceio.EVENT_VFORK, ptraceio.EVENT_CLONE):
                child = ptraceio.event_message(pid)
                thread = event == ptraceio.EVENT_CLONE and ptraceio.tgid_of(
                    child
                ) == ptraceio.tgid_of(pid)
                return ForkStop(pid, child, thread)
            if event == ptraceio.EVENT_EXEC:
                refuse_lost_privilege(pid)
                former = ptraceio.event_message(pid)
                argv = self._exec_argv.pop(former, None) or ptraceio.cmdline(pid)
                return ExecStop(pid, former, argv)
            if event == ptraceio.EVENT_EXIT:
                return ExitingStop(pid)
            if event == ptraceio.EVENT_STOP:
                if sig in STOP_SIGNALS:
                    return GroupStop(pid, sig)
                return EventStop(pid)
            if event:
                return EventStop(pid)
            return SignalStop(pid, sig)
        except ptraceio.PtraceRequestError as exc:
            if exc.errno == errno.ESRCH:
                return None  # killed under us; its exit is reported next
            raise

    # -- actions

    def _execute(self, actions: list[Action]) -> None:
        later: list[Record] = []
        for action in actions:
            if type(action) is Resume:  # most actions: no pattern matching on the hot path
                ptraceio.resume(action.tid, action.mode, action.sig)
                continue
            match action:
                case Record():
                    if self.trace_out is not None and action.nr not in self._read_at_exit:
                        later.append(action)  # needs no memory: after the resume
                    else:
                        self._record(action)
                case Consult():
                    self._consult(action)
                case ApplyRewrite(tid, rewrite):
                    self._apply_rewrite(tid, rewrite)
                case ApplyComplete(tid, complete):
                    self._apply_complete(tid, complete)
                    self._calls.pop(tid, None)
                case RestoreArgs(tid):
                    self._restore_args(tid)
                case Observe():
                    self._observe(action)
                case Meter(pid):
                    if self.measure is not None:
                        self._measured[pid] = self.measure(pid)
                case Notify(event):
                    self.coordinator.on_process(event)
                    if isinstance(event, ProcessExited) and self.measure is not None:
                        self.coordinator.on_process(
                            ProcessUsage(
                                event.pid,
                                event.cpu_us,
                                event.maxrss_kb,
                                self._measured.pop(event.pid, {}),
                                self._services.pop(event.pid, {}),
                            )
                        )
                    main = self.machine.main_pid if self.machine else -1
                    if isinstance(event, ProcessExited) and event.pid == main:
                        self._read_exec_error()
                        if event.signal:
                            kind = "dumped" if self._main_dumped else "signal"
                            self.report(f"{kind} {event.signal}")
                        else:
                            self.report(f"exit {event.exit_status}")
                case MirrorStop(sig):
                    self.report(f"stop {sig}")
        for record in later:
            self._record(record)

    def _consult(self, action: Consult) -> None:
        assert self.machine is not None
        call = self._build_call(action.tid, action.nr, action.args)
        try:
            decision = self.coordinator.on_syscall(call)
        except Exception:
            # Failing the call is safer than running it unmapped: data must not
            # land somewhere the program does not expect.
            log.exception("coordinator failed on %s; the call returns EIO", call.name)
            decision = Complete(-errno.EIO)
        self._calls[action.tid] = call
        if isinstance(decision, Defer):
            self.deferred[action.tid] = call  # stays stopped until `decide`
            return
        if self.measure is not None:
            counts = self._services.setdefault(call.pid, {})
            service = self.table[call.nr].service.value
            counts[service] = counts.get(service, 0) + 1
        if isinstance(decision, Rewrite) and call.argv is not None:
            self._exec_argv[action.tid] = tuple(a.decode(errors="replace") for a in call.argv)
        self._execute(self.machine.step(Decided(action.tid, decision)))

    def decide(self, tid: int, decision: Decision) -> None:
        """The decision on a call the coordinator deferred (ignored if `tid` is gone)."""
        if self.deferred.pop(tid, None) is None or self.machine is None:
            return
        if tid not in self.machine.threads:
            return
        self._execute(self.machine.step(Decided(tid, decision)))

    def _build_call(self, tid: int, nr: int, args: tuple[int, ...]) -> SyscallCall:
        spec: SyscallSpec = self.table[nr]
        pid = (
            self.machine.threads[tid].tgid if self.machine and tid in self.machine.threads else tid
        )
        paths: dict[int, bytes] = {}
        bases: dict[int, bytes] = {}
        for index, dirfd_index in spec.path_args():
            raw = ptraceio.read_string(tid, args[index])
            if raw is None:
                continue
            paths[index] = raw
            if raw and not raw.startswith(b"/"):
                base = self._base(tid, None if dirfd_index is None else args[dirfd_index])
                if base is not None:
                    bases[index] = base
        for i, fmt in enumerate(spec.args):
            if fmt == "target":
                raw = ptraceio.read_string(tid, args[i])
                if raw is not None:
                    paths[i] = raw
        sizes: dict[int, int] = {}
        for i, fmt in enumerate(spec.args):
            if fmt == "sockaddr":
                path = unix_path(_read(tid, args[i], min(args[i + 1] & 0xFFFFFFFF, SUN_LEN)))
                if path is not None:
                    paths[i] = path
                    if not path.startswith(b"/"):
                        base = self._base(tid, None)
                        if base is not None:
                            bases[i] = base
            elif fmt == "sockaddr_out" and args[i] and args[i + 1]:
                raw = _read(tid, args[i + 1], 4)
                if len(raw) == 4:
                    sizes[i] = struct.unpack("<i", raw)[0]
        argv = None
        if "argv" in spec.args:
            argv = ptraceio.read_string_array(tid, args[spec.args.index("argv")])
        cwd = ptraceio.proc_link(tid, "cwd") if spec.name == "getcwd" else None
        return SyscallCall(pid, tid, nr, spec.name, args, paths, bases, argv, cwd, sizes)

    @staticmethod
    def _base(tid: int, dirfd: int | None) -> bytes | None:
        if dirfd is None or signed(dirfd, 32) == AT_FDCWD:
            return ptraceio.proc_link(tid, "cwd")
        return ptraceio.proc_link(tid, f"fd/{signed(dirfd, 32)}")

    def _apply_rewrite(self, tid: int, rewrite: Rewrite) -> None:
        regs = ptraceio.get_regs(tid)
        self._saved[tid] = ptraceio.copy_regs(regs)
        sp = regs.rsp - ptraceio.RED_ZONE
        for index, value in rewrite.args.items():
            if isinstance(value, int):
                new = value & _MASK64
            elif isinstance(value, bytes):
                sp = _align(sp - len(value) - 1)
                ptraceio.write_memory(tid, sp, value + b"\0")
                new = sp
            else:
                pointers = []
                for item in value:
                    sp = _align(sp - len(item) - 1, 1)
                    ptraceio.write_memory(tid, sp, item + b"\0")
                    pointers.append(sp)
                table = struct.pack(f"<{len(pointers) + 1}Q", *pointers, 0)
                sp = _align(sp - len(table))
                ptraceio.write_memory(tid, sp, table)
                new = sp
            setattr(regs, ptraceio.ARG_REGS[index], new)
        ptraceio.set_regs(tid, regs)

    def _restore_args(self, tid: int) -> None:
        self._exec_argv.pop(tid, None)  # the call returned: no exec happened
        saved = self._saved.pop(tid, None)
        if saved is None:
            return
        regs = ptraceio.get_regs(tid)
        for name in ptraceio.ARG_REGS:
            setattr(regs, name, getattr(saved, name))
        ptraceio.set_regs(tid, regs)

    def _apply_complete(self, tid: int, complete: Complete, skip_call: bool = True) -> None:
        """Copy the writes in and set the result; at entry, also skip the call itself."""
        for addr, data in complete.writes:
            ptraceio.write_memory(tid, addr, data)
        regs = ptraceio.get_regs(tid)
        if skip_call:
            regs.orig_rax = _MASK64  # -1: the kernel skips the call and keeps rax
        regs.rax = complete.result & _MASK64
        ptraceio.set_regs(tid, regs)

    def _observe(self, action: Observe) -> None:
        assert self.machine is not None
        call = self._calls.pop(action.tid, None)
        rval = action.rval
        if call is not None:
            output = None
            out_index = self.table[call.nr].output_arg()
            if out_index is not None and rval > 0:
                output = ptraceio.read_memory(action.tid, call.args[out_index], rval)
            elif call.sizes and rval == 0:  # a socket address the call filled
                ((index, size),) = call.sizes.items()
                got = _read(action.tid, call.args[index + 1], 4)
                length = struct.unpack("<i", got)[0] if len(got) == 4 else 0
                output = _read(action.tid, call.args[index], max(0, min(length, size, SUN_LEN)))
            replacement = self.coordinator.on_result(call, rval, output)
            if replacement is not None:
                self._apply_complete(action.tid, replacement, skip_call=False)
                rval = replacement.result
        self._execute(self.machine.step(Observed(action.tid, rval)))

    def _pre_render(self, tid: int, nr: int, args: tuple[int, ...]) -> None:
        # Input arguments in memory are rendered at entry: after an execve, or
        # once the call consumed them, the memory may hold something else.
        if nr in self._read_at_entry and nr not in self._read_at_exit:
            self._entry_text[tid] = self.formatter.arguments(tid, self.table[nr], args, 0)

    def _record(self, action: Record) -> None:
        rval = signed(action.rval)
        self.stats.add(action.nr, rval, action.seconds)
        if self.trace_out is None:
            return
        assert self.machine is not None
        pid = action.tid
        text = self._entry_text.pop(action.tid, None)
        spec = self.table.get(action.nr)
        if text is None or spec is None:
            line = self.formatter.line(pid, action.nr, action.args, rval)
        else:
            line = f"{pid} {spec.name}({text}) = {result(rval, spec.name in POINTER_RESULTS)}"
        (self._write or self.trace_out.write)(line + "\n")


# Calls whose stops stay in Python even under the C loop: the events inside
# them (fork, exec, exit) are Python's, and nothing is gained by splitting them.
_EVENT_CALLS = frozenset(
    {"fork", "vfork", "clone", "clone3", "execve", "execveat", "exit", "exit_group"}
)
_NO_FASTPATH = (
    "dcptrace: the C fast path (tracer/_fastpath) is not built: --trace runs in pure "
    "Python, several times slower (pip install -e . builds it)\n"
)


def skips_available() -> bool:
    """Whether a runner given a `PathSkip` lets calls go in C (built, not turned off);
    without, every trapped call goes through Python."""
    if os.environ.get("DCP_TRACE_FASTPATH") == "0":
        return False
    import importlib.util

    return importlib.util.find_spec("tracer._fastpath") is not None


def fast_loop(
    table: SyscallTable,
    intercept: frozenset[int],
    trace_out: Writer | None,
    skip: PathSkip | None = None,
) -> Loop | None:
    """The C loop for a run that traces every call (`skip` None), or for one that does not
    and lets go the calls `skip` names; None: `Runner._loop` does it all in Python.

    DCP_TRACE_FASTPATH=0 turns it off (the differential tests compare both).
    """
    if os.environ.get("DCP_TRACE_FASTPATH") == "0":
        return None
    try:
        from tracer._fastpath import Loop
    except ImportError:
        if trace_out is not None:
            os.write(2, _NO_FASTPATH.encode())
        return None
    specs = [
        (
            nr,
            s.name,
            s.args,
            skip is None and nr not in intercept and s.name not in _EVENT_CALLS,
            s.name in POINTER_RESULTS,
            bool(MEMORY_FORMATS.intersection(s.args) - {"buf_out"}),
            "buf_out" in s.args,
        )
        for nr, s in table.items()
    ]
    return Loop(
        specs,
        dict(errno.errorcode),
        signal_names(),
        list(OPEN_FLAGS),
        None if trace_out is None else trace_out.write,
        getattr(trace_out, "line_buffered", True),
        PtraceRequestError,
        skip=_skips(table, skip) if skip else [],
        prefixes=list(skip.prefixes) if skip else [],
    )


def single_path_calls(table: SyscallTable) -> frozenset[str]:
    """The calls the C loop can judge by their path (`PathSkip.paths`): one `path`
    argument, first or after a directory descriptor, and nothing else that names a
    file (no link target, socket address or exec)."""
    out = set()
    for s in table.values():
        if s.args.count("path") != 1 or {"target", "sockaddr", "sockaddr_out", "argv"} & set(
            s.args
        ):
            continue
        at = s.args.index("path")
        if at == 0 or (at == 1 and s.args[0] == "dirfd"):
            out.add(s.name)
    return frozenset(out)


def _skips(table: SyscallTable, skip: PathSkip) -> list[tuple[int, int]]:
    """(nr, how) of `skip`'s calls for the C loop: -1 for a listing, else the index of
    the path argument."""
    judged = single_path_calls(table)
    out = []
    for nr, s in table.items():
        if s.name in skip.listings:
            out.append((nr, -1))
        elif s.name in skip.paths and s.name in judged:
            out.append((nr, s.args.index("path")))
    return out


def interception_filter(
    table: SyscallTable,
    intercept: frozenset[int],
    trace_all: bool,
    no_new_privs: bool,
    at_cwd: frozenset[int] = frozenset(),
) -> PreparedFilter:
    """The seccomp filter a traced program installs before its first exec.

    The interception set is the union of what the coordinator's active services
    need (`Coordinator.interception`): empty for a plain run, which then gets no
    filter at all (no BPF run on each syscall, and `Seccomp: 0` and `NoNewPrivs: 0`
    in /proc/PID/status as natively).  Fork, exec and exit are still followed:
    they are ptrace events.  Calls of `at_cwd` (and not of `intercept`) stop only
    with the directory descriptor AT_FDCWD (`build_filter`).
    Once anything is intercepted, calls of a foreign ABI (int 0x80, x32) and, as
    a call newer than the table may take a path (as fchmodat2 did) and get
    around the map, numbers past the table stop too.
    """
    if not intercept and not trace_all:
        return PreparedFilter([], no_new_privs=False)
    beyond = max(table) + 1 if intercept else None
    return PreparedFilter(
        build_filter(intercept, trace_all=trace_all, trace_from=beyond, at_cwd=at_cwd),
        no_new_privs=no_new_privs,
    )


# exit_group(126): mov eax, 231; mov edi, 126; syscall
_EXIT_126 = bytes.fromhex("b8e7000000bf7e0000000f05")


def refuse_lost_privilege(pid: int) -> None:
    """A set-user-ID/-group (or file-capability) program exec'd without its privilege ends.

    A traced exec only gains privilege when the tracer may (root with
    CAP_SYS_PTRACE, no no_new_privs): otherwise the program would run as its
    caller, silently wrong.  Stopped at PTRACE_EVENT_EXEC, before its first
    instruction, it says why in one line and exits with 126 instead.
    """
    exe = f"/proc/{pid}/exe"
    try:
        st = os.stat(exe)
        if os.statvfs(exe).f_flag & os.ST_NOSUID:
            return  # natively no privilege either
        ids = _status_ids(pid)
    except OSError:
        return
    euid, egid, capprm = ids
    what = None
    if st.st_mode & stat.S_ISUID and st.st_uid != euid:
        what = f"set-user-ID (uid {st.st_uid})"
    elif st.st_mode & stat.S_ISGID and st.st_mode & stat.S_IXGRP and st.st_gid != egid:
        what = f"set-group-ID (gid {st.st_gid})"
    elif euid != 0 and capprm == 0 and _has_file_caps(exe):
        what = "file-capability"
    if what is None:
        return
    path = os.fsdecode(ptraceio.proc_link(pid, "exe") or exe.encode())
    line = (
        f"dcptrace: {path}: {what} program; it cannot gain that privilege under "
        "dcptrace (it lacks CAP_SYS_PTRACE): not run\n"
    )
    os.write(2, line.encode())
    regs = ptraceio.get_regs(pid)
    ptraceio.force_write(pid, regs.rip, _EXIT_126)


def _status_ids(pid: int) -> tuple[int, int, int]:
    """Effective uid, effective gid and permitted capabilities of `pid`."""
    fields: dict[str, list[str]] = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            fields[key] = value.split()
    return int(fields["Uid"][1]), int(fields["Gid"][1]), int(fields["CapPrm"][0], 16)


def _has_file_caps(path: str) -> bool:
    try:
        os.getxattr(path, "security.capability")
    except OSError:
        return False
    return True


SUN_LEN = 110  # sizeof(struct sockaddr_un)
AF_UNIX = 1


def _read(tid: int, addr: int, size: int) -> bytes:
    """Up to `size` bytes of the tracee's memory (b"" if unreadable)."""
    if not addr or size <= 0:
        return b""
    try:
        return ptraceio.read_memory(tid, addr, size)
    except OSError:
        return b""


def unix_path(addr: bytes) -> bytes | None:
    """The path an AF_UNIX socket address names (None: another family, abstract, unnamed)."""
    if len(addr) < 3 or int.from_bytes(addr[:2], "little") != AF_UNIX or addr[2] == 0:
        return None
    return addr[2:].split(b"\0", 1)[0]


def _align(addr: int, to: int = 16) -> int:
    return addr & ~(to - 1)


def reraise(sig: int, core_dumped: bool = False) -> None:
    """Die by `sig` as the program did, with the core-dump bit when its death had it.

    The bit is only set by a core actually written: dcptrace then dumps a
    core of its own (memory left out) into a private directory that a
    cleaner child removes once dcptrace is gone, so no core of dcptrace
    stays behind; the program's own core is where the kernel put it.
    """
    _, hard = resource.getrlimit(resource.RLIMIT_CORE)
    if core_dumped and hard != 0 and _core_pattern_is_relative():
        resource.setrlimit(resource.RLIMIT_CORE, (hard, hard))
        _dump_into_private_dir()
    else:
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    if sig not in (signal.SIGKILL, signal.SIGSTOP):
        signal.signal(sig, signal.SIG_DFL)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, [sig])
    os.kill(os.getpid(), sig)


def _core_pattern_is_relative() -> bool:
    """Cores go to the dumping process's directory (not a pipe, not an absolute path)."""
    try:
        with open("/proc/sys/kernel/core_pattern", "rb") as f:
            pattern = f.read().strip()
    except OSError:
        return False
    return bool(pattern) and not pattern.startswith((b"|", b"/"))


def _dump_into_private_dir() -> None:
    """Make this process's core dump small and land in a directory removed after it."""
    import shutil
    import tempfile

    where = tempfile.mkdtemp(prefix="dcptrace-core-")
    gone_r, gone_w = os.pipe()
    if os.fork() == 0:  # the cleaner: waits for dcptrace's death, removes the dump
        try:
            os.setsid()  # out of the job: the shell's signals are not for it
            null = os.open(os.devnull, os.O_RDWR)
            for fd in (0, 1, 2):
                os.dup2(null, fd)
            os.closerange(3, gone_r)
            os.closerange(gone_r + 1, 1 << 16)
            # EOF once dcptrace's files are closed: after the kernel wrote its core.
            os.read(gone_r, 1)
            shutil.rmtree(where, ignore_errors=True)
        finally:
            os._exit(0)
    os.close(gone_r)
    os.chdir(where)
    try:
        with open("/proc/self/coredump_filter", "w") as f:
            f.write("0")  # no memory in the core: headers and registers only
    except OSError:
        pass
