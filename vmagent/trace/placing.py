"""Where a program exec'd on an instance runs: the instance tracer's coordinator.

`InstanceCoordinator` serves the session's view (its path maps, through the
embedded coordinator), intercepts execve/execveat and asks a
`PlacementSource` whether to place each one elsewhere.  Until placement from
instances exists the source is `RunHere` (every exec runs where it is); every
process event is reported on the tracer's channel either way.
"""

from __future__ import annotations

import errno
import logging
import socket
import struct
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

from tracer import ptraceio
from tracer.coordinator import (
    Allow,
    Complete,
    Coordinator,
    Decision,
    Defer,
    ProcessEvent,
    ProcessExec,
    ProcessExited,
    ProcessSpawned,
    ProcessUsage,
    Rewrite,
    SyscallCall,
)
from tracer.decode import signed
from tracer.runner import PathSkip, single_path_calls, skips_available
from vmagent.cluster.advisor import Advisor
from vmagent.cluster.coordinator import ClusterCoordinator, Ident, Target
from vmagent.cluster.placement import HOME, Placement
from vmagent.exec.remote import credentials
from vmagent.exec.view import View
from vmagent.trace import channel, placer, procview
from vmagent.trace.filelocks import LOCK_CALLS, LockForwarder
from vmagent.trace.listeners import Listeners, net_calls
from vmagent.trace.pidspace import PidSpace

if TYPE_CHECKING:
    from tracer.syscalls import SyscallTable

log = logging.getLogger(__name__)

EXEC_CALLS = frozenset({"execve", "execveat"})
# Calls answered in the program's pids (issue 11; `vmagent.trace.pidspace`):
# those that return a process's pid, and those that take one (negative: a process
# group, where the call says so).  Process group and session ids come back as the
# instance's: a placed process leads a session of its own there (no native
# equivalent), and the deputies there find their session leader in /proc by them.
PID_RESULTS = frozenset({"fork", "vfork", "clone", "clone3", "wait4"})
PID_ARGS = {  # call -> indexes of its pid arguments
    "kill": (0,),
    "tkill": (0,),
    "tgkill": (0, 1),
    "rt_sigqueueinfo": (0,),
    "rt_tgsigqueueinfo": (0, 1),
    "pidfd_open": (0,),
    "wait4": (0,),
    "getpgid": (0,),
    "getsid": (0,),
    "setpgid": (0, 1),
}
GROUP_ARGS = frozenset({"kill", "wait4"})  # a negative pid names a process group
# Signals to a pid this instance does not hold are sent at home (`SignalHome`):
# call -> index of the signal number.  tkill, and tgkill of a thread other than its
# process's main one, reach that thread alone; rt_sigqueueinfo as a kill (its value
# does not travel).
SENT_HOME = {"kill": 1, "tkill": 1, "tgkill": 2, "rt_sigqueueinfo": 1}
PID_CALLS = frozenset({"getpid", "gettid", "getppid", "waitid"}) | PID_RESULTS | frozenset(PID_ARGS)
# A signal the agent relayed for a deputy names the agent as its sender; a handler
# gets the real one at its delivery stop (`vmagent.trace.host`), a sigwaitinfo here.
SIGWAIT = frozenset({"rt_sigtimedwait"})
SI_USER = 0
PID_MAX = b"/proc/sys/kernel/pid_max"
KILL_INFO = struct.Struct("<iii4xiI")  # siginfo head: signo, errno, code, pid, uid
P_PID, P_PGID = 1, 2  # waitid's idtypes naming one pid, one process group


@dataclass(frozen=True, slots=True)
class Grant:
    """Run an exec on `instance` at `address` with the exec `ticket` the OSS minted."""

    instance: str
    address: str
    ticket: str


class SignalHome(Protocol):
    """Sends a signal of the program from its home, where every pid of the program is."""

    def __call__(self, pid: int, sig: int, thread: bool = False, sender: int = 0) -> int:
        """kill(`pid`, `sig`) at home (`pid` negative: a process group; `thread`: a
        thread's id, which alone gets it, as tgkill/tkill; `sender`: the sending
        process's program pid); 0 or its errno."""
        ...


class HomeProc(Protocol):
    """Home's /proc of the program's processes (`ChannelProc`)."""

    def files(self, pid: int) -> dict[str, bytes] | None:
        """Home's /proc/`pid` files, if it is a process of the program; else None."""
        ...

    def pids(self) -> list[int]:
        """The program's pids at home."""
        ...

    def pid_max(self) -> bytes:
        """Home's /proc/sys/kernel/pid_max (b"": not known)."""
        ...


class Relayed(Protocol):
    """Senders of signals the agent relayed for a deputy (`HostRunner.relayed_sender`)."""

    def __call__(self, tgid: int, sig: int, code: int, si_pid: int) -> tuple[int, int] | None:
        """(program pid, uid) of the sender of signal `sig` to process `tgid`, when the
        kernel's si_code/si_pid say the agent relayed it; else None."""
        ...


class PlacementSource(Protocol):
    """Decides, per exec, whether it runs on another instance."""

    def grant(self, call: SyscallCall) -> Grant | None:
        """A placement for this execve/execveat, or None: it runs here."""
        ...

    def finished(self, pid: int) -> None:
        """Process `pid` ended (a placed one frees its slot)."""
        ...


class RunHere:
    """Every exec runs where it is."""

    def grant(self, call: SyscallCall) -> Grant | None:
        """Never places."""
        return None

    def finished(self, pid: int) -> None:
        """Nothing to free."""


class InstanceCoordinator:
    """The embedded coordinator of a view, plus exec interception and channel reports."""

    def __init__(
        self,
        inner: Coordinator,
        report: Callable[[bytes], None],
        source: PlacementSource | None = None,
        locks: LockForwarder | None = None,
        listeners: Listeners | None = None,
        home: SignalHome | None = None,
        proc: HomeProc | None = None,
        view: tuple[SyscallTable, tuple[bytes, ...]] | None = None,
    ) -> None:
        self.inner = inner
        self.report = report
        self.source: PlacementSource = source or RunHere()
        self.locks = locks  # None: lock calls run on this kernel as they are
        if locks is not None:
            locks.program = self._holder  # how dcpfs names this session's lockers
        # Issue 13: listening sockets reported to the OSS (no agent: nobody asked).
        self.listeners = listeners or Listeners(lambda _m, _r: None, lambda _m: None)
        self.home = home  # None: a pid elsewhere is ESRCH
        # /proc/N of a pid elsewhere: a snapshot of home's (None: not found).
        self.proc = proc
        self.snapshots = procview.Snapshots(proc.files if proc else lambda _pid: None)
        # (pid, fd) of a listing of /proc under way -> ADDED once home's pids were added
        self._listed: dict[tuple[int, int], bool] = {}
        # pid -> the program's home pids when its listing of /proc began, and the
        # snapshots made since: while it reads the entries, a pid outside that set
        # is this instance's own (no round trip home), one inside is fetched once.
        self._scan: dict[int, tuple[frozenset[int], dict[int, bytes]]] = {}
        self._listing: set[int] = set()  # tids in a getdents64 of /proc
        self.pids = PidSpace()  # bound when the session starts (`Tracer.serve`)
        self.relayed: Relayed | None = None  # set by the runner that reads its channel
        self._live: set[int] = set()  # the session's processes but its root (real pids)
        self._tids: set[int] = set()  # every thread and process of the session (real)
        self._inner_names = inner.interception()
        # Lock calls always stop (the filter is built without a forwarder).
        net = net_calls()
        self._names = self._inner_names | EXEC_CALLS | PID_CALLS | LOCK_CALLS | net | SIGWAIT
        # /proc/N of the program's pids (issue 11): where the view stops path calls
        # already (its maps: the shared cwd, volumes), or where the C loop lets every
        # other path go at its stop (`skippable`: a placed Python's start-up stops about
        # a thousand times, a few µs each there against ~100 µs through Python).
        maps = bool(self._inner_names & procview.PATH_CALLS)
        self._proc_calls = procview.CALLS if maps or skips_available() else frozenset()
        self._skip = self._skippable(view, maps, self._names - self._inner_names)
        self._names |= self._proc_calls
        self._net_names = net - self._inner_names
        self._shared_net = net & self._inner_names
        self._inner_observes: set[int] = set()  # tids whose call the inner observes too

    def at_cwd_only(self) -> frozenset[str]:
        """Of `interception`, the calls that need to stop only with dirfd AT_FDCWD (the
        /proc paths of issue 11, when nothing else here wants them)."""
        others = self._inner_names | EXEC_CALLS | PID_CALLS | LOCK_CALLS | net_calls() | SIGWAIT
        return (procview.AT_CALLS & self._proc_calls) - others

    def interception(self) -> frozenset[str]:
        """The view's calls, every exec, the calls that return or take pids, locks,
        and listen/close (listening sockets)."""
        return self._names

    def skippable(self) -> PathSkip | None:
        """The calls trapped for their paths alone, which the runner's C loop lets go
        unseen here when they cannot name a path under /proc or the view's maps."""
        return self._skip

    def _skippable(
        self,
        view: tuple[SyscallTable, tuple[bytes, ...]] | None,
        maps: bool,
        mine: frozenset[str],
    ) -> PathSkip | None:
        """`skippable`: what `_proc_path` and `_listing_call` would allow as it is, and
        what the inner coordinator leaves to the kernel (`view`: the table and the
        prefixes it acts under, `EmbeddedCoordinator.acts_under`).  None: every call
        stops in Python (a view with maps but not what to judge them by)."""
        listings = procview.LISTING_CALLS - mine - self._inner_names
        if not maps:
            paths = procview.PATH_CALLS - mine - self._inner_names
            return PathSkip((b"/proc",), paths, listings)
        if view is None:
            return None
        table, acts_under = view
        paths = (single_path_calls(table) & (self._inner_names | procview.PATH_CALLS)) - mine
        return PathSkip((b"/proc", *acts_under), paths, listings)

    def on_syscall(self, call: SyscallCall) -> Decision | Defer:
        """An exec asks the placement source (and runs here without a grant)."""
        if call.name in self._proc_calls:
            if self.proc is not None and self.pids.bound:
                if call.name in procview.LISTING_CALLS:
                    return self._listing_call(call)
                found = self._proc_path(call)
                if found is not None:
                    return found
            if call.name not in self._inner_names:
                return Allow()
        if call.name in LOCK_CALLS and call.name not in self._inner_names:
            return self.locks.on_call(call) if self.locks is not None else Allow()
        if call.name in PID_CALLS and call.name not in self._inner_names:
            return self._pid_call(call)
        if call.name in self._net_names:
            return self.listeners.on_syscall(call)
        if call.name in SIGWAIT and call.name not in self._inner_names:
            return Allow(self.relayed is not None and call.args[1] != 0)
        if call.name in self._shared_net:
            # The view maps AF_UNIX paths (bind and connect are the inner's too): its
            # decision first; a plain one is the watch's (a UDP bind's result, a
            # connect to ::1).
            inner = self.inner.on_syscall(call)
            if isinstance(inner, (Allow, Rewrite)) and inner.observe_result:
                self._inner_observes.add(call.tid)
            if isinstance(inner, Allow):
                mine = self.listeners.on_syscall(call)
                args = mine.args if isinstance(mine, Rewrite) else None
                return Rewrite(args, observe_result=True) if args else Allow(observe_result=True)
            if isinstance(inner, Rewrite):
                return Rewrite(inner.args, observe_result=True)
            return inner
        if call.name in EXEC_CALLS:
            if self.source.grant(call) is not None:
                # Placing from an instance lands with the placement chunk.
                log.warning("exec placement is not implemented on instances: runs here")
            return self.inner.on_syscall(call) if call.name in self._inner_names else Allow()
        return self.inner.on_syscall(call)

    def _proc_path(self, call: SyscallCall) -> Decision | None:
        """A path under /proc/N in the program's pids: N's /proc here (its real pid), or a
        snapshot of home's when this instance does not hold N; None: not such a path."""
        for index, path in call.paths.items():
            if path == PID_MAX and self.proc is not None:
                # ps sizes its pid column from it: home's, as the pids are home's.
                value = self.proc.pid_max()
                if value and value.strip().isdigit():
                    uid, gid, _groups = credentials(call.pid)
                    try:
                        return Rewrite({index: self.snapshots.single("pid_max", value, uid, gid)})
                    except OSError as exc:
                        log.warning("home's pid_max not shown: %s", exc)
                return None
            if not path.startswith(b"/"):
                if call.bases.get(index) != b"/proc":
                    continue  # relative to /proc/N: N is already the real one or a snapshot
                path = b"/proc/" + path
            found = procview.proc_pid(path)
            if found is None:
                continue
            pid, rest = found
            real = self.pids.real(pid)
            if real is None and pid in self._tids:
                real = pid  # a real id the program got from the kernel (glibc's thread ids)
            if real is not None:
                return Rewrite({index: b"/proc/%d%s" % (real, rest)}) if real != pid else None
            scan = self._scan.get(call.pid)
            if scan is not None and pid not in scan[0]:
                return None  # listed here, not the program's at home: this instance's own
            where = scan[1].get(pid) if scan is not None else None
            if where is None:
                uid, gid, _groups = credentials(call.pid)
                try:
                    where = self.snapshots.path(pid, uid, gid)
                except OSError as exc:
                    log.warning("no snapshot of /proc/%d: %s", pid, exc)
                if where is not None and scan is not None:
                    scan[1][pid] = where
            if where is not None:
                return Rewrite({index: where + rest})
            # Not a process of the program at home (pid 1, a pid that is gone): this
            # instance's own /proc/N, as before (usually none, in its pid namespace).
        return None

    def _listing_call(self, call: SyscallCall) -> Decision:
        """getdents64 of /proc: its result is extended (`_listed_result`)."""
        if procview.fd_path(call.pid, signed(call.args[0], 32)) != b"/proc":
            return Allow()
        key = (call.pid, signed(call.args[0], 32))
        if key not in self._listed and self.proc is not None:
            # A listing begins: its entries are looked up against home's pids of now.
            home = [p for p in self.proc.pids() if self.pids.real(p) is None]
            self._scan[call.pid] = (frozenset(home), {})
            self._listed[key] = False
        self._listing.add(call.tid)
        return Allow(observe_result=True)

    def _listed_result(self, call: SyscallCall, result: int) -> Complete | None:
        """At the end of a listing of /proc, the program's pids this instance does not hold
        (once per listing: the next call ends it)."""
        key = (call.pid, signed(call.args[0], 32))
        added = self._listed.get(key)
        if added is None or result > 0:
            return None  # on with this instance's entries
        scan = self._scan.get(call.pid)
        records = b""
        if not added and result == 0 and scan is not None:
            records = procview.dirents(sorted(scan[0]), call.args[2] & 0xFFFFFFFF)
        if not records:
            del self._listed[key]  # the listing is over, and what it learnt of home
            self._scan.pop(call.pid, None)
            return None
        self._listed[key] = True
        return Complete(len(records), ((call.args[1], records),))

    def close(self) -> None:
        """Remove the /proc snapshots."""
        self.snapshots.close()

    def bind_pids(self, instance: str, root: int, pid: int, ppid: int, base: int = 0) -> None:
        """The session's first process `root` stands for program pid `pid`, child of `ppid`.

        `base`: the one its forked processes are numbered with (0: `instance`'s).
        """
        self.pids.bind(instance, root, pid, ppid, base)
        self._tids.add(root)

    def adopted(self, pid: int, tids: list[int], root: bool) -> None:
        """Process `pid` with threads `tids`, of a tree adopted stopped (a migration)."""
        self._tids.update(tids)
        self._tids.add(pid)
        if not root:
            self._live.add(pid)

    def _pid_call(self, call: SyscallCall) -> Decision:
        """A call that returns or takes pids, in the program's numbers."""
        pids = self.pids
        if not pids.bound:
            return Allow()
        name = call.name
        if name == "getpid":
            return Complete(pids.program(call.pid))
        if name == "gettid":
            return Complete(pids.program(call.tid))
        if name == "getppid":
            ppid = real_ppid(call.pid)
            return Complete(pids.parent(call.pid, ppid, ppid in self._live or ppid == pids.root))
        indexes = PID_ARGS.get(name, ())
        if name == "waitid":
            indexes = (1,) if call.args[0] in (P_PID, P_PGID) else ()
        rewrite: dict[int, int] = {}
        for index in indexes:
            pid = signed(call.args[index], 32)
            group = pid < -1 and name in GROUP_ARGS
            if group:
                pid = -pid
            elif pid <= 0:
                continue  # the caller, its group, every process: as they are
            real = pids.real(pid)
            if real is None and pid in self._tids:
                real = pid  # a real id the program got from the kernel (glibc's thread ids)
            if real is None:
                # Not a process of this instance (a sibling elsewhere, a home one).
                return self._elsewhere(call, -pid if group else pid)
            if real != pid:
                rewrite[index] = -real if group else real
        observe = name in PID_RESULTS
        return Rewrite(rewrite, observe) if rewrite else Allow(observe)

    def _elsewhere(self, call: SyscallCall, pid: int) -> Complete:
        """A call naming program pid `pid` (negative: a group) that this instance lacks.

        A signal goes home, where the pid is (a process there, or the deputy of
        one placed elsewhere, which passes it on); its outcome is kill's there.
        A wait is ECHILD: every child of a process is where it is (one placed
        elsewhere has its deputy here).  pidfd_open is ENOSYS (below); the rest,
        ESRCH, as for a pid that is gone.
        """
        name = call.name
        if name in ("wait4", "waitid"):
            return Complete(-errno.ECHILD)
        if name == "pidfd_open":
            # A pidfd names a process of this kernel; one held elsewhere has none.
            # ENOSYS, as on a kernel without pidfds: programs then fall back to
            # the pid itself (kill), which reaches it wherever it runs.  (ESRCH
            # would say it is gone: a supervisor would take it for dead.)
            return Complete(-errno.ENOSYS)
        index = SENT_HOME.get(name)
        # tkill, and tgkill of a thread that is not its process's main one, name a
        # thread (a thread id is a pid of the program: `PidSpace`): that one alone gets it.
        thread = name == "tkill" or (name == "tgkill" and call.args[0] != call.args[1])
        if name == "tgkill" and thread:
            tgid = signed(call.args[0], 32)
            if self.pids.real(tgid) is not None or tgid in self._tids:
                return Complete(-errno.ESRCH)  # a process here, without that thread
            pid = signed(call.args[1], 32)
            if pid <= 0:
                return Complete(-errno.EINVAL)
        if self.home is None or index is None:
            return Complete(-errno.ESRCH)
        sig = call.args[index]
        if not 0 <= sig < 65:
            return Complete(-errno.EINVAL)
        return Complete(-self.home(pid, sig, thread, self.pids.program(call.pid)))

    def on_result(self, call: SyscallCall, result: int, output: bytes | None) -> Complete | None:
        """A pid in the program's numbers; otherwise the inner coordinator's."""
        if call.tid in self._listing and call.name in procview.LISTING_CALLS:
            self._listing.discard(call.tid)
            return self._listed_result(call, signed(result))
        if call.name in PID_RESULTS:
            pid = signed(result)
            return Complete(self.pids.program(pid)) if pid > 0 else None
        if call.name == "fcntl" and self.locks is not None and call.name not in self._inner_names:
            return self.locks.getlk_result(call, result, self._holder)
        if call.name in self._net_names:
            return self.listeners.on_result(call, signed(result))
        if call.name in SIGWAIT and call.name not in self._inner_names:
            self._sigwaited(call, signed(result))
            return None
        if call.name in self._shared_net:
            done = None
            if call.tid in self._inner_observes:
                self._inner_observes.discard(call.tid)
                done = self.inner.on_result(call, result, output)
            return done if done is not None else self.listeners.on_result(call, signed(result))
        return self.inner.on_result(call, result, output)

    def _sigwaited(self, call: SyscallCall, sig: int) -> None:
        """sigwaitinfo took signal `sig` into its siginfo: the relayed sender, if it was."""
        if sig <= 0 or self.relayed is None or not call.args[1]:
            return
        try:
            head = ptraceio.read_memory(call.pid, call.args[1], KILL_INFO.size)
            signo, err, code, si_pid, si_uid = KILL_INFO.unpack(head)
            sender = self.relayed(call.pid, sig, code, si_pid)
            if sender is not None:
                out = KILL_INFO.pack(signo, err, code, sender[0], sender[1])
                ptraceio.write_memory(call.pid, call.args[1], out)
        except (OSError, ptraceio.PtraceRequestError, struct.error):
            pass  # the caller is gone, or its buffer: nothing to correct

    def _holder(self, real: int) -> int:
        """A lock holder's program pid: ours if it is a process of this session."""
        if real == self.pids.root or real in self._live:
            return self.pids.program(real)
        return real  # another session's (or nobody visible): the kernel's number

    def on_process(self, event: ProcessEvent) -> None:
        """Report the event on the channel, then pass it on."""
        match event:
            case ProcessSpawned(pid, ppid, thread):
                self._tids.add(pid)
                if not thread:
                    self._live.add(pid)
                    self.report(channel.spawned(pid, ppid))
            case ProcessExec(pid, argv):
                self.report(channel.exec_event(pid, argv))
            case ProcessExited(pid, status, sig):
                self._scan.pop(pid, None)
                self._live.discard(pid)
                self._tids.discard(pid)
                self.report(channel.exited(pid, status, sig))
                self.source.finished(pid)
                if self.locks is not None:
                    self.locks.gone(pid)
                if self.listeners.watched:
                    self.listeners.exited(pid, self._tids)
            case ProcessUsage(pid, cpu_us, maxrss_kb, io, syscalls):
                self.report(channel.usage(pid, cpu_us, maxrss_kb, io, syscalls))
                return  # the embedded coordinator has no use for it
        self.inner.on_process(event)

    def instance_of(self, pid: int) -> str:
        """The inner coordinator's."""
        return self.inner.instance_of(pid)


def real_ppid(pid: int) -> int:
    """The real parent of `pid` (0 when it is gone)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return int(f.read().rpartition(b")")[2].split()[1])
    except (OSError, ValueError, IndexError):
        return 0


# -- placement from an instance (issue 10, chunk B) ----------------------------------

PLACE_TIMEOUT = 2.0  # s T waits for the agent's answer (the exec is stopped meanwhile)


KILL_TIMEOUT = 5.0  # s T waits for a signal sent at home (the call is stopped meanwhile)
# Answers T may find late on its channel (dropped); anything else is a command it keeps.
ANSWERS = frozenset({channel.OP_KILLED, channel.OP_PROCD, placer.OP_GRANT, placer.OP_HOME})
PLACE_ANSWERS = frozenset({placer.OP_GRANT, placer.OP_HOME})  # to op=place


class ChannelKill:
    """T's side of `SignalHome`: `op=kill` on its channel, the agent's `op=killed` (bounded).

    The agent asks the session's deputy, which sends the signal at home.  No
    answer in `timeout` (the deputy's connection is being replaced): ESRCH,
    with one log line.
    """

    def __init__(
        self,
        chan: Callable[[], socket.socket | None],
        reqs: Callable[[], int],
        keep: Callable[[bytes], None] = lambda _data: None,
    ):
        self._chan = chan
        self._reqs = reqs
        self._keep = keep  # a command that arrived meanwhile (op=detach), for the runner
        self.timeout = KILL_TIMEOUT
        self._said = False

    def __call__(self, pid: int, sig: int, thread: bool = False, sender: int = 0) -> int:
        chan = self._chan()
        if chan is None:
            return errno.ESRCH
        req = str(self._reqs()).encode()
        fields: dict[str, bytes | int | str] = {"req": req, "pid": pid, "sig": sig}
        if thread:
            fields["thread"] = 1
        if sender > 0:
            fields["from"] = sender
        try:
            answer = channel.exchange(chan, channel.encode(channel.OP_KILL, **fields), req,
                                      self.timeout, self._keep, ANSWERS,
                                      frozenset({channel.OP_KILLED}))  # fmt: skip
            if answer is not None:
                return channel.number(answer, b"errno")
        except (OSError, channel.ChannelError) as exc:
            log.warning("a signal for pid %d was not sent at home: %s", pid, exc)
            return errno.ESRCH
        if not self._said:
            self._said = True
            log.warning("a signal for pid %d got no answer from home: ESRCH", pid)
        return errno.ESRCH


class ChannelProc:
    """T's side of /proc at home: `op=proc` on its channel, the agent's `op=procd` (bounded).

    `files(pid)`: home's /proc/`pid` files of a process of the program (None:
    none, or no answer); `pids()`: the program's pids at home.
    """

    def __init__(
        self,
        chan: Callable[[], socket.socket | None],
        reqs: Callable[[], int],
        keep: Callable[[bytes], None] = lambda _data: None,
    ):
        self._chan = chan
        self._reqs = reqs
        self._keep = keep
        self.timeout = KILL_TIMEOUT
        self._pid_max = b""

    def _ask(self, pid: int) -> channel.Record | None:
        chan = self._chan()
        if chan is None:
            return None
        req = str(self._reqs()).encode()
        message = channel.encode(channel.OP_PROC, req=req, pid=pid)
        try:
            answer = channel.exchange(
                chan, message, req, self.timeout, self._keep, ANSWERS, frozenset({channel.OP_PROCD})
            )
            if answer is None or channel.number(answer, b"errno") != 0:
                return None
        except channel.AgentGone:
            return None  # as no answer: the view reads this instance's /proc
        except (OSError, channel.ChannelError) as exc:
            log.warning("/proc/%d was not read at home: %s", pid, exc)
            return None
        return answer

    def files(self, pid: int) -> dict[str, bytes] | None:
        """Home's /proc/`pid` (`procview.FILES`), if it is a process of the program."""
        answer = self._ask(pid) if pid > 0 else None
        if answer is None:
            return None
        return {name: answer.get(name.encode(), b"") for name in procview.FILES}

    def pids(self) -> list[int]:
        """The program's pids at home (none when home does not answer)."""
        answer = self._ask(0)
        if answer is None:
            return []
        if not self._pid_max:
            self._pid_max = answer.get(b"pid_max", b"")
        items = answer.get(b"pids", b"").split(b",")
        return [int(i) for i in items if i.isdigit() and len(i) < 11]

    def pid_max(self) -> bytes:
        """Home's pid_max (asked once, with the program's pids)."""
        if not self._pid_max:
            self.pids()
        return self._pid_max


class ChannelAsk:
    """T's side of placement: `op=place` on its channel, then the agent's answer (bounded).

    The call is stopped anyway, so T waits on its one thread; without an answer
    in `timeout` the exec runs where it is (one log line per reason).
    """

    def __init__(
        self,
        chan: Callable[[], socket.socket | None],
        timeout: float = PLACE_TIMEOUT,
        keep: Callable[[bytes], None] = lambda _data: None,
    ):
        self._chan = chan
        self._keep = keep  # a command that arrived meanwhile (op=detach), for the runner
        self.timeout = timeout
        self._req = 0
        self._said: set[str] = set()

    def next_req(self) -> int:
        """A request number no other request on this channel has (placements, kills)."""
        self._req += 1
        return self._req

    def _once(self, reason: str) -> None:
        if reason not in self._said:
            self._said.add(reason)
            log.warning("an exec runs on this instance: %s", reason)

    def __call__(self, ident: Ident, pid: int, avoid: list[str]) -> Grant | None:
        """A grant for this exec from the agent (and the OSS), or None: it runs here."""
        chan = self._chan()
        if chan is None:
            return None
        req = self.next_req()
        message = placer.place_record(
            req, pid, ident.uid, ident.gid, ident.groups, ident.digest, avoid
        )
        try:
            record = channel.exchange(chan, message, str(req).encode(), self.timeout,
                                      self._keep, ANSWERS, PLACE_ANSWERS)  # fmt: skip
            if record is not None and record[b"op"] == placer.OP_GRANT:
                return Grant(
                    record[b"instance"].decode(),
                    record[b"address"].decode(),
                    record[b"ticket"].decode(),
                )
            if record is not None:
                self._once(record.get(b"reason", b"no reason").decode(errors="replace"))
                return None
        except channel.AgentGone:
            self._once("the agent is gone")
            return None
        except (OSError, channel.ChannelError, KeyError, UnicodeDecodeError) as exc:
            self._once(f"no placement ({type(exc).__name__}: {exc})")
            return None
        self._once(f"no answer from the agent in {self.timeout:.0f} s")
        return None


class PlacingCoordinator(ClusterCoordinator):
    """Places exec'd programs from an instance as the home does: the exec becomes a deputy.

    Same rules as at home (the first exec, the program's own, stays; fexecve and
    files that are not ELF or `#!` stay); where and with which ticket come from
    `ask` (the agent and the OSS).  `view` (the session's, naming its program)
    goes into each deputy's argv; `where` names this instance in its `--parent`.
    """

    def __init__(
        self,
        inner: Coordinator,
        ask: Callable[[Ident, int, list[str]], Grant | None],
        *,
        creds: Callable[[int], tuple[int, int, tuple[int, ...]]] = credentials,
    ) -> None:
        super().__init__(inner, [], Placement("spread", []), creds=creds)
        self._ask = ask
        self._granted: dict[str, str] = {}  # instance -> ticket of the grant being used
        self._recent: list[str] = []  # instances granted, most recent first

    def bind(self, view: View, where: str) -> None:
        """The session's view and this instance's name (set when the session starts)."""
        self.view = view
        self.where = where
        if view.placement == "auto":
            # The instances are the OSS's business: a long program on a busy instance
            # is placed where the OSS expects it to finish first; the rest stays here.
            self.advisor = Advisor(where)

    def _choose(self, ident: Ident, call: SyscallCall) -> str:
        if self.view.placement == "local" or not self.view.program:
            return HOME  # `local`, or a run no OSS knows (its agent could not place it)
        # Spread: the instances granted last rank last in the OSS (most recent
        # first), so sequential execs go round the instances, as from home.
        avoid = self._recent if self.view.placement in ("spread", "auto") else []
        grant = self._ask(ident, call.pid, avoid)
        if grant is None:
            return HOME
        self._recent = [grant.instance, *(n for n in self._recent if n != grant.instance)][:32]
        self.targets[grant.instance] = Target(grant.instance, grant.address, "", 0)
        self._granted[grant.instance] = grant.ticket
        return grant.instance

    def _ticket(self, target: Target, ident: Ident) -> str:
        return self._granted.pop(target.name)
