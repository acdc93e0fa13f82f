"""/proc of the program's processes held elsewhere, as an instance tracer shows it (issue 11).

The program's pid space is its home's (`vmagent.trace.pidspace`): a sibling
placed on another instance is, at home, its deputy, which takes the sibling's
name and argv, and a process that stayed home is itself.  So what a native
reader finds in /proc/N is home's /proc/N.  On an instance, a path under
/proc/N of a program pid that this instance does not hold is rewritten to a
snapshot of home's: T asks the session's deputy for the files readers use
(`FILES`, read at home by `vmagent.exec.deputy.proc_view`, which answers for
processes of its own program alone) and writes them into a private directory,
one per read, that only the program's user can open.  A listing of /proc gets
the program's home pids this instance does not hold after its own entries
(`dirents`), so `ps -p N` finds N.

Differences left (README, transparency): the figures in `stat` and `status`
(CPU, memory, threads, TracerPid) are those of the deputy standing in for a
placed process; only `FILES` are there (no fd/, maps, environ...); the
snapshot directory is mode 0500, where /proc/N is 0555.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import struct
import tempfile
import time
from collections.abc import Callable, Iterable

FILES = ("stat", "status", "cmdline", "comm")
# The calls whose path can name /proc/N (what `ps`, `test -d`, `cat` and Python use).
PATH_CALLS = frozenset(
    {
        "open", "openat", "stat", "lstat", "newfstatat", "statx", "access", "faccessat",
        "faccessat2", "readlink", "readlinkat", "chdir",
    }
)  # fmt: skip
# Of those, the ones with a directory descriptor first: they stop only with AT_FDCWD
# (`tracer.seccomp.build_filter`), so a tree walked by descriptor runs at full speed.
AT_CALLS = frozenset({"openat", "newfstatat", "statx", "faccessat", "faccessat2", "readlinkat"})
LISTING_CALLS = frozenset({"getdents64"})
CALLS = PATH_CALLS | LISTING_CALLS
DT_DIR = 4
ABSENT_FOR = 1.0  # s a pid found not to be the program's at home is taken as such
ABSENT_MAX = 4096  # remembered absent pids before the expired ones are dropped
DIRENT = struct.Struct("<QqHB")  # linux_dirent64 head: ino, off, reclen, type


def proc_pid(path: bytes) -> tuple[int, bytes] | None:
    """(N, the rest after /proc/N) of an absolute path under /proc/N; None otherwise."""
    if not path.startswith(b"/proc/"):
        return None
    head, sep, rest = path[6:].partition(b"/")
    if not head.isdigit() or len(head) > 10 or head.startswith(b"0"):
        return None
    return int(head), sep + rest


def dirents(pids: Iterable[int], room: int) -> bytes:
    """linux_dirent64 records of directories named `pids`, as many as fit in `room` bytes."""
    out = bytearray()
    for pid in pids:
        name = str(pid).encode() + b"\0"
        reclen = (DIRENT.size + len(name) + 7) & ~7
        if len(out) + reclen > room:
            break
        record = DIRENT.pack(pid, 0, reclen, DT_DIR) + name
        out += record.ljust(reclen, b"\0")
    return bytes(out)


class Snapshots:
    """Private copies of home's /proc/N, fetched through `fetch` (None: no such process).

    A pid that is no process of the program at home is remembered as such for
    `ABSENT_FOR` seconds: a program that reads /proc/N of a process of the instance
    (`/proc/1/cmdline`, a monitor's loop) pays the round trip home once a second, not
    at every read.  Only a pid the program did not have a moment ago and forks at
    home within that second reads the instance's /proc/N (nothing) meanwhile.
    """

    def __init__(
        self,
        fetch: Callable[[int], dict[str, bytes] | None],
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.fetch = fetch
        self.clock = clock
        self.root = ""  # made at the first read: 0711, root's (entries are per user)
        self._seq = 0
        self._last: dict[int, str] = {}  # pid -> its newest snapshot
        self._absent: dict[int, float] = {}  # pid -> until when it is known not home's

    def _root(self) -> str:
        if not self.root:
            self.root = tempfile.mkdtemp(prefix="dcp-proc-")
            os.chmod(self.root, 0o711)
        return self.root

    def path(self, pid: int, uid: int, gid: int) -> bytes | None:
        """A fresh snapshot directory of /proc/`pid` for user `uid`; None: none at home."""
        now = self.clock()
        if self._absent.get(pid, now) > now:
            return None
        files = self.fetch(pid)
        if files is None:
            if len(self._absent) >= ABSENT_MAX:
                self._absent = {p: t for p, t in self._absent.items() if t > now}
            self._absent[pid] = now + ABSENT_FOR
            self._drop(pid)
            return None
        self._absent.pop(pid, None)
        self._seq += 1
        where = os.path.join(self._root(), f"{pid}.{self._seq}")
        os.mkdir(where, 0o700)
        for name in FILES:
            _write(os.path.join(where, name), files.get(name, b""), uid, gid)
        os.chmod(where, 0o500)
        if uid != os.geteuid():
            os.chown(where, uid, gid)
        self._drop(pid)
        self._last[pid] = where
        return where.encode()

    def single(self, name: str, data: bytes, uid: int, gid: int) -> bytes:
        """The path of a private file holding `data` for user `uid` (made once per name)."""
        where = os.path.join(self._root(), f"{name}.{uid}")
        if not os.path.exists(where):
            _write(where, data, uid, gid)
        return where.encode()

    def _drop(self, pid: int) -> None:
        old = self._last.pop(pid, None)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)  # a reader that opened it keeps its fd

    def close(self) -> None:
        """Remove every snapshot."""
        if self.root:
            shutil.rmtree(self.root, ignore_errors=True)
            self.root = ""
            self._last.clear()


def _write(path: str, data: bytes, uid: int, gid: int) -> None:
    """A new read-only file of user `uid` holding `data`."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o400)
    try:
        os.write(fd, data)
        if uid != os.geteuid():
            os.fchown(fd, uid, gid)
    finally:
        os.close(fd)


def fd_path(pid: int, fd: int) -> bytes:
    """What descriptor `fd` of `pid` names (b"" when unknown)."""
    with contextlib.suppress(OSError):
        return os.readlink(f"/proc/{pid}/fd/{fd}").encode()
    return b""
