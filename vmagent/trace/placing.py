"""Where a program exec'd on an instance runs: the instance tracer's coordinator.

`InstanceCoordinator` serves the session's view (its path maps, through the
embedded coordinator), intercepts execve/execveat and asks a
`PlacementSource` whether to place each one elsewhere.  Until placement from
instances exists the source is `RunHere` (every exec runs where it is); every
process event is reported on the tracer's channel either way.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from tracer.coordinator import (
    Allow,
    Complete,
    Coordinator,
    Decision,
    ProcessEvent,
    ProcessExec,
    ProcessExited,
    ProcessSpawned,
    ProcessUsage,
    SyscallCall,
)
from vmagent.trace import channel

log = logging.getLogger(__name__)

EXEC_CALLS = frozenset({"execve", "execveat"})


@dataclass(frozen=True, slots=True)
class Grant:
    """Run an exec on `instance` at `address` with the exec `ticket` the OSS minted."""

    instance: str
    address: str
    ticket: str


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
    ) -> None:
        self.inner = inner
        self.report = report
        self.source: PlacementSource = source or RunHere()
        self._inner_names = inner.interception()
        self._names = self._inner_names | EXEC_CALLS

    def interception(self) -> frozenset[str]:
        """The view's calls and every exec."""
        return self._names

    def on_syscall(self, call: SyscallCall) -> Decision:
        """An exec asks the placement source (and runs here without a grant)."""
        if call.name in EXEC_CALLS:
            if self.source.grant(call) is not None:
                # Placing from an instance lands with the placement chunk.
                log.warning("exec placement is not implemented on instances: runs here")
            return self.inner.on_syscall(call) if call.name in self._inner_names else Allow()
        return self.inner.on_syscall(call)

    def on_result(self, call: SyscallCall, result: int, output: bytes | None) -> Complete | None:
        """The inner coordinator's."""
        return self.inner.on_result(call, result, output)

    def on_process(self, event: ProcessEvent) -> None:
        """Report the event on the channel, then pass it on."""
        match event:
            case ProcessSpawned(pid, ppid, thread):
                if not thread:
                    self.report(channel.spawned(pid, ppid))
            case ProcessExec(pid, argv):
                self.report(channel.exec_event(pid, argv))
            case ProcessExited(pid, status, sig):
                self.report(channel.exited(pid, status, sig))
                self.source.finished(pid)
            case ProcessUsage(pid, cpu_us, maxrss_kb, io, syscalls):
                self.report(channel.usage(pid, cpu_us, maxrss_kb, io, syscalls))
                return  # the embedded coordinator has no use for it
        self.inner.on_process(event)

    def instance_of(self, pid: int) -> str:
        """The inner coordinator's."""
        return self.inner.instance_of(pid)
