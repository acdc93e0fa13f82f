"""Is a remote program waiting to read a given pipe?  (Lazy stdin forwarding.)

The deputy forwards a streamed input only after the agent says the remote side
reads it: a program that never reads its stdin must not make the deputy
consume bytes that a later process sharing that pipe would have read.  The
agent finds readers the way a debugger would: among the processes of the
program's session (the program is its session leader), one blocked in a read
on the pipe (by inode), or in a poll/select while holding the pipe.

Syscall numbers are per architecture (pass the machine name in).  Parsing is
pure; `waiting_readers` reads /proc.
"""

from __future__ import annotations

import os
from collections.abc import Iterable

# (read-like calls -> index of the fd argument, poll-like calls, calls whose
# third argument is the byte count: read, pread64)
_CALLS: dict[str, tuple[dict[int, int], frozenset[int], frozenset[int]]] = {
    "x86_64": (
        {0: 0, 17: 0, 19: 0, 295: 0, 327: 0, 275: 0, 40: 1, 45: 0, 47: 0},
        frozenset({7, 23, 232, 270, 271, 281, 441}),
        frozenset({0, 17}),
    ),
    "aarch64": (
        {63: 0, 67: 0, 65: 0, 69: 0, 286: 0, 76: 0, 71: 1, 207: 0, 212: 0},
        frozenset({72, 73, 22, 441}),
        frozenset({63, 67}),
    ),
}


class UnknownMachine(ValueError):
    """No syscall numbers for this architecture."""


def parse_syscall(text: str) -> tuple[int, list[int]] | None:
    """(nr, args) from /proc/PID/syscall while blocked in a call, else None."""
    parts = text.split()
    if not parts or parts[0] in ("running", "-1"):
        return None
    try:
        return int(parts[0]), [int(p, 16) for p in parts[1:7]]
    except ValueError:
        return None


def session_of(stat: str) -> int:
    """Session id from /proc/PID/stat (field 6; comm may contain spaces and parens)."""
    return int(stat.rsplit(")", 1)[1].split()[3])


class ReaderProbe:
    """Finds which of some pipe inodes a session is blocked reading."""

    def __init__(self, machine: str, proc: str = "/proc") -> None:
        if machine not in _CALLS:
            raise UnknownMachine(f"no syscall numbers for {machine}")
        self.reads, self.polls, self.counted = _CALLS[machine]
        self.proc = proc

    def _ino(self, task: str, fd: int | str) -> int | None:
        try:
            return os.stat(f"{self.proc}/{task}/fd/{fd}").st_ino
        except OSError:
            return None

    def waiting(self, session: int, inodes: Iterable[int]) -> dict[int, int]:
        """The inodes among `inodes` that a process of `session` waits to read, each
        with how many bytes it asks for (0: not known, as in poll or readv)."""
        wanted = set(inodes)
        found: dict[int, int] = {}
        try:
            pids = [p for p in os.listdir(self.proc) if p.isdigit()]
        except OSError:
            return found
        for pid in pids:
            try:
                with open(f"{self.proc}/{pid}/stat") as f:
                    if session_of(f.read()) != session:
                        continue
                # Any thread may be the reader (a worker thread reading stdin while
                # the main thread joins it): each has its own /proc/.../syscall.
                tasks = [f"{pid}/task/{tid}" for tid in os.listdir(f"{self.proc}/{pid}/task")]
            except (OSError, ValueError, IndexError):
                continue
            for task in tasks:
                self._look(task, wanted, found)
        return found

    def _look(self, task: str, wanted: set[int], found: dict[int, int]) -> None:
        """Add to `found` the inode of `wanted` that thread `task` (PID/task/TID) waits on."""
        try:
            with open(f"{self.proc}/{task}/syscall") as f:
                call = parse_syscall(f.read())
        except (OSError, ValueError):
            return
        if call is None:
            return
        nr, args = call
        if nr in self.reads:
            ino = self._ino(task, args[self.reads[nr]])
            if ino is not None and ino in wanted:
                count = args[2] if nr in self.counted else 0
                found[ino] = max(found.get(ino, 0), count)
        elif nr in self.polls:
            try:
                fds = os.listdir(f"{self.proc}/{task}/fd")
            except OSError:
                return
            for fd in fds:
                ino = self._ino(task, fd)
                if ino is not None and ino in wanted:
                    found.setdefault(ino, 0)
