"""Files a periodic checkpoint carries (issue 12): the contents of each regular file the
dumped tree holds open for writing in a program storage mount (`/run/dcp/fs/NAME`,
`vmagent.storage.mounts.FS_ROOT`), read while the tree is still stopped after
`criu dump`, written back through the target's mount before `criu restore`.

The tree runs on after a periodic checkpoint and may rewrite such a file; CRIU
records each open file's size and refuses a restore that finds another one
(`File ... has bad size`).  Putting back what the file held at the checkpoint
makes the restored program resume from there, and what it wrote after is
written again (docs/CHECKPOINT.md).  Carried files go into the images directory
as one more image, `dcp-files.img`, so they are packed (zstd) and stored with
the rest.  A file over MAX_FILE (or past MAX_TOTAL in all) is not carried: the
checkpoint says so in one log line, and a restore that needs it fails as CRIU
says.
"""

from __future__ import annotations

import logging
import os
import stat
import struct

from vmagent.checkpoint import criu as C
from vmagent.storage.mounts import FS_ROOT

log = logging.getLogger(__name__)

IMAGE = "dcp-files.img"
MAX_FILE = 16 << 20  # bytes of one carried file
MAX_TOTAL = 64 << 20  # bytes carried by one checkpoint
RECORD = struct.Struct(">IQIII")  # path length, size, mode, uid, gid
ROOT = str(FS_ROOT) + "/"


class CarriedFileRefused(C.CheckpointError):
    """The checkpoint carries a file outside the program's storage."""


def written_files(pids: tuple[int, ...]) -> list[tuple[int, str, str]]:
    """(pid, fd, path) of each regular file in a storage mount the tree holds open for
    writing, one per path."""
    out: list[tuple[int, str, str]] = []
    seen: set[str] = set()
    for pid in pids:
        try:
            fds = os.listdir(f"/proc/{pid}/fd")
        except OSError:
            continue
        for fd in fds:
            try:
                path = os.readlink(f"/proc/{pid}/fd/{fd}")
                if not path.startswith(ROOT) or path.endswith(" (deleted)") or path in seen:
                    continue
                if _flags(pid, fd) & os.O_ACCMODE == os.O_RDONLY:
                    continue
                if not stat.S_ISREG(os.stat(f"/proc/{pid}/fd/{fd}").st_mode):
                    continue
            except OSError:
                continue
            seen.add(path)
            out.append((pid, fd, path))
    return out


def carry(pids: tuple[int, ...], directory: str) -> int:
    """Write the stopped tree's written files into `directory`/IMAGE; how many it holds."""
    total = count = 0
    with open(os.path.join(directory, IMAGE), "xb") as out:
        for pid, fd, path in written_files(pids):
            try:
                with open(f"/proc/{pid}/fd/{fd}", "rb") as f:
                    st = os.fstat(f.fileno())
                    if st.st_size > MAX_FILE or total + st.st_size > MAX_TOTAL:
                        log.warning(
                            "checkpoint: %s (%d bytes) is over what is carried (%d bytes a file,"
                            " %d a checkpoint): a restore of this checkpoint fails if it"
                            " changes", path, st.st_size, MAX_FILE, MAX_TOTAL,
                        )  # fmt: skip
                        continue
                    data = f.read(MAX_FILE + 1)
            except OSError as exc:
                log.warning("checkpoint: %s not carried: %s", path, exc)
                continue
            if len(data) > MAX_FILE:
                continue
            encoded = path.encode()
            out.write(RECORD.pack(len(encoded), len(data), st.st_mode & 0o7777, st.st_uid,
                                  st.st_gid) + encoded + data)  # fmt: skip
            total += len(data)
            count += 1
    return count


def put_back(directory: str) -> int:
    """Write each carried file of `directory` back to its path; how many.

    CarriedFileRefused for a path outside the storage mounts, OSError otherwise.
    """
    path = os.path.join(directory, IMAGE)
    if not os.path.exists(path):
        return 0
    count = 0
    with open(path, "rb") as f:
        while head := f.read(RECORD.size):
            if len(head) != RECORD.size:
                raise CarriedFileRefused(f"{IMAGE} is truncated")
            length, size, mode, uid, gid = RECORD.unpack(head)
            if length > 4096 or size > MAX_FILE:
                raise CarriedFileRefused(f"{IMAGE} has a record over its limits")
            name = f.read(length).decode("utf-8", errors="surrogateescape")
            data = f.read(size)
            if len(data) != size:
                raise CarriedFileRefused(f"{IMAGE} is truncated")
            _write(name, data, mode, uid, gid)
            count += 1
    return count


def _write(name: str, data: bytes, mode: int, uid: int, gid: int) -> None:
    """`data` into the file `name` of a storage mount (created as it was if missing)."""
    real = os.path.realpath(os.path.dirname(name))
    if (
        os.path.normpath(name) != name
        or not name.startswith(ROOT)
        or not (real + "/").startswith(ROOT)
    ):
        raise CarriedFileRefused(f"the checkpoint carries {name!r}, not in program storage")
    flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC
    fd = os.open(os.path.join(real, os.path.basename(name)), flags, mode & 0o777)
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise CarriedFileRefused(f"{name} is no longer a regular file")
        if (st.st_uid, st.st_gid) != (uid, gid):
            try:
                os.fchown(fd, uid, gid)
            except OSError:
                pass  # a mount that keeps its own owners
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
    finally:
        os.close(fd)


def _flags(pid: int, fd: str) -> int:
    with open(f"/proc/{pid}/fdinfo/{fd}") as f:
        for line in f:
            if line.startswith("flags:"):
                return int(line.split()[1], 8)
    return 0
