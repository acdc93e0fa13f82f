"""The seam between the tracer and the OSS: intercepted calls in, decisions out.

The tracer turns every intercepted syscall entry into a `SyscallCall` value and
asks a `Coordinator` for a `Decision`.  The coordinator never touches ptrace:
it sees plain values (numbers, decoded paths and argv) and answers with values
(let it run, run it with rewritten arguments, or complete it with a result).
The embedded coordinator answers in-process; a remote one forwards to `dcp-oss`.
"""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType
from typing import Any, NamedTuple, Protocol

# A rewritten argument: an int replaces the register value; bytes are written
# into the tracee as a NUL-terminated string and the register points at it; a
# tuple of bytes becomes a NULL-terminated array of such strings (argv, envp).
ArgValue = int | bytes | tuple[bytes, ...]
# The default of the mapping fields: one shared read-only empty mapping.
_NONE: Mapping[Any, Any] = MappingProxyType({})


class SyscallCall(NamedTuple):
    """One intercepted syscall entry, as the coordinator sees it."""

    pid: int  # thread-group id (the process)
    tid: int  # the thread that made the call
    nr: int
    name: str
    args: tuple[int, ...]  # the six raw argument registers
    # Path arguments, by argument index, exactly as the program passed them.
    paths: Mapping[int, bytes] = _NONE
    # For each *relative* path argument: the real directory the kernel would
    # resolve it against (the process cwd, or the path behind its dirfd).
    bases: Mapping[int, bytes] = _NONE
    # execve/execveat only: the argument vector.
    argv: tuple[bytes, ...] | None = None
    # getcwd only: the real working directory of the calling thread.
    cwd: bytes | None = None
    # `sockaddr_out` arguments: the buffer size the program passed (read at entry).
    sizes: Mapping[int, int] = _NONE


class Allow(NamedTuple):
    """Run the syscall unchanged."""

    observe_result: bool = False  # call `Coordinator.on_result` at syscall exit


class Rewrite(NamedTuple):
    """Run the syscall with some arguments replaced (registers restored after)."""

    args: Mapping[int, ArgValue]
    observe_result: bool = False


class Complete(NamedTuple):
    """Do not run the syscall; return `result` (negative errno for an error).

    `writes` are (address, data) pairs copied into the tracee first, for calls
    that fill a buffer (getcwd, readlink).
    """

    result: int
    writes: tuple[tuple[int, bytes], ...] = ()


class Defer(NamedTuple):
    """Answer later: the thread stays at its syscall stop, every other one runs on.

    For calls that wait on something outside the tracer (a file lock another
    instance holds).  The runner's owner feeds the decision in with
    `Runner.decide(tid, decision)` once it has one.
    """


Decision = Allow | Rewrite | Complete


class ProcessSpawned(NamedTuple):
    """A new traced process (or thread, when `thread` is true) appeared."""

    pid: int
    ppid: int
    thread: bool


class ProcessExec(NamedTuple):
    """A process replaced its image; `argv` is what the program asked to run."""

    pid: int
    argv: tuple[str, ...]


class ProcessExited(NamedTuple):
    """A traced process ended: `exit_status` or `signal` is set.

    `cpu_us` (user + system) and `maxrss_kb` come from the rusage wait4
    returned with the exit (0 when the tracer did not get one).
    """

    pid: int
    exit_status: int | None
    signal: int | None
    cpu_us: int = 0
    maxrss_kb: int = 0


class ProcessUsage(NamedTuple):
    """What one process consumed, measured by a metering tracer (an instance's).

    Sent once per process, after its `ProcessExited`, with `final` true;
    `io` holds the counters read at its exit stop (`vmagent.trace.measure`:
    rchar, wchar, rbytes, wbytes, and whatever else the measure adds), empty
    when the process died without one (SIGKILL).  `syscalls` counts its
    intercepted calls by OSS service.
    """

    pid: int
    cpu_us: int
    maxrss_kb: int
    io: Mapping[str, int] = _NONE
    syscalls: Mapping[str, int] = _NONE
    final: bool = True


ProcessEvent = ProcessSpawned | ProcessExec | ProcessExited | ProcessUsage


class Coordinator(Protocol):
    """What the tracer needs from the OSS (embedded or remote)."""

    def interception(self) -> frozenset[str]:
        """Names of the syscalls whose entry must stop the program.

        The union of what the run's active services need, and nothing else: a
        coordinator that wraps another adds its own calls to the inner one's
        (the cluster's adds execve/execveat, and whatever its services serve).
        Empty for a plain run, which then gets no seccomp filter at all
        (`tracer.runner.interception_filter`): a call added here for a cluster
        service must be added by the cluster coordinator, never by the embedded one,
        or every plain run pays for it.
        """
        ...

    def on_syscall(self, call: SyscallCall) -> Decision | Defer:
        """Decide what happens to one intercepted call (`Defer`: decided later)."""
        ...

    def on_result(self, call: SyscallCall, result: int, output: bytes | None) -> Complete | None:
        """Optionally replace the result of a call allowed with observe_result.

        `output` holds the bytes the call wrote to its output buffer (readlink,
        readlinkat, getcwd), when it succeeded.
        """
        ...

    def on_process(self, event: ProcessEvent) -> None:
        """Learn about process lifecycle (spawn, exec, exit, and usage when metered)."""
        ...

    def instance_of(self, pid: int) -> str:
        """The compute instance a process runs on (for records and summaries)."""
        ...
