"""The zygote Z, and the agent's handle on it (`Tracing`).

`dcp-agent` forks Z in `main()` before its event loop or any thread exists
(forking a threaded process is unsafe, and a tracer *thread* in the agent
would race the agent's reaper).  Z has the tracer imported and blocks on a
`SOCK_SEQPACKET` socket; for each `op=trace` (with the descriptors `[chan,
go_w]`) it forks one tracer T (`vmagent.trace.host`) and reaps it when it
ends.  A dead Z is replaced by a fresh *exec'd* one (the agent is threaded by
then); until then sessions are refused with `instance tracer unavailable`:
nothing runs untraced.
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import logging
import os
import select
import signal
import socket
import sys
from pathlib import Path
from typing import NoReturn

from tracer.arch import table_for
from tracer.runner import interception_filter
from tracer.seccomp import PreparedFilter
from tracer.syscalls import SyscallTable, by_name
from vmagent.errors import AgentError
from vmagent.exec.spawn import Gate
from vmagent.trace import channel, host

log = logging.getLogger(__name__)

PR_SET_PDEATHSIG = 1
SEND_TIMEOUT = 2.0  # s to queue one request for Z (it only forks)
ZYGOTE_FD = 3
ZYGOTE_NICE = 10  # where an exec'd zygote finds its socket
PROJECT_ROOT = str(Path(__file__).resolve().parent.parent.parent)
YAMA_SCOPE = "/proc/sys/kernel/yama/ptrace_scope"


class TracerUnavailable(AgentError):
    """instance tracer unavailable"""

    def __init__(self) -> None:
        super().__init__(self.__doc__)


# -- Z ----------------------------------------------------------------------------


def main(fd: int, agent: int) -> NoReturn:
    """Entry of an exec'd zygote: serve the socket at `fd` for the agent of pid `agent`."""
    logging.basicConfig(
        level=logging.WARNING, format="%(asctime)s zygote %(levelname)s: %(message)s"
    )
    serve(socket.socket(fileno=fd), agent)


def serve(sock: socket.socket, agent: int) -> NoReturn:
    """Hand each `op=trace` to a waiting tracer, until the agent closes its end.

    One tracer is always forked ahead and waits (its runner prepared) on a
    socket of its own: a session never waits for a fork.
    """
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if os.getppid() != agent:
        os._exit(0)  # the agent died before PDEATHSIG was armed (it may be pid 1)
    signal.signal(signal.SIGCHLD, signal.SIG_IGN)  # tracers are reaped by the kernel
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGPIPE):
        signal.signal(sig, signal.SIG_IGN)
    sock.setblocking(True)
    table = table_for(os.uname().machine)
    # Z's forks (one per session, right after the hand-off) must not compete with
    # the session it just started: Z runs niced; a tracer returns to the agent's
    # priority once it has its session (root only: others may not lower a nice).
    if os.geteuid() == 0:
        os.nice(ZYGOTE_NICE)
    warm = _fork_tracer(sock, table)
    while True:
        try:
            data, fds = channel.receive(sock)
        except OSError:
            os._exit(0)
        if not data:
            for fd in fds:
                os.close(fd)
            os._exit(0)  # the agent closed its end: the waiting tracer sees EOF too
        try:
            request = channel.decode(data)
            adopting = request[b"op"] == channel.OP_ADOPT and len(fds) == 1
            if not adopting and (request[b"op"] != channel.OP_TRACE or len(fds) != 3):
                raise channel.ChannelError("expected op=trace with three descriptors")
        except channel.ChannelError as exc:
            log.error("zygote: %s", exc)
            for fd in fds:
                os.close(fd)
            continue
        try:
            channel.send(warm, data, tuple(fds))
        except OSError:  # the waiting tracer died: a fresh one takes this session
            warm.close()
            warm = _fork_tracer(sock, table)
            channel.send(warm, data, tuple(fds))
        for fd in fds:
            os.close(fd)
        warm.close()
        warm = _fork_tracer(sock, table)


def _fork_tracer(listening: socket.socket, table: SyscallTable) -> socket.socket:
    """Fork a tracer that prepares, then waits for its session; Z's end of its socket."""
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    if os.fork() == 0:
        code = 1
        pid = 0
        try:
            listening.close()
            ours.close()
            host.become_tracer()
            tracer = host.Tracer(table)
            data, fds = channel.receive(theirs)
            theirs.close()
            if os.geteuid() == 0:
                os.setpriority(os.PRIO_PROCESS, 0, os.getpriority(os.PRIO_PROCESS, 0) - ZYGOTE_NICE)
            if not data or len(fds) not in (1, 3):
                os._exit(0)  # the zygote is gone, or no session after all
            request = channel.decode(data)
            if request[b"op"] == channel.OP_ADOPT:  # a checkpointed tree (vmagent.checkpoint)
                pids = channel.pids_of(request)
                pid = pids[0]
                code = tracer.adopt(
                    socket.socket(fileno=fds[0]),
                    pids,
                    request.get(b"view", b""),
                    request.get(b"instance", b"").decode(errors="replace"),
                    (
                        channel.optional_number(request, b"vpid"),
                        channel.optional_number(request, b"vppid"),
                    ),
                    channel.optional_number(request, b"base"),
                )
                os._exit(code)
            pid = channel.number(request, b"pid")
            code = tracer.serve(
                socket.socket(fileno=fds[0]),
                fds[1],
                fds[2],
                pid,
                request.get(b"instance", b"").decode(errors="replace"),
                request.get(b"view", b""),
                (channel.number(request, b"vpid"), channel.number(request, b"vppid")),
            )
        except BaseException:
            log.exception("instance tracer of pid %d failed", pid)
        finally:
            os._exit(code)
    theirs.close()
    return ours


# -- the agent's side ------------------------------------------------------------------


class Tracing:
    """The agent's handle on its zygote: gates for children, hand-offs to tracers."""

    def __init__(self, instance: str, sock: socket.socket, pid: int) -> None:
        self.instance = instance
        self.sock = sock
        self.pid = pid
        self.table = table_for(os.uname().machine)
        self._filters: dict[tuple[str, bool], PreparedFilter] = {}
        self._yama = _yama_restricted()
        self.restarts = 0
        self.closed = False

    @classmethod
    def fork(cls, instance: str) -> Tracing:
        """Fork Z now: call before any thread exists (the agent's main, before its loop)."""
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        agent = os.getpid()
        pid = os.fork()
        if pid == 0:
            try:
                ours.close()
                os.setsid()
                null = os.open(os.devnull, os.O_RDWR)
                os.dup2(null, 0)
                os.dup2(null, 1)
                fd = theirs.fileno()  # above 2: 0-2 are open
                if fd > 3:
                    os.closerange(3, fd)
                os.closerange(fd + 1, 1 << 16)
                serve(theirs, agent)
            finally:
                os._exit(1)
        theirs.close()
        ours.settimeout(SEND_TIMEOUT)
        return cls(instance, ours, pid)

    @classmethod
    def spawn(cls, instance: str) -> Tracing:
        """Start Z as a fresh process (safe from a threaded process)."""
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        pid = _exec_zygote(theirs)
        theirs.close()
        ours.settimeout(SEND_TIMEOUT)
        return cls(instance, ours, pid)

    def restart(self) -> None:
        """Replace a dead Z with a fresh exec'd one."""
        with contextlib.suppress(OSError):
            self.sock.close()
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            self.pid = _exec_zygote(theirs)
        finally:
            theirs.close()
        ours.settimeout(SEND_TIMEOUT)
        self.sock = ours
        self.restarts += 1
        log.warning("instance tracer restarted (zygote pid %d)", self.pid)

    def alive(self) -> bool:
        """Z still holds its end (it never writes: anything readable is its EOF)."""
        if self.sock.fileno() < 0:
            return False
        ready, _, _ = select.select([self.sock], [], [], 0)
        return not ready

    def gate(self, view: bytes) -> Gate:
        """The gate of a child running under `view`; TracerUnavailable if Z is gone."""
        if not self.alive():
            self.restart()
            raise TracerUnavailable()
        # Installed before the child takes the program's ids: only a non-root agent
        # needs no_new_privs for it.
        nnp = os.geteuid() != 0
        key = (hashlib.sha256(view).hexdigest()[:32], nnp)
        filt = self._filters.get(key)
        if filt is None:
            maps = channel.view_maps(view)
            at_cwd = host.at_cwd_only(self.table, maps)
            names = host.interception(self.table, maps) - at_cwd
            numbers = by_name(self.table)
            intercept = frozenset(numbers[n].nr for n in names)
            filt = self._filters[key] = interception_filter(
                self.table, intercept, trace_all=False, no_new_privs=nnp,
                at_cwd=frozenset(numbers[n].nr for n in at_cwd if n in numbers),
            )  # fmt: skip
        return Gate(filt, ptracer=self.pid if self._yama else 0)

    def hand_off(
        self, session: str, pid: int, go_w: int, view: bytes, pids: tuple[int, int] = (0, 0)
    ) -> socket.socket:
        """Ask Z for a tracer of `pid` (takes `go_w`); the agent's end of T's channel.

        `pids`: the program pid `pid` stands for and its parent's (issue 11).

        A pidfd goes along: should T only get to it after the agent gave up on
        the child (a stopped zygote), it must not seize whatever reused the pid.
        """
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        pidfd = -1
        try:
            pidfd = os.pidfd_open(pid)
            channel.send(
                self.sock,
                channel.trace_request(session, pid, self.instance, view, pids),
                (theirs.fileno(), go_w, pidfd),
            )
        except OSError as exc:
            ours.close()
            log.warning("instance tracer unavailable: %s", exc)
            self.restart()
            raise TracerUnavailable() from exc
        finally:
            theirs.close()
            os.close(go_w)
            if pidfd >= 0:
                os.close(pidfd)
        ours.setblocking(False)
        return ours

    def adopt(
        self,
        session: str,
        pids: tuple[int, ...],
        view: bytes,
        program: tuple[int, int] = (0, 0),
        base: int = 0,
    ) -> socket.socket:
        """Ask Z for a tracer adopting the stopped tree `pids`; the agent's end of its channel.

        `program`, `base`: the tree's program pids (`channel.adopt_request`).
        """
        if not self.alive():
            self.restart()
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            channel.send(
                self.sock,
                channel.adopt_request(session, pids, self.instance, view, program, base),
                (theirs.fileno(),),
            )
        except OSError as exc:
            ours.close()
            self.restart()
            raise TracerUnavailable() from exc
        finally:
            theirs.close()
        ours.setblocking(False)
        return ours

    def reaped(self) -> bool:
        """Z has exited and was reaped (here, or by the agent's reaper)."""
        try:
            pid, _status = os.waitpid(self.pid, os.WNOHANG)
        except ChildProcessError:
            return True
        return pid != 0

    def close(self) -> None:
        """Let Z go (it exits at EOF; running tracers finish their sessions)."""
        self.closed = True
        with contextlib.suppress(OSError):
            self.sock.close()


def _exec_zygote(theirs: socket.socket) -> int:
    boot = (
        f"import sys; sys.path.insert(0, {PROJECT_ROOT!r}); "
        f"from vmagent.trace.zygote import main; main({ZYGOTE_FD}, {os.getpid()})"
    )
    python = os.path.realpath(sys.executable)
    return os.posix_spawn(
        python,
        [python, "-I", "-c", boot],
        dict(os.environ),
        file_actions=[
            (os.POSIX_SPAWN_DUP2, theirs.fileno(), ZYGOTE_FD),
            (os.POSIX_SPAWN_OPEN, 0, os.devnull, os.O_RDONLY, 0),
            (os.POSIX_SPAWN_OPEN, 1, os.devnull, os.O_WRONLY, 0),
        ],
        setsid=True,
    )


def _yama_restricted() -> bool:
    """Yama ptrace_scope 1: only ancestors (or a named tracer) may attach."""
    try:
        with open(YAMA_SCOPE) as f:
            return f.read().strip() == "1"
    except OSError:
        return False
