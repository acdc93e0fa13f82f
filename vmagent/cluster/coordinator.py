"""`ClusterCoordinator`: the coordinator dcptrace uses with --instances / --oss.

`tracer.compose.clustered()` builds it around local instances (`LocalCluster`);
`vmagent.cluster.ossmode` derives the OSS mode's coordinator from it.

It wraps the embedded coordinator (`inner`) and takes over exactly one
decision: where a program started by execve/execveat runs.  When placement
picks another instance, the call is rewritten into the home deputy
(`vmagent/exec/deputy.py`) with envp untouched, so the traced process itself becomes
the deputy and keeps its pid, descriptors, cwd, environment, umask and rlimits.

A call stays home (is not placed) when the kernel would fail it or treat it in
a way a remote start cannot mirror:
- the very first exec (the tracer starting the program itself);
- execveat on a descriptor (AT_EMPTY_PATH, fexecve);
- a path that is not an executable regular file beginning with `#!` or ELF
  (execvp and shells retry other PATH entries after ENOENT/EACCES, and run
  ENOEXEC files with /bin/sh themselves: they must see the real error).
"""

from __future__ import annotations

import logging
import os
import stat
import struct
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import BinaryIO

from tracer.coordinator import (
    Allow,
    Complete,
    Coordinator,
    Decision,
    Defer,
    ProcessEvent,
    ProcessExec,
    ProcessExited,
    Rewrite,
    SyscallCall,
)
from vmagent.cluster.advisor import Advisor
from vmagent.cluster.placement import HOME, Placement
from vmagent.errors import AgentError
from vmagent.exec import protocol as P
from vmagent.exec import tickets
from vmagent.exec.remote import TicketDrop, credentials, deputy_argv, interpreter, remote_exec
from vmagent.exec.view import EMPTY, View

log = logging.getLogger(__name__)

AT_FDCWD = -100 & 0xFFFFFFFFFFFFFFFF
AT_EMPTY_PATH = 0x1000
EXEC_CALLS = frozenset({"execve", "execveat"})
# What a placed process costs beyond asking for its placement: the deputy's start
# and its remote session (bench/bench_cluster_make.py measures ~26 ms in all).
DEPUTY_START_S = 0.020


class OssModeUnavailable(AgentError):
    """Placing processes on OSS-registered instances needs exec tickets from the OSS."""


@dataclass(frozen=True, slots=True)
class Ident:
    """Who runs an exec and which exec: what a ticket is bound to."""

    uid: int
    gid: int
    groups: tuple[int, ...]
    digest: str  # tickets.exec_digest of the path and argv the deputy sends


@dataclass(frozen=True, slots=True)
class Target:
    """An instance programs can be placed on."""

    name: str
    address: str
    token: str
    cpus: int


def resolve_exec_path(call: SyscallCall) -> tuple[int, bytes] | None:
    """(path argument index, path as the kernel will open it), or None if not placeable."""
    if call.name == "execveat":
        if call.args[4] & AT_EMPTY_PATH:
            return None
        index = 1
    else:
        index = 0
    path = call.paths.get(index)
    if not path:
        return None
    return index, path


# binfmt_script: the `#!` line is read up to this many bytes; the kernel follows
# at most this many interpreters in a chain (a script whose interpreter is a script).
SHEBANG_MAX = 256
INTERPRETER_DEPTH = 4


def is_placeable_file(path: bytes, depth: int = 0) -> bool:
    """True when the kernel would exec `path`: an executable regular file starting
    with '#!' whose interpreter it would exec, or ELF whose loader (PT_INTERP) exists.

    Anything else stays home, where the real execve fails and the caller (a shell,
    execvp) prints its own message and status (127 `required file not found`).
    """
    try:
        st = os.stat(path)
        if not stat.S_ISREG(st.st_mode) or not os.access(path, os.X_OK):
            return False
        with open(path, "rb") as f:
            head = f.read(SHEBANG_MAX)
            if head.startswith(b"\x7fELF"):
                loader = elf_interpreter(f, head)
                return loader is None or os.path.exists(loader)
    except OSError:
        return False
    if not head.startswith(b"#!") or depth >= INTERPRETER_DEPTH:
        return False
    words = head[2:].split(b"\n", 1)[0].split()
    if not words:
        return False
    if not words[0].startswith(b"/"):
        return True  # relative to the process's cwd, not ours: the instance decides
    return is_placeable_file(words[0], depth + 1)


def elf_interpreter(f: BinaryIO, head: bytes) -> bytes | None:
    """The PT_INTERP path of a 64-bit little-endian ELF file (None: static or unknown)."""
    if len(head) < 64 or head[4] != 2 or head[5] != 1:
        return None
    (phoff,) = struct.unpack_from("<Q", head, 32)
    phentsize, phnum = struct.unpack_from("<HH", head, 54)
    for i in range(min(phnum, 64)):
        f.seek(phoff + i * phentsize)
        entry = f.read(56)
        if len(entry) < 56:
            return None
        (p_type,) = struct.unpack_from("<I", entry, 0)
        if p_type == 3:  # PT_INTERP
            (offset,) = struct.unpack_from("<Q", entry, 8)
            (size,) = struct.unpack_from("<Q", entry, 32)
            f.seek(offset)
            return f.read(min(size, 4096)).split(b"\0", 1)[0]
    return None


O_CLOEXEC_OCTAL = 0o2000000  # O_CLOEXEC in /proc/PID/fdinfo's octal `flags:`


def holds_socket(pid: int) -> bool:
    """True when `pid` keeps a socket past exec other than its stdin/out/err.

    A deputy carries a socket only as a byte stream one way; a listening socket,
    a socketpair passing descriptors (multiprocessing's forkserver, a server
    handed its listener) is only what it is at home, so such a process stays home.
    """
    try:
        fds = os.listdir(f"/proc/{pid}/fd")
    except OSError:
        return False
    for name in fds:
        if int(name) <= 2:
            continue
        try:
            if not stat.S_ISSOCK(os.stat(f"/proc/{pid}/fd/{name}").st_mode):
                continue
            with open(f"/proc/{pid}/fdinfo/{name}") as f:
                flags = next(line for line in f if line.startswith("flags:")).split()[1]
        except (OSError, StopIteration, IndexError):
            continue
        if not int(flags, 8) & O_CLOEXEC_OCTAL:
            return True
    return False


class ClusterCoordinator:
    """Delegates to `inner`, except for where exec'd programs run."""

    def __init__(
        self,
        inner: Coordinator,
        targets: Sequence[Target],
        placement: Placement,
        reconnect_window: float | None = None,
        *,
        creds: Callable[[int], tuple[int, int, tuple[int, ...]]] = credentials,
        view: View = EMPTY,
        where: str = HOME,
    ) -> None:
        self.inner = inner
        self._creds = creds  # pid -> (real uid, real gid, groups): what tickets vouch for
        # The program's view: every placed process carries it (the ticket binds its
        # digest); `where` names this machine in the deputies' `--parent`.
        self.view = view
        self.where = where
        self.targets = {t.name: t for t in targets}
        self.placement = placement
        self.reconnect_window = reconnect_window
        self._interpreter = interpreter()
        self._inner_calls = inner.interception()
        self._seen_first_exec = False
        self._where: dict[int, str] = {}  # pid -> instance it was placed on
        self._running: dict[int, str] = {}  # placed pids not yet exited
        self._ticket_files: dict[int, str] = {}  # placed pid -> its ticket file
        self.drop = TicketDrop()
        self.placed = 0
        # Under --placement auto: the cost model's adapter (set by whoever builds this
        # coordinator); None: every placeable exec is placed by the policy.
        self.advisor: Advisor | None = None
        # One line per placed process that lost data (its instance, a refused
        # session, a stream cut): the run must not end in status 0 (tracer.cli).
        self.lost: list[str] = []

    def interception(self) -> frozenset[str]:
        """The inner coordinator's calls plus execve/execveat (unless the cost model
        can place none and nobody reads its decisions)."""
        if self.advisor is not None and not self.advisor.needs_execs():
            return self._inner_calls
        return self._inner_calls | EXEC_CALLS

    def on_syscall(self, call: SyscallCall) -> Decision | Defer:
        """Place exec'd programs; everything else is the inner coordinator's."""
        if call.name not in EXEC_CALLS:
            return self.inner.on_syscall(call)
        decision = self.inner.on_syscall(call) if call.name in self._inner_calls else Allow()
        if isinstance(decision, (Complete, Defer)):
            return decision
        if not self._seen_first_exec:
            self._seen_first_exec = True  # the tracer starting the program: stays home
            return decision
        placed = self._place(call, decision)
        return placed if placed is not None else decision

    def _place(self, call: SyscallCall, decision: Allow | Rewrite) -> Rewrite | None:
        found = resolve_exec_path(call)
        if found is None or call.argv is None:
            return None
        index, path = found
        given = call.argv
        if isinstance(decision, Rewrite):
            mapped = decision.args.get(index)
            if isinstance(mapped, bytes):
                path = mapped  # the inner coordinator mapped a virtual path
            argv_in = decision.args.get(index + 1)
            if isinstance(argv_in, tuple):
                given = argv_in  # a mapped script runs as its interpreter (oss.embedded)
        real = path if path.startswith(b"/") else os.path.join(call.bases.get(index, b""), path)
        # Before the file and socket checks: most execs stay, and cheaply.
        if self.advisor is not None and not self.advisor.decide(call.pid, real, call.argv).placed:
            return None
        if not is_placeable_file(real) or holds_socket(call.pid):
            return None
        try:
            uid, gid, groups = self._creds(call.pid)
        except (OSError, ValueError):
            return None  # the process is gone or unreadable: let the kernel decide
        # A relative path stays relative: the remote side runs in the same cwd,
        # and a script's interpreter gets the path as given (its $0).  Only a
        # path relative to some other directory (execveat's dirfd) is joined.
        fd_relative = call.name == "execveat" and call.args[0] != AT_FDCWD
        exec_path = real if fd_relative else path
        bound = remote_exec(exec_path, given)
        ident = Ident(uid, gid, groups, tickets.exec_digest(bound[0], bound[1:]))
        asked = time.monotonic()
        name = self._choose(ident, call)
        if name == HOME:
            return None
        if self.advisor is not None:
            self.advisor.placement_took(time.monotonic() - asked + DEPUTY_START_S)
        target = self.targets[name]
        ticket_file = self.drop.put(self._ticket(target, ident), uid, gid)
        self._ticket_files[call.pid] = ticket_file
        argv = deputy_argv(
            target.address, name, ticket_file, exec_path, given, self.reconnect_window,
            view=self.view.hex(), parent=f"{self.where}:{call.pid}",
        )  # fmt: skip
        self.placement.started(name)
        self._where[call.pid] = name
        self._running[call.pid] = name
        self.placed += 1
        log.debug("pid %d: %s placed on %s", call.pid, path, name)
        observe = decision.observe_result
        if call.name == "execveat":
            return Rewrite({0: AT_FDCWD, 1: self._interpreter, 2: argv, 4: 0}, observe)
        return Rewrite({0: self._interpreter, 1: argv}, observe)

    def _choose(self, ident: Ident, call: SyscallCall) -> str:
        """Where this exec runs (an instance name or HOME)."""
        return self.placement.choose()

    def _ticket(self, target: Target, ident: Ident) -> str:
        """A single-use exec ticket for `target` (minted here: its token is known)."""
        return tickets.mint(
            target.token,
            target.name,
            uid=ident.uid,
            gid=ident.gid,
            groups=ident.groups,
            digest=ident.digest,
            view=self.view.digest(),
        )

    def close(self) -> None:
        """Remove the ticket files (deputies that started have read theirs)."""
        self.drop.close()

    def on_result(self, call: SyscallCall, result: int, output: bytes | None) -> Complete | None:
        """The inner coordinator's."""
        return self.inner.on_result(call, result, output)

    def on_process(self, event: ProcessEvent) -> None:
        """Free a placement slot when a deputy ends; pass every event on."""
        if self.advisor is not None:
            if isinstance(event, ProcessExec):
                self.advisor.execed(event.pid, event.argv)
            elif isinstance(event, ProcessExited):
                self.advisor.exited(event.pid)
        if isinstance(event, ProcessExited):
            ticket_file = self._ticket_files.pop(event.pid, None)
            if ticket_file is not None:
                self.drop.discard(ticket_file)
                note = self.drop.take_note(ticket_file + P.LOSS_SUFFIX)
                if note is not None:
                    self.lost.append(note)
            name = self._running.pop(event.pid, None)
            if name is not None:
                self.placement.finished(name)
        self.inner.on_process(event)

    def placed_pids(self) -> frozenset[int]:
        """Deputies whose placed program still runs (safe to call from another thread)."""
        while True:
            try:
                return frozenset(self._running)
            except RuntimeError:  # the tracer thread changed it meanwhile
                continue

    def instance_of(self, pid: int) -> str:
        """Where the process's (last) program ran."""
        return self._where.get(pid) or self.inner.instance_of(pid)
