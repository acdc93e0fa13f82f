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
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import signal
import socket
from collections.abc import Callable

from oss.embedded import EmbeddedCoordinator
from oss.storage.pathmap import PathMap
from tracer import ptraceio
from tracer.coordinator import Coordinator
from tracer.runner import WALL, Runner
from tracer.syscalls import SyscallTable
from vmagent.cluster.coordinator import Ident
from vmagent.exec.view import EMPTY as EMPTY_VIEW
from vmagent.exec.view import decode as decode_view
from vmagent.trace import channel
from vmagent.trace.measure import measure_exit
from vmagent.trace.placing import (
    ChannelAsk,
    Grant,
    InstanceCoordinator,
    PlacementSource,
    PlacingCoordinator,
)

log = logging.getLogger(__name__)

OPTIONS = ptraceio.OPTIONS | ptraceio.O_TRACEEXIT


def coordinator_for(
    table: SyscallTable,
    maps: tuple[tuple[str, str], ...],
    report: Callable[[bytes], None],
    source: PlacementSource | None = None,
    ask: Callable[[Ident, int, list[str]], Grant | None] | None = None,
) -> InstanceCoordinator:
    """T's coordinator for a view with path `maps` (placing execs through `ask`, if given)."""
    inner: Coordinator = EmbeddedCoordinator(table, PathMap(dict(maps)))
    if ask is not None:
        inner = PlacingCoordinator(inner, ask)
    return InstanceCoordinator(inner, report, source)


def interception(table: SyscallTable, maps: tuple[tuple[str, str], ...]) -> frozenset[str]:
    """The calls a program of a view with `maps` stops on (what its filter must trap)."""
    return coordinator_for(table, maps, lambda _m: None).interception()


class Tracer:
    """One T: a runner prepared ahead (for the empty view), then one session traced."""

    def __init__(self, table: SyscallTable) -> None:
        self.table = table
        self.chan: socket.socket | None = None
        self.ask = ChannelAsk(lambda: self.chan)  # placement through the agent (issue 10)
        self._ready = self._runner(b"")  # built while T waits for its session

    def report(self, message: bytes) -> None:
        """Send one record to the agent (fire and forget)."""
        if self.chan is not None:
            with contextlib.suppress(OSError):  # the agent is gone: tracing goes on
                channel.send(self.chan, message)

    def _runner(self, view: bytes) -> Runner:
        coordinator = coordinator_for(
            self.table, channel.view_maps(view), self.report, ask=self.ask
        )
        return Runner((), {}, "", self.table, coordinator, trace_all=False, measure=measure_exit)

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
        self.report(channel.encode(channel.OP_DONE))
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
