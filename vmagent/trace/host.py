"""The instance tracer T: traces one exec session's program and reports on its channel.

Forked by the zygote (`vmagent.trace.zygote`) per session.  Its main thread
is the only one that calls ptrace: it seizes the agent's child P (blocked on
its gate), releases it through `go_w`, then runs the tracer loop
(`Runner.attach`) until no tracee is left.  P installs the seccomp filter
(`interception_filter(table, interception(table, maps))`, built by the agent
from the same view) and execs; every process of the tree is reported as
`op=event` and metered as `op=usage` (`vmagent.trace.channel`).

EXITKILL holds from the seize on: if T dies, every tracee dies with it, so
no process of the session ever runs untraced.

Checkpoints (`vmagent.checkpoint`): T also listens to its channel.  A tiny
child W of T (the *waker*) waits for the channel to become readable and exits;
T's `wait4(-1)` sees W's exit among its tracees' stops, so a command is read
between two stops, never in the middle of one, with no signal and no thread.
`op=detach` holds every thread at a ptrace stop outside any intercepted call,
makes SIGSTOP pending on each process and detaches: the tree stops untraced
(an intercepted call of a detached task could otherwise run unserved).  A T
forked for `op=adopt` seizes such a stopped tree (restored by CRIU, or left
stopped after a dump) and continues it under the same rules as a fresh one.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import select
import signal
import socket
from collections.abc import Callable

from oss.embedded import EmbeddedCoordinator
from oss.storage.pathmap import PathMap
from tracer import ptraceio
from tracer.coordinator import Coordinator
from tracer.machine import EventStop, GroupStop, Machine, Process, SignalStop, Stop, Thread
from tracer.runner import WALL, Runner, Usage
from tracer.syscalls import SyscallTable
from vmagent.cluster.coordinator import Ident
from vmagent.exec.view import EMPTY as EMPTY_VIEW
from vmagent.exec.view import decode as decode_view
from vmagent.trace import channel
from vmagent.trace.filelocks import POLL, LockForwarder, interrupted
from vmagent.trace.listeners import ChannelRequest, Listeners
from vmagent.trace.measure import measure_exit
from vmagent.trace.placing import (
    ChannelAsk,
    ChannelKill,
    ChannelProc,
    Grant,
    HomeProc,
    InstanceCoordinator,
    PlacementSource,
    PlacingCoordinator,
    SignalHome,
)
from vmagent.trace.unixsock import RELAY_TIMEOUT

log = logging.getLogger(__name__)

OPTIONS = ptraceio.OPTIONS | ptraceio.O_TRACEEXIT
SI_USER = 0  # si_code of a kill()


def coordinator_for(
    table: SyscallTable,
    maps: tuple[tuple[str, str], ...],
    report: Callable[[bytes], None],
    source: PlacementSource | None = None,
    ask: Callable[[Ident, int, list[str]], Grant | None] | None = None,
    locks: LockForwarder | None = None,
    listeners: Listeners | None = None,
    home: SignalHome | None = None,
    proc: HomeProc | None = None,
) -> InstanceCoordinator:
    """T's coordinator for a view with path `maps` (placing execs through `ask`, if given;
    sending signals for pids elsewhere through `home`)."""
    embedded = EmbeddedCoordinator(table, PathMap(dict(maps)))
    inner: Coordinator = embedded if ask is None else PlacingCoordinator(embedded, ask)
    return InstanceCoordinator(
        inner, report, source, locks=locks, listeners=listeners, home=home, proc=proc,
        view=(table, embedded.acts_under()),
    )  # fmt: skip


def interception(table: SyscallTable, maps: tuple[tuple[str, str], ...]) -> frozenset[str]:
    """The calls a program of a view with `maps` stops on (what its filter must trap)."""
    return coordinator_for(table, maps, lambda _m: None).interception()


def at_cwd_only(table: SyscallTable, maps: tuple[tuple[str, str], ...]) -> frozenset[str]:
    """Of `interception`, the calls that stop only with dirfd AT_FDCWD."""
    return coordinator_for(table, maps, lambda _m: None).at_cwd_only()


class Tracer:
    """One T: a runner prepared ahead (for the empty view), then one session traced."""

    def __init__(self, table: SyscallTable) -> None:
        self.table = table
        self.chan: socket.socket | None = None
        # Commands read off the channel while T waited for an answer there (an
        # op=detach arriving during a placement or a kill): the runner serves them.
        self.kept: list[bytes] = []
        self.ask = ChannelAsk(lambda: self.chan, keep=self.kept.append)  # placement (issue 10)
        self.home = ChannelKill(lambda: self.chan, self.ask.next_req, self.kept.append)  # 11
        self.proc = ChannelProc(lambda: self.chan, self.ask.next_req, self.kept.append)  # 11
        # lock calls through the agent and the deputy (issue 14)
        self.locks = LockForwarder(self._hand_over, ptraceio.read_memory)
        # Listening sockets, steered by the OSS (issue 13).
        self.listeners = Listeners(
            ChannelRequest(lambda: self.chan, keep=self.kept.append), self.report,
            ChannelRequest(lambda: self.chan, RELAY_TIMEOUT, keep=self.kept.append),
        )  # fmt: skip
        self._ready = self._runner(b"")  # built while T waits for its session

    def report(self, message: bytes) -> None:
        """Send one record to the agent (fire and forget)."""
        if self.chan is not None:
            with contextlib.suppress(OSError):  # the agent is gone: tracing goes on
                channel.send(self.chan, message)

    def _hand_over(self, message: bytes, fds: tuple[int, ...]) -> bool:
        """Send one record with descriptors to the agent; False when it cannot be reached."""
        if self.chan is None:
            return False
        try:
            channel.send(self.chan, message, fds)
        except OSError:
            return False
        return True

    def _runner(self, view: bytes) -> HostRunner:
        coordinator = coordinator_for(
            self.table, channel.view_maps(view), self.report, ask=self.ask,
            locks=self.locks, listeners=self.listeners, home=self.home, proc=self.proc,
        )  # fmt: skip
        return HostRunner(self, coordinator)

    @staticmethod
    def _placing(runner: Runner) -> PlacingCoordinator | None:
        inner = getattr(runner.coordinator, "inner", None)
        return inner if isinstance(inner, PlacingCoordinator) else None

    def serve(
        self,
        chan: socket.socket,
        go_w: int,
        pidfd: int,
        pid: int,
        instance: str,
        view: bytes,
        pids: tuple[int, int] = (0, 0),
    ) -> int:
        """Trace `pid` (the process of `pidfd`) to the end; the process exit code of T.

        `pids`: the program pid `pid` stands for and its parent's (0: unknown,
        pids are then the instance's own).
        """
        self.chan = chan
        try:
            if not same_process(pidfd, pid):
                raise ptraceio.PtraceRequestError(pid=pid, request=0, errno=errno.ESRCH)
            ptraceio.seize(pid, OPTIONS)
            if not same_process(pidfd, pid):  # reaped and reused between check and seize
                release(pid)
                raise ptraceio.PtraceRequestError(pid=pid, request=0, errno=errno.ESRCH)
        except ptraceio.PtraceRequestError as exc:
            self.report(channel.encode(channel.OP_FAILED, pid=pid, message=os.strerror(exc.errno)))
            os.close(go_w)  # P reads EOF and exits 125: it never runs
            return 1
        finally:
            os.close(pidfd)
        try:
            # The prepared runner serves a view without maps (most sessions).
            runner = self._ready if not channel.view_maps(view) else self._runner(view)
            placing = self._placing(runner)
            if isinstance(runner.coordinator, InstanceCoordinator):
                runner.coordinator.bind_pids(instance, pid, *pids)
            if placing is not None:
                placing.bind(decode_view(view) if view else EMPTY_VIEW, instance)
        except Exception as exc:
            # A bad view: P must not run untraced nor unmapped.  EXITKILL at our exit.
            log.error("cannot trace pid %d on %s: %s", pid, instance, exc)
            self.report(channel.encode(channel.OP_FAILED, pid=pid, message=str(exc)))
            os.close(go_w)
            return 1
        os.write(go_w, b"x")
        os.close(go_w)
        self.report(channel.encode(channel.OP_SEIZED, pid=pid, tracer=os.getpid()))
        self.report(channel.spawned(pid, 0))
        try:
            runner.attach(pid)
        finally:
            if placing is not None:
                placing.close()  # the ticket files of deputies that never started
            if isinstance(runner.coordinator, InstanceCoordinator):
                runner.coordinator.close()  # its /proc snapshots
        self.report(channel.encode(channel.OP_DONE))
        return 0

    def adopt(
        self,
        chan: socket.socket,
        pids: tuple[int, ...],
        view: bytes,
        instance: str = "",
        program: tuple[int, int] = (0, 0),
        base: int = 0,
    ) -> int:
        """Seize the stopped tree `pids` (root first), continue it, trace it to the end.

        `program` (the root's program pid and its parent's) and `base` (the one
        its other processes were numbered with, where the tree started): the
        tree keeps the pids it showed the program before (issue 11).
        """
        self.chan = chan
        try:
            runner = self._ready if not channel.view_maps(view) else self._runner(view)
            if isinstance(runner.coordinator, InstanceCoordinator):
                runner.coordinator.bind_pids(instance, pids[0], *program, base=base)
            placing = self._placing(runner)
            if placing is not None:
                placing.bind(decode_view(view) if view else EMPTY_VIEW, instance)
            try:
                runner.adopt(pids)
            finally:
                if isinstance(runner.coordinator, InstanceCoordinator):
                    runner.coordinator.close()  # its /proc snapshots
        except (ptraceio.PtraceRequestError, OSError) as exc:
            # What was seized dies with us (EXITKILL); the rest stays stopped for the agent.
            message = os.strerror(exc.errno) if exc.errno else str(exc)
            self.report(channel.encode(channel.OP_FAILED, pid=pids[0], message=message))
            return 1
        self.report(channel.encode(channel.OP_DONE))
        return 0


class HostRunner(Runner):
    """`Runner` plus T's channel: commands between stops (`op=detach`), adoption."""

    def __init__(self, tracer: Tracer, coordinator: InstanceCoordinator) -> None:
        super().__init__(
            (), {}, "", tracer.table, coordinator, trace_all=False, measure=measure_exit,
            skip=coordinator.skippable(),
        )  # fmt: skip
        self.tracer = tracer
        self.waker = 0
        self.waker_locks = False  # the waker also watches the lock socket (calls wait)
        self.watched: frozenset[int] = frozenset()  # threads whose signals the waker watches
        # Issue 11: senders of signals the agent is about to deliver for a deputy
        # (`op=sigfrom`): (real pid, sig) -> [(agent pid, program pid, uid)], oldest first.
        self.senders: dict[tuple[int, int], list[tuple[int, int, int]]] = {}
        coordinator.relayed = self.relayed_sender

    def _decode(self, pid: int, status: int, usage: Usage) -> Stop | None:
        """The runner's, plus the sender of a signal relayed by the agent (issue 11)."""
        stop = super()._decode(pid, status, usage)
        if type(stop) is SignalStop:
            self._relayed(stop)
        return stop

    def _relayed(self, stop: SignalStop) -> None:
        """A signal the agent sent for a deputy, delivered to a handler: its real sender.

        The agent writes `op=sigfrom` before its kill(), so it is on the channel
        (or already read) by the time the signal stops its receiver here.
        """
        machine = self.machine
        th = machine.threads.get(stop.tid) if machine is not None else None
        try:
            _signo, code, si_pid, _uid = ptraceio.sender(stop.tid)
            found = self.relayed_sender(th.tgid if th else stop.tid, stop.sig, code, si_pid)
            if found is not None:
                ptraceio.set_sender(stop.tid, *found)
        except ptraceio.PtraceRequestError:
            return

    def relayed_sender(self, tgid: int, sig: int, code: int, si_pid: int) -> tuple[int, int] | None:
        """(program pid, uid) that signal `sig` to `tgid` came from, if the agent relayed
        it for a deputy (si_code SI_USER, si_pid the agent's); None otherwise."""
        if code != SI_USER:
            return None
        key = (tgid, sig)
        if key not in self.senders:
            self._read_senders()
        waiting = self.senders.get(key)
        if not waiting:
            return None
        for i, (agent, sender, uid) in enumerate(waiting):
            if si_pid == agent:
                del waiting[i]
                if not waiting:
                    del self.senders[key]
                return sender, uid
        return None

    def _read_senders(self) -> None:
        """Take what is on the channel now: `op=sigfrom` here, the rest for `_obey`."""
        chan = self.tracer.chan
        if chan is None:
            return
        chan.setblocking(False)
        try:
            while True:
                data, fds = channel.receive(chan)
                for fd in fds:
                    os.close(fd)
                if not data:
                    return
                if not self._sigfrom(data):
                    self.tracer.kept.append(data)
        except OSError:
            return  # nothing more (BlockingIOError), or the agent is gone: `_command` sees it
        finally:
            chan.setblocking(True)

    def _sigfrom(self, data: bytes) -> bool:
        """Keep an `op=sigfrom` record; False for any other record."""
        try:
            record = channel.decode(data)
            if record[b"op"] != channel.OP_SIGFROM:
                return False
            key = (channel.number(record, b"pid"), channel.number(record, b"sig"))
            sender = (
                channel.number(record, b"agent"),
                channel.number(record, b"from"),
                channel.number(record, b"uid"),
            )
        except channel.ChannelError:
            return False
        waiting = self.senders.setdefault(key, [])
        waiting.append(sender)
        del waiting[:-16]  # signals that never arrived (their process was gone)
        return True

    def adopt(self, pids: tuple[int, ...]) -> None:
        """Seize every thread of the stopped processes `pids` and run the loop until they end."""
        root = pids[0]
        machine = self.machine = Machine(root, self.intercept, self.trace_all)
        machine.threads.clear()
        machine.processes.clear()
        for pid in pids:
            tids = sorted(int(t) for t in os.listdir(f"/proc/{pid}/task"))
            machine.processes[pid] = Process(
                pid, 0 if pid == root else parent_of(pid), ptraceio.cmdline(pid), threads=set(tids)
            )
            for tid in tids:
                ptraceio.seize(tid, OPTIONS)
                machine.threads[tid] = Thread(tid, pid)
            if isinstance(self.coordinator, InstanceCoordinator):
                self.coordinator.adopted(pid, tids, pid == root)
        self.tracer.report(channel.encode(channel.OP_SEIZED, pid=root, tracer=os.getpid()))
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGCONT)
        self._loop(machine)

    def _loop(self, machine: Machine) -> None:
        chan = self.tracer.chan
        if chan is not None:
            self.waker = spawn_waker(chan)
        try:
            while machine.alive:
                try:
                    pid, status, usage = self._wait()
                except ChildProcessError:
                    log.warning("no traced process left, %d unaccounted for", len(machine.threads))
                    return
                if pid == self.waker and pid:
                    self.waker = 0
                    if self._command(machine):
                        return
                    continue
                stop = self._decode(pid, status, usage)
                if stop is not None:
                    self._execute(machine.step(stop))
                while self.tracer.kept:
                    if self._obey(machine, self.tracer.kept.pop(0)):
                        return
                self._serve_locks()
        finally:
            if self.waker:
                with contextlib.suppress(OSError):
                    os.kill(self.waker, signal.SIGKILL)
                    os.waitpid(self.waker, 0)
                self.waker = 0

    def _command(self, machine: Machine) -> bool:
        """Serve what arrived on the channel; True once the tree is detached."""
        chan = self.tracer.chan
        assert chan is not None
        chan.setblocking(False)
        try:
            data, fds = channel.receive(chan)
        except BlockingIOError:
            data, fds = b"?", []  # spurious wake: keep listening
        except OSError:
            data, fds = b"", []
        finally:
            chan.setblocking(True)
        for fd in fds:
            os.close(fd)
        if not data:
            # The agent is gone: trace on without listening; waiting locks are the kernel's.
            for tid, decision in self.tracer.locks.abandon():
                self.decide(tid, decision)
            return False
        if data != b"?" and self._obey(machine, data):
            return True
        locks = self.tracer.locks
        if locks.waiting:
            locks.drain()
            for tid, decision in locks.interrupting():
                self.decide(tid, decision)
        self._serve_locks()
        if not self.waker:
            self._arm(chan)
        return False

    def _arm(self, chan: socket.socket) -> None:
        locks = self.tracer.locks
        self.waker_locks = bool(locks.waiting) and locks.sock is not None
        self.watched = locks.blocked_tids() if self.waker_locks else frozenset()
        if self.waker_locks:
            # Wake on an answer, or once a signal would interrupt a waiting thread's
            # call (the waker looks every POLL: no fork per look).
            watched = self.watched
            self.waker = spawn_waker(
                chan, locks.sock, (lambda: interrupted(watched)) if watched else None
            )
        else:
            self.waker = spawn_waker(chan)

    def _serve_locks(self) -> None:
        """Answer the deferred lock calls whose answers were read; watch the others."""
        locks = self.tracer.locks
        for tid, decision in locks.take_ready():
            self.decide(tid, decision)
        chan = self.tracer.chan
        stale = locks.waiting and (not self.waker_locks or locks.blocked_tids() != self.watched)
        if chan is not None and stale:
            # A call now waits: the waker must watch the lock socket (and its signals).
            if self.waker:
                with contextlib.suppress(OSError):
                    os.kill(self.waker, signal.SIGKILL)
                    os.waitpid(self.waker, 0)
                self.waker = 0
            self._arm(chan)

    def _obey(self, machine: Machine, data: bytes) -> bool:
        """Carry out one command from the agent; True once the tree is detached."""
        try:
            op = channel.decode(data)[b"op"]
        except channel.ChannelError as exc:
            log.warning("tracer channel: %s", exc)
            return False
        if op == channel.OP_SIGFROM:
            self._sigfrom(data)
            return False
        if op == channel.OP_DETACH:
            pids = self.detach_all(machine)
            self.tracer.report(channel.encode(channel.OP_DETACHED, pids=channel.pid_list(pids)))
            return True
        return False

    def detach_all(self, machine: Machine) -> tuple[int, ...]:
        """Stop and detach every traced thread; the processes left stopped, root first.

        A thread is let go only at a stop of our own asking (PTRACE_INTERRUPT)
        outside any intercepted call: a call stopped at its seccomp stop is
        served first, as always.  SIGSTOP is made pending on every process
        while all its threads are held, so each stops as soon as it is detached.
        """
        # A lock call waiting for its answer would never reach a stop of ours.
        for tid, decision in self.tracer.locks.interrupt_all():
            self.decide(tid, decision)
        asked: set[int] = set()
        held: set[int] = set()
        while True:
            for tid in list(machine.threads):
                if tid not in asked:
                    asked.add(tid)
                    ptraceio.interrupt(tid)
            if not machine.threads.keys() - held:
                break
            try:
                pid, status, usage = os.wait4(-1, WALL)
            except ChildProcessError:
                break
            stop = self._decode(pid, status, usage)
            if stop is None:
                continue
            th = machine.threads.get(stop.tid)
            idle = th is not None and th.pending is None
            if isinstance(stop, (EventStop, GroupStop)) and stop.tid in asked and idle:
                held.add(stop.tid)
                continue
            self._execute(machine.step(stop))
            if stop.tid in asked and stop.tid in machine.threads:
                ptraceio.interrupt(stop.tid)  # ask again: it ran on to finish its call
        live = [p.pid for p in machine.processes.values() if p.threads & held]
        for pid in live:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGSTOP)
        for tid in held:
            ptraceio.detach(tid)
        root = machine.main_pid
        return tuple(sorted(live, key=lambda p: (p != root, p)))


def spawn_waker(
    chan: socket.socket,
    also: socket.socket | None = None,
    watch: Callable[[], bool] | None = None,
) -> int:
    """Fork W: it exits when `chan` (or `also`) is readable, or once `watch()` is true.

    `watch` is looked at every POLL seconds.  T's wait4 sees W exit.
    """
    pid = os.fork()
    if pid == 0:
        try:
            import ctypes

            ctypes.CDLL(None).prctl(1, signal.SIGKILL, 0, 0, 0)  # PR_SET_PDEATHSIG
            fds = [chan] if also is None else [chan, also]
            while not select.select(fds, [], [], POLL if watch else None)[0]:
                if watch is not None and watch():
                    break
        finally:
            os._exit(0)
    return pid


def parent_of(pid: int) -> int:
    """The parent pid of `pid` from /proc (0 when gone)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return int(f.read().rsplit(b")", 1)[1].split()[1])
    except (OSError, ValueError, IndexError):
        return 0


def same_process(pidfd: int, pid: int) -> bool:
    """`pidfd` still refers to a live (unreaped) process numbered `pid`."""
    try:
        with open(f"/proc/self/fdinfo/{pidfd}", "rb") as f:
            for line in f:
                if line.startswith(b"Pid:"):
                    return int(line.split()[1]) == pid
    except (OSError, ValueError):
        pass
    return False


def release(pid: int) -> None:
    """Let go of a process seized by mistake: stop it, detach (it runs on untouched)."""
    try:
        ptraceio.interrupt(pid)
        os.waitpid(pid, WALL)
        ptraceio.detach(pid)
    except (OSError, ptraceio.PtraceRequestError):
        log.warning("could not release pid %d seized by mistake", pid)


def become_tracer() -> None:
    """Signal state of a fresh T (forked from the zygote, which ignores SIGCHLD)."""
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGPIPE):
        signal.signal(sig, signal.SIG_IGN)  # only SIGKILL ends T (and its tracees)
