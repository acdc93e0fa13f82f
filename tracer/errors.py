"""The tracer's error types: one base, a subclass per failure with structured fields."""

from __future__ import annotations

import os


class TracerError(Exception):
    """The tracer failed."""


class PtraceRequestError(TracerError):
    """A ptrace request failed."""

    def __init__(self, pid: int, request: int, errno: int) -> None:
        self.pid, self.request, self.errno = pid, request, errno
        super().__init__(f"ptrace request {request:#x} on pid {pid}: {os.strerror(errno)}")


class SpawnError(TracerError):
    """The program could not be started; `exit_code` is the shell's convention."""

    def __init__(self, program: str, reason: str, exit_code: int) -> None:
        self.program, self.reason, self.exit_code = program, reason, exit_code
        super().__init__(f"{program}: {reason}")


class SeccompError(TracerError):
    """The seccomp filter could not be built or installed."""


class UsageError(TracerError):
    """The command line or configuration is invalid."""


class OutputError(TracerError):
    """A requested output (trace, summary, record) could not be written."""

    def __init__(self, what: str, path: str, strerror: str) -> None:
        self.what, self.path, self.strerror = what, path, strerror
        super().__init__(f"cannot write the {what} to {path}: {strerror}")
