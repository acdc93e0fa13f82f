"""File locks of a program's namespace, served by its storage server (docs/LOCKS.md).

Every instance's dcpfs forwards the `flock` and POSIX record locks its kernel
hands it (FUSE `flock`/`lock`) over its authenticated SSH connection to the
run's storage server, in the `dcp-lock` subsystem: one JSON object a line.

    -> {"id": 1, "op": "set", "kind": "posix", "path": "/v0/counter",
        "owner": 123, "pid": 456, "type": "w", "start": 0, "end": 9223372036854775807,
        "wait": true}
    <- {"id": 1, "errno": 0}            # or 11 (EAGAIN), 4 (EINTR: cancelled)
    -> {"id": 2, "op": "get", ...}      # F_GETLK
    <- {"id": 2, "errno": 0, "type": "w", "start": 0, "end": ..., "pid": 456}  # or type "u"
    -> {"op": "cancel", "id": 1}        # a FUSE interrupt: the wait ends with EINTR
    -> {"op": "drop", "kind": "flock", "owner": 123}   # its open file was released

An owner is (connection, kind, the kernel's lock_owner); `kind` is `flock` or
`posix` (the two never conflict, as in Linux).  The lease is the connection:
SSH keepalives (15 s, 3 missed) end a lost instance's connection, and every
lock it held is released then.
"""

from __future__ import annotations

import asyncio
import errno
from collections.abc import Callable
from dataclasses import dataclass

EOF_END = (1 << 63) - 1  # a range to the end of the file


@dataclass(frozen=True, slots=True)
class Owner:
    conn: int
    kind: str  # flock | posix
    owner: int


@dataclass(frozen=True, slots=True)
class Range:
    owner: Owner
    kind: str  # r | w
    start: int
    end: int  # inclusive
    pid: int

    def overlaps(self, start: int, end: int) -> bool:
        return self.start <= end and start <= self.end


class LockTable:
    """Locks per (kind, path); waiters wake on every change of their file."""

    def __init__(self) -> None:
        self.locks: dict[tuple[str, str], list[Range]] = {}
        self.changed: dict[tuple[str, str], asyncio.Event] = {}

    def conflict(self, path: str, want: Range) -> Range | None:
        """The first lock of another owner that `want` cannot coexist with."""
        for held in self.locks.get((want.owner.kind, path), []):
            if held.owner == want.owner or not held.overlaps(want.start, want.end):
                continue
            if "w" in (held.kind, want.kind):
                return held
        return None

    def _replace(self, path: str, want: Range) -> None:
        """Set `want`'s range to its type (u: none) for its owner, splitting its own locks."""
        key = (want.owner.kind, path)
        kept: list[Range] = []
        for held in self.locks.get(key, []):
            if held.owner != want.owner or not held.overlaps(want.start, want.end):
                kept.append(held)
                continue
            if held.start < want.start:
                kept.append(Range(held.owner, held.kind, held.start, want.start - 1, held.pid))
            if held.end > want.end:
                kept.append(Range(held.owner, held.kind, want.end + 1, held.end, held.pid))
        if want.kind != "u":
            kept.append(want)
        if kept:
            self.locks[key] = kept
        else:
            self.locks.pop(key, None)
        self._wake(key)

    def _wake(self, key: tuple[str, str]) -> None:
        event = self.changed.pop(key, None)
        if event is not None:
            event.set()

    def try_set(self, path: str, want: Range) -> Range | None:
        """Take (or release) `want` now; the conflicting lock when it cannot."""
        if want.kind != "u":
            held = self.conflict(path, want)
            if held is not None:
                return held
        self._replace(path, want)
        return None

    async def set(self, path: str, want: Range, wait: bool) -> int:
        """0, or EAGAIN (no wait); a wait ends by being granted or cancelled."""
        while True:
            if self.try_set(path, want) is None:
                return 0
            if not wait:
                return errno.EAGAIN
            key = (want.owner.kind, path)
            await self.changed.setdefault(key, asyncio.Event()).wait()

    def drop_connection(self, conn: int) -> int:
        """Release every lock of a connection (its lease ended); how many."""
        return self._drop(lambda owner: owner.conn == conn)

    def drop_owner(self, owner: Owner) -> int:
        """Release every lock of one owner (an flock's open file was released)."""
        return self._drop(lambda held: held == owner)

    def _drop(self, gone: Callable[[Owner], bool]) -> int:
        dropped = 0
        for key in list(self.locks):
            kept = [r for r in self.locks[key] if not gone(r.owner)]
            dropped += len(self.locks[key]) - len(kept)
            if kept:
                self.locks[key] = kept
            else:
                del self.locks[key]
            self._wake(key)
        return dropped
