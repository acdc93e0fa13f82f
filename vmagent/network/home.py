"""Servers of the program that run at home, reached at its address (issue 13, local runs).

The home coordinator of a `dcptrace --instances` run (as root) traps `listen`
(only `listen`: trapping `close` too would stop every close of the processes
at home).  At the exit of a successful `listen` it reads the socket's address
and port, as the instance tracers do (`vmagent.trace.listeners`), and tells
the run's OSS, which steers P:port to the home's host (`oss.network.plan`,
`HOME`): the program's instances route it there and the host DNATs it to its
own address on their bridge, so a server at home is reached at P:port from
outside and at `localhost:port` from the program's other processes.  Another
instance listening on that port first: `listen` fails with EADDRINUSE.  The
redirect goes when the listening process exits (a socket closed earlier keeps
its redirect until then).
"""

from __future__ import annotations

import errno
from collections.abc import Callable

from tracer.coordinator import Complete, SyscallCall
from vmagent.trace.listeners import Socket, fd_inode, listening

# (pid, port, proto, local address, open) -> 0, or the errno listen fails with
Report = Callable[[int, int, str, str, bool], int]


class HomeListeners:
    """Listening sockets of the processes at home, told to the run's OSS."""

    def __init__(self, report: Report) -> None:
        self._report = report
        self.watched: dict[int, Socket] = {}  # inode -> socket

    def on_result(self, call: SyscallCall, result: int) -> Complete | None:
        """A new listener: steered to home (EADDRINUSE if an instance holds the port)."""
        if result != 0:
            return None
        inode = fd_inode(call.pid, call.args[0] & 0xFFFFFFFF)
        found = listening(call.pid, inode) if inode and inode not in self.watched else None
        if found is None:
            return None
        local, port = found
        failed = self._report(call.pid, port, "tcp", local, True)
        if failed:
            return Complete(-(failed or errno.EADDRINUSE))
        self.watched[inode] = Socket(inode, call.pid, port, local)
        return None

    def exited(self, pid: int) -> None:
        """Process `pid` ended: its listeners' redirects go."""
        for inode, s in list(self.watched.items()):
            if s.pid == pid:
                del self.watched[inode]
                self._report(pid, s.port, s.proto, s.local, False)
