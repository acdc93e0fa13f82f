"""dcpfs: a program's namespace on one instance, over three tiers (FUSE).

Mounted by the agent (`vmagent.storage.mounts`) at `/run/dcp/fs/NAME`; the
program's view maps each declared path to `/run/dcp/fs/NAME/vN`, the same on
every instance.  Every file's home is the networked volume (the SFTP server of
`oss.storage.server`); this file system keeps a working copy of a file on the
tier `oss.storage.policy` chooses (memory: a tmpfs; disk: the instance's disk;
net: no copy, I/O goes to the server) and moves copies as the file heats up or
a tier fills.

Consistency (close-to-open, and a little more): a file written here is
published when its writer closes it (or fsyncs it): its bytes go to a
temporary file beside it on the volume, which is renamed over it, so a reader
anywhere sees the old file or the new one, whole, never a mix.  Every open
checks the working copy against the volume's size and mtime (nanoseconds) and
drops it when stale.  A move copies into the target tier and renames the
copy into place; a handle open on the old copy keeps reading that copy.

Limits: a write that would pass the program's, user's or account's storage
limit fails with EDQUOT, one that would overfill the volume with ENOSPC
(`policy.admit`, against the usage the server measures); nothing already
written is lost.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import errno
import fcntl
import json
import logging
import os
import secrets
import stat
import sys
import threading
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar, cast

import asyncssh
import mfusepy as fuse

from oss.storage.locks import EOF_END
from oss.storage.policy import (
    Heat,
    Ledger,
    Move,
    Policy,
    StorageLimits,
    StorageUsage,
    Tier,
    admit,
    after_read_open,
    for_write,
    streams,
    to_make_room,
    usage_by_tier,
)

log = logging.getLogger(__name__)

CALL_TIMEOUT = 30.0  # seconds for one call to the storage server
REPORT_EVERY = 1.0  # seconds between reports to the server
# An open for writing reuses a usage reading this recent (the reporter reads it every
# REPORT_EVERY); the server refuses what a stale reading let through, at publish.
USAGE_MAX_AGE = 0.5
# An open follows its own lookup's getattr: attributes that recent are that lookup's
# (a close elsewhere in between would be concurrent with this open, not before it).
LOOKUP_REUSE = 0.01
# Attributes a stat, a lookup or a permission check gets from the cache, this young at
# most (as NFS's attribute cache; an open always asks the volume: close-to-open).  A
# change made through this mount drops them at once; one made on another instance is
# seen by a stat within ATTR_TTL, by an open at once.  The kernel keeps a name's lookup
# as long (ENTRY_TTL), never a missing name's: a file created elsewhere is found at once.
ATTR_TTL = 1.0
ENTRY_TTL = ATTR_TTL
CHUNK = 4 << 20  # bytes per SFTP read or write call: asyncssh pipelines it in blocks
MAX_WRITE = 128 << 10  # bytes per FUSE write/read (libfuse 2's largest)
# A stat of MOUNT/.dcp-sync publishes every file open for writing on this instance
# (fsynced on the volume) before it returns: a checkpoint or migration does it first.
SYNC_PATH = "/.dcp-sync"
STATVFS_KEYS = ("f_bsize", "f_frsize", "f_blocks", "f_bfree", "f_bavail", "f_files", "f_ffree")
LOCK_SUBSYSTEM = "dcp-lock"  # oss.storage.locks: flock and POSIX locks of the namespace
LOCK_POLL = 0.05  # seconds between looks for a FUSE interrupt while a lock call waits
# The instance tracer names lockers in the program's pids (a placed process's pid is
# its deputy's, a forked one's `base + pid`: vmagent.trace.pidspace), which only it
# knows: before a lock call it sets PID_XATTR ("REAL PROGRAM") on the file, and after
# an F_GETLK it reads GETLK_XATTR + ".REAL" (the holder's program pid, which the
# kernel cannot carry: it is no pid of this instance).  Neither touches the volume.
PID_XATTR = "user.dcp.lockpid"
GETLK_XATTR = "user.dcp.getlk"
MAX_PIDS = 4096  # lockers remembered (the oldest go first)
STREAM_REASON = "large sequential write streams to the networked volume"

T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class FsConfig:
    """What the agent hands dcpfs on its stdin (JSON; the key never on a command line)."""

    name: str
    instance: str
    server: str  # unix:PATH or HOST:PORT
    key: str
    host_key: str  # the server's public key (pinned)
    mountpoint: str
    volumes: int
    memory_dir: str
    disk_dir: str
    memory_capacity: int | None
    disk_capacity: int | None
    policy: Policy = Policy()

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> FsConfig:
        """Validated config (KeyError/TypeError/ValueError on a bad one)."""
        pol = data.get("policy", {})
        default = Policy()
        policy = Policy(
            promote_after_reads=int(pol.get("promote_after_reads", default.promote_after_reads)),
            stream_bytes=int(pol.get("stream_bytes", default.stream_bytes)),
            largest_in_memory=int(pol.get("largest_in_memory", default.largest_in_memory)),
            preferred=Tier(pol["preferred"]) if pol.get("preferred") else None,
        )
        return cls(
            str(data["name"]), str(data["instance"]), str(data["server"]), str(data["key"]),
            str(data["host_key"]), str(data["mountpoint"]), int(data["volumes"]),
            str(data["memory_dir"]), str(data["disk_dir"]),
            _opt_int(data.get("memory_capacity")), _opt_int(data.get("disk_capacity")), policy,
        )  # fmt: skip


def _opt_int(value: object) -> int | None:
    return None if value is None else int(value)  # type: ignore[call-overload]


class Remote:
    """The SFTP client, on an event loop of its own, called from FUSE threads."""

    def __init__(self, config: FsConfig) -> None:
        self.config = config
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="dcpfs-net", daemon=True)
        self.thread.start()
        self.conn: asyncssh.SSHClientConnection | None = None
        self.sftp: asyncssh.SFTPClient = self.call(self._connect)
        self.locks: LockClient | None = None
        with contextlib.suppress(fuse.FuseOSError):  # an older server: locks stay local
            self.locks = self.call(self._open_locks)

    async def _open_locks(self) -> LockClient:
        assert self.conn is not None
        writer, reader, _ = await self.conn.open_session(subsystem=LOCK_SUBSYSTEM, encoding=None)
        client = LockClient(writer, reader)
        client.task = asyncio.get_running_loop().create_task(client.receive())
        return client

    def lock_call(self, req: dict[str, Any], wait: bool) -> dict[str, Any]:
        """One lock request; a wait ends when granted, or with EINTR on a FUSE interrupt."""
        locks = self.locks
        if locks is None:
            raise fuse.FuseOSError(errno.ENOLCK)
        ident = locks.next_id()
        future = asyncio.run_coroutine_threadsafe(locks.request(ident, req), self.loop)
        cancelled = False
        while True:
            try:
                return future.result(LOCK_POLL if wait else CALL_TIMEOUT)
            except concurrent.futures.TimeoutError:
                if not wait:
                    future.cancel()
                    raise fuse.FuseOSError(errno.EIO) from None
                if not cancelled and fuse._libfuse.fuse_interrupted():
                    cancelled = True  # the server answers EINTR, or the grant it already made
                    self.loop.call_soon_threadsafe(locks.cancel, ident)
            except (OSError, asyncssh.Error, EOFError) as exc:
                raise fuse.FuseOSError(errno.EIO) from exc

    async def _connect(self) -> asyncssh.SFTPClient:
        server = self.config.server
        pinned = asyncssh.import_public_key(self.config.host_key)

        def known(_host: str, _addr: str, _port: int) -> tuple[list[Any], list[Any], list[Any]]:
            return [pinned], [], []  # the run's server only, whatever its address

        options: dict[str, Any] = dict(
            username=f"dcp@{self.config.instance}", password=self.config.key, known_hosts=known,
            client_keys=None, agent_path=None, preferred_auth="password",
            keepalive_interval=15, config=None,
        )  # fmt: skip
        if server.startswith("unix:"):
            import socket

            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.connect(server[5:])
            self.conn = await asyncssh.connect(host="dcp-storage", sock=sock, **options)
        else:
            host, _, port = server.rpartition(":")
            self.conn = await asyncssh.connect(host, int(port), **options)
        return await self.conn.start_sftp_client(sftp_version=6)

    def call(self, fn: Callable[[], Awaitable[T]]) -> T:
        """Run `fn()` on the loop; SFTP errors become the errno the program sees."""
        future = asyncio.run_coroutine_threadsafe(
            asyncio.wait_for(fn(), CALL_TIMEOUT),
            self.loop,  # type: ignore[arg-type]
        )
        try:
            return future.result(CALL_TIMEOUT + 1)
        except asyncssh.SFTPError as exc:
            raise fuse.FuseOSError(_errno_of(exc)) from exc
        except (OSError, asyncssh.Error, TimeoutError) as exc:
            if isinstance(exc, OSError) and exc.errno:
                raise fuse.FuseOSError(exc.errno) from exc
            raise fuse.FuseOSError(errno.EIO) from exc

    def close(self) -> None:
        if self.locks is not None:
            self.locks.writer.close()
        if self.conn is not None:
            conn = self.conn
            with contextlib.suppress(Exception):
                asyncio.run_coroutine_threadsafe(_close(conn), self.loop).result(5)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)


class LockClient:
    """The `dcp-lock` session to the storage server (oss.storage.locks): answers by id."""

    def __init__(
        self, writer: asyncssh.SSHWriter[bytes], reader: asyncssh.SSHReader[bytes]
    ) -> None:
        self.writer = writer
        self.reader = reader
        self.pending: dict[int, asyncio.Future[dict[str, Any]]] = {}
        self.ids = iter(range(1, 1 << 62))
        self.id_lock = threading.Lock()
        self.task: asyncio.Task[None] | None = None
        self.closed = False

    def next_id(self) -> int:
        with self.id_lock:
            return next(self.ids)

    async def request(self, ident: int, req: dict[str, Any]) -> dict[str, Any]:
        if self.closed:
            raise EOFError("the lock service is gone")
        future: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self.pending[ident] = future
        self.writer.write(json.dumps({"id": ident, **req}).encode() + b"\n")
        try:
            return await future
        finally:
            self.pending.pop(ident, None)

    def cancel(self, ident: int) -> None:
        self.send({"op": "cancel", "id": ident})

    def send(self, req: dict[str, Any]) -> None:
        """A request without an answer (on the loop's thread)."""
        if not self.closed:
            self.writer.write(json.dumps(req).encode() + b"\n")

    async def receive(self) -> None:
        try:
            while line := await self.reader.readline():
                answer = json.loads(line)
                future = self.pending.get(int(answer["id"]))
                if future is not None and not future.done():
                    future.set_result(answer)
        except (asyncssh.Error, OSError, ValueError, KeyError) as exc:
            log.warning("the lock service failed: %s", exc)
        finally:
            self.closed = True
            for future in self.pending.values():
                if not future.done():
                    future.set_exception(EOFError("the lock service is gone"))


async def _close(conn: asyncssh.SSHClientConnection) -> None:
    conn.close()
    await conn.wait_closed()


_SFTP_ERRNO = {
    asyncssh.FX_NO_SUCH_FILE: errno.ENOENT,
    asyncssh.FX_PERMISSION_DENIED: errno.EACCES,
    asyncssh.FX_FILE_ALREADY_EXISTS: errno.EEXIST,
    asyncssh.FX_DIR_NOT_EMPTY: errno.ENOTEMPTY,
    asyncssh.FX_NOT_A_DIRECTORY: errno.ENOTDIR,
    asyncssh.FX_FILE_IS_A_DIRECTORY: errno.EISDIR,
    asyncssh.FX_NO_SPACE_ON_FILESYSTEM: errno.ENOSPC,
    asyncssh.FX_QUOTA_EXCEEDED: errno.EDQUOT,
    asyncssh.FX_NO_SUCH_PATH: errno.ENOENT,
    asyncssh.FX_INVALID_FILENAME: errno.EINVAL,
    asyncssh.FX_LINK_LOOP: errno.ELOOP,
    asyncssh.FX_WRITE_PROTECT: errno.EROFS,
}


def _errno_of(exc: asyncssh.SFTPError) -> int:
    return _SFTP_ERRNO.get(exc.code, errno.EIO)


@dataclass(slots=True)
class Copy:
    """A working copy of a file on this instance, of the volume's version (size, mtime_ns)."""

    tier: Tier
    local: str
    size: int
    mtime_ns: int


@dataclass(slots=True)
class Handle:
    """An open file: a local copy (`fd`), or the remote file itself (`remote`)."""

    path: str
    writable: bool
    fd: int = -1
    local: str = ""
    tier: Tier = Tier.NET
    remote: asyncssh.SFTPClientFile | None = None
    remote_tmp: str = ""  # streaming: the remote temporary file until published
    published: bool = False  # streaming: the temporary was renamed over the path
    size: int = 0
    base: int = 0  # the size when opened (growth is what limits count)
    dirty: bool = False
    next_offset: int = 0
    sequential: bool = True
    mode: int = 0o644
    unlinked: bool = False  # its path was removed while open: nothing to publish


@dataclass(slots=True)
class State:
    """What dcpfs tracks: copies, heat, moves, open handles."""

    copies: dict[str, Copy] = field(default_factory=dict)
    heat: dict[str, Heat] = field(default_factory=dict)
    handles: dict[int, Handle] = field(default_factory=dict)
    ledger: Ledger = field(default_factory=Ledger)
    usage: StorageUsage = StorageUsage()
    limits: StorageLimits = StorageLimits()
    next_fh: int = 1


def _attrs_dict(a: asyncssh.SFTPAttrs) -> dict[str, Any]:
    """FUSE attributes (times in nanoseconds: `Dcpfs.use_ns`) of the volume's SFTP v6 ones."""
    mtime = _mtime_ns(a)
    atime = (a.atime or 0) * 1_000_000_000 + (a.atime_ns or 0)
    ctime = (a.ctime or 0) * 1_000_000_000 + (a.ctime_ns or 0) if a.ctime else mtime
    perms = a.permissions or 0
    if a.type == asyncssh.FILEXFER_TYPE_DIRECTORY and not stat.S_IFMT(perms):
        perms |= stat.S_IFDIR
    elif a.type == asyncssh.FILEXFER_TYPE_SYMLINK and not stat.S_IFMT(perms):
        perms |= stat.S_IFLNK
    elif not stat.S_IFMT(perms):
        perms |= stat.S_IFREG
    return {
        "st_mode": perms, "st_size": a.size or 0, "st_uid": a.uid or 0, "st_gid": a.gid or 0,
        "st_mtime": mtime, "st_atime": atime, "st_ctime": ctime, "st_nlink": a.nlink or 1,
    }  # fmt: skip


def _mtime_ns(a: asyncssh.SFTPAttrs) -> int:
    return (a.mtime or 0) * 1_000_000_000 + (a.mtime_ns or 0)


class Dcpfs(fuse.Operations):  # type: ignore[misc]
    """The FUSE operations.  One lock makes every operation that changes the state see
    a consistent one; a stat (getattr) and a read of a local copy take none, so they
    never wait behind another file's round trip."""

    use_ns = True  # utimens gets nanoseconds

    def __init__(self, config: FsConfig, remote: Remote) -> None:
        self.config = config
        self.remote = remote
        self.sftp = remote.sftp
        self.state = State()
        self._mutex = threading.RLock()
        self.tier_dirs = {Tier.MEMORY: config.memory_dir, Tier.DISK: config.disk_dir}
        self.capacity = {Tier.MEMORY: config.memory_capacity, Tier.DISK: config.disk_capacity}
        self.started = time.time_ns()  # the root directory's times
        self.usage_read = -1e9  # monotonic time of the last usage reading
        self.looked_up: tuple[str, Any, float] = ("", None, -1e9)  # the last getattr
        self.program_pids: dict[int, int] = {}  # this instance's pid -> the program's
        # FIFOs and sockets made here (mkfifo, AF_UNIX bind): SFTP cannot make them on
        # the volume, and the kernel serves them by inode, so they live on this
        # instance's mount only (path -> attributes).
        self.specials: dict[str, dict[str, Any]] = {}
        self.getlk_holders: dict[int, int] = {}  # F_GETLK caller's pid -> holder's program pid
        # path -> (monotonic time asked, the volume's attributes); read without the lock
        self.attrs: dict[str, tuple[float, asyncssh.SFTPAttrs]] = {}
        # Bumped at both ends of every change made here (`_changing`): a stat answered
        # across one (a lock-free stat racing a close's publish) may describe the old
        # file, so it goes to its caller but not into the cache.
        self.attrs_epoch = 0
        self.attrs_changing = 0  # changes made here in flight

    # -- helpers --------------------------------------------------------------

    def _remote(self, path: str) -> str:
        if path == "/":
            raise fuse.FuseOSError(errno.EPERM)
        return path

    def _is_volume_root(self, path: str) -> bool:
        parts = path.strip("/").split("/")
        return len(parts) == 1 and parts[0].startswith("v")

    def _free(self) -> dict[Tier, int | None]:
        held = self._held()
        free: dict[Tier, int | None] = {Tier.NET: None}
        for tier in (Tier.MEMORY, Tier.DISK):
            cap = self.capacity[tier]
            free[tier] = None if cap is None else max(0, cap - held[tier])
        return free

    def _held(self) -> dict[Tier, int]:
        held = usage_by_tier(Heat(size=c.size, tier=c.tier) for c in self.state.copies.values())
        copies = {c.local for c in self.state.copies.values()}
        for h in self.state.handles.values():
            if h.writable and h.fd >= 0 and h.local not in copies:
                held[h.tier] += h.size
        return held

    def _stat(self, path: str) -> asyncssh.SFTPAttrs:
        """The volume's attributes of `path` now (one round trip; cached for stats)."""
        asked, epoch = time.monotonic(), self.attrs_epoch if not self.attrs_changing else -1
        try:
            attrs = self.remote.call(lambda: self.sftp.lstat(path))
        except fuse.FuseOSError:
            self.attrs.pop(path, None)
            raise
        if self._may_cache(epoch):
            self.attrs[path] = (asked, attrs)
        return attrs

    def _cached_stat(self, path: str) -> asyncssh.SFTPAttrs:
        """`path`'s attributes, from the cache if under ATTR_TTL old (no lock needed)."""
        cached = self.attrs.get(path)
        if cached is not None and time.monotonic() - cached[0] < ATTR_TTL:
            return cached[1]
        attrs = self._stat(path)
        self.looked_up = (path, attrs, time.monotonic())
        return attrs

    @contextlib.contextmanager
    def _changing(self, *paths: str, tree: bool = False) -> Iterator[None]:
        """Around a change made here to `paths` on the volume: their cached attributes
        (and their directories', and with `tree` everything under them: a renamed or
        removed directory) are dropped before and after it, and a stat in flight
        meanwhile is answered but not cached (it may have seen the old file)."""
        self.attrs_epoch += 1
        self.attrs_changing += 1
        self._drop_attrs(paths, tree)
        try:
            yield
        finally:
            self.attrs_epoch += 1
            self.attrs_changing -= 1
            self._drop_attrs(paths, tree)

    def _drop_attrs(self, paths: tuple[str, ...], tree: bool) -> None:
        for path in paths:
            self.attrs.pop(path, None)
            self.attrs.pop(path.rpartition("/")[0] or "/", None)
            if tree:
                under = path.rstrip("/") + "/"
                for name in [p for p in list(self.attrs) if p.startswith(under)]:
                    self.attrs.pop(name, None)

    def _may_cache(self, epoch: int) -> bool:
        """Whether an answer asked for at `epoch` predates no change made here since."""
        return epoch == self.attrs_epoch and not self.attrs_changing

    def _fresh_stat(self, path: str) -> asyncssh.SFTPAttrs:
        """The volume's attributes of `path` for an open: the kernel's lookup of this very
        open just fetched them (reused if under LOOKUP_REUSE old), else one round trip."""
        seen, attrs, when = self.looked_up
        if seen == path and time.monotonic() - when < LOOKUP_REUSE:
            return attrs
        return self._stat(path)

    def _heat(self, path: str) -> Heat:
        return self.state.heat.setdefault(path, Heat())

    def _new_local(self, tier: Tier) -> str:
        return os.path.join(self.tier_dirs[tier], secrets.token_hex(8))

    def _drop_copy(self, path: str) -> None:
        copy = self.state.copies.pop(path, None)
        if copy is not None:
            with contextlib.suppress(OSError):
                os.unlink(copy.local)
        heat = self.state.heat.get(path)
        if heat is not None:
            heat.tier = Tier.NET

    def _fetch(self, path: str, tier: Tier) -> Copy:
        """A fresh copy of the volume's file in `tier` (renamed into place whole)."""
        local = self._new_local(tier)
        tmp = local + ".part"

        async def get() -> tuple[int, int]:
            async with self.sftp.open(path, "rb") as f:
                attrs = await f.stat()  # of the inode being read: one version, whole
                fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
                try:
                    offset = 0
                    while True:
                        data = cast(bytes, await f.read(CHUNK, offset))
                        if not data:
                            break
                        _pwrite_all(fd, data, offset)
                        offset += len(data)
                finally:
                    os.close(fd)
                return offset, _mtime_ns(attrs)

        try:
            size, mtime_ns = self.remote.call(get)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
        os.rename(tmp, local)
        return Copy(tier, local, size, mtime_ns)

    def _move(self, move: Move) -> None:
        """Carry a move out (callers hold the lock); failures leave the file where it was."""
        path = move.path
        heat = self._heat(path)
        old = self.state.copies.get(path)
        if move.target == Tier.NET:
            self._drop_copy(path)
        else:
            for demote in to_make_room(
                move.target, heat.size, self._heats_with_copies(), self._free()
            ):
                if demote.path != path:
                    self._move(demote)
            try:
                if old is not None:
                    local = self._new_local(move.target)
                    tmp = local + ".part"
                    _copy_file(old.local, tmp)
                    os.rename(tmp, local)
                    new = Copy(move.target, local, old.size, old.mtime_ns)
                    with contextlib.suppress(OSError):
                        os.unlink(old.local)  # open handles keep reading the old copy
                else:
                    new = self._fetch(path, move.target)
            except (OSError, fuse.FuseOSError) as exc:
                log.warning("move of %s to %s failed: %s", path, move.target, exc)
                return
            self.state.copies[path] = new
            heat.tier = move.target
        self.state.ledger.add(time.time(), move)
        log.info("moved %s from %s to %s: %s", path, move.source, move.target, move.reason)

    def _heats_with_copies(self) -> dict[str, Heat]:
        for path, copy in self.state.copies.items():
            heat = self._heat(path)
            heat.tier, heat.size = copy.tier, copy.size
            heat.open_handles = sum(1 for h in self.state.handles.values() if h.path == path)
        return {p: self.state.heat[p] for p in self.state.copies}

    def _valid_copy(self, path: str, attrs: asyncssh.SFTPAttrs) -> Copy | None:
        copy = self.state.copies.get(path)
        if copy is not None and (copy.size, copy.mtime_ns) != (attrs.size, _mtime_ns(attrs)):
            self._drop_copy(path)
            return None
        return copy

    def _add_handle(self, handle: Handle) -> int:
        fh = self.state.next_fh
        self.state.next_fh += 1
        self.state.handles[fh] = handle
        return fh

    def _refresh_usage(self, max_age: float = 0.0) -> None:
        """Read the server's measured usage, unless the last reading is younger than `max_age`."""
        now = time.monotonic()
        if max_age and now - self.usage_read < max_age:
            return
        self.usage_read = now

        async def read() -> bytes:
            async with self.sftp.open("/.dcp/usage.json", "rb") as f:
                return await f.read()  # type: ignore[no-any-return]

        with contextlib.suppress(fuse.FuseOSError, ValueError):
            data = json.loads(self.remote.call(read))
            lim = data.get("limits", {})
            self.state.limits = StorageLimits(
                lim.get("account"), lim.get("user"), lim.get("program"), lim.get("volume")
            )
            used = int(data.get("used", 0))
            self.state.usage = StorageUsage(used, used, used, used)

    # -- FUSE operations ----------------------------------------------------

    def getattr(self, path: str, fh: int | None = None) -> dict[str, Any]:
        # Without the lock: a stat must not wait behind another file's round trip.
        handle = self.state.handles.get(fh) if fh is not None else None
        if handle is not None and (handle.unlinked or not path) and handle.fd >= 0:
            st = os.fstat(handle.fd)  # a file no name reaches: its staged copy says
            return {"st_mode": stat.S_IFREG | handle.mode, "st_nlink": 0,
                    "st_size": handle.size, "st_mtime": st.st_mtime_ns,
                    "st_atime": st.st_atime_ns, "st_ctime": st.st_ctime_ns}  # fmt: skip
        if path == SYNC_PATH:
            self.sync()
            return {"st_mode": stat.S_IFREG, "st_nlink": 1, "st_size": 0}
        special = self.specials.get(path)
        if special is not None:
            return dict(special)
        if path == "/":
            now = self.started
            return {"st_mode": stat.S_IFDIR | 0o755, "st_nlink": 2, "st_size": 0,
                    "st_mtime": now, "st_atime": now, "st_ctime": now}  # fmt: skip
        # An open descriptor's attributes are those its open revalidated (or newer).
        attrs = _attrs_dict(self._cached_stat(path))
        for h in list(self.state.handles.values()):
            if h.path == path and h.writable:
                attrs["st_size"] = h.size
        return attrs

    def readdir(self, path: str, fh: int) -> list[str]:
        with self._mutex:
            if path == "/":
                return [".", ".."] + [f"v{i}" for i in range(self.config.volumes)]
            asked, epoch = time.monotonic(), self.attrs_epoch if not self.attrs_changing else -1
            entries = self.remote.call(lambda: self.sftp.readdir(path))
            base = path.rstrip("/")
            names = [p[len(base) + 1 :] for p in self.specials if p.rpartition("/")[0] == base]
            for e in entries:
                name = e.filename if isinstance(e.filename, str) else e.filename.decode()
                if name in (".", "..") or name.startswith((".dcp-part-", ".fuse_hidden")):
                    continue
                names.append(name)
                if e.attrs.type is not None and e.attrs.size is not None and self._may_cache(epoch):
                    self.attrs[f"{base}/{name}"] = (asked, e.attrs)  # what `ls -l` stats next
            return [".", ".."] + names

    def readlink(self, path: str) -> str:
        with self._mutex:
            return self.remote.call(lambda: self.sftp.readlink(path))  # type: ignore[no-any-return]

    def statfs(self, path: str) -> dict[str, Any]:
        st = os.statvfs(self.config.disk_dir)
        return {key: getattr(st, key) for key in STATVFS_KEYS}

    def mknod(self, path: str, mode: int, dev: int) -> None:
        """A FIFO or a socket, on this instance only (see `specials`)."""
        if not (stat.S_ISFIFO(mode) or stat.S_ISSOCK(mode)):
            raise fuse.FuseOSError(errno.EPERM)  # devices: not in a program's namespace
        with self._mutex:
            if path in self.specials:
                raise fuse.FuseOSError(errno.EEXIST)
            try:
                self._stat(path)
            except fuse.FuseOSError as exc:
                if exc.errno != errno.ENOENT:
                    raise
            else:
                raise fuse.FuseOSError(errno.EEXIST)
            uid, gid, _pid = fuse.fuse_get_context()
            now = time.time_ns()
            self.specials[path] = {
                "st_mode": mode, "st_nlink": 1, "st_size": 0, "st_uid": uid, "st_gid": gid,
                "st_mtime": now, "st_atime": now, "st_ctime": now,
            }  # fmt: skip

    def mkdir(self, path: str, mode: int) -> None:
        with self._mutex:
            attrs = asyncssh.SFTPAttrs(permissions=mode & 0o7777)
            with self._changing(path):
                self.remote.call(lambda: self.sftp.mkdir(self._remote(path), attrs))

    def rmdir(self, path: str) -> None:
        with self._mutex:
            with self._changing(path, tree=True):
                self.remote.call(lambda: self.sftp.rmdir(path))

    def unlink(self, path: str) -> None:
        with self._mutex:
            if self.specials.pop(path, None) is not None:
                return
            with self._changing(path):
                self.remote.call(lambda: self.sftp.remove(path))
            self._drop_copy(path)
            self.state.heat.pop(path, None)
            for h in self.state.handles.values():
                if h.path == path and h.writable:
                    h.unlinked = True  # as natively: its writes go to a file no name reaches

    def rename(self, old: str, new: str) -> None:
        with self._mutex:
            special = self.specials.pop(old, None)
            if special is not None:  # stays on this instance, under its new name
                self.specials[new] = special
                return
            with self._changing(old, new, tree=True):
                self.remote.call(lambda: self.sftp.posix_rename(old, new))
            self._drop_copy(new)
            copy = self.state.copies.pop(old, None)
            if copy is not None:
                attrs = self._stat(new)
                copy.mtime_ns = _mtime_ns(attrs)
                self.state.copies[new] = copy
            if old in self.state.heat:
                self.state.heat[new] = self.state.heat.pop(old)
            hidden = new.rpartition("/")[2].startswith(".fuse_hidden")
            for h in self.state.handles.values():
                if h.path == old:
                    h.path = new  # a writer publishes under the file's new name
                    # The kernel's unlink of an open file is this rename: as natively,
                    # what is written to it afterwards goes nowhere a name reaches.
                    h.unlinked = h.unlinked or (hidden and h.writable)

    def symlink(self, target: str, source: str) -> None:
        with self._mutex:
            with self._changing(target):
                self.remote.call(lambda: self.sftp.symlink(source, target))

    def link(self, target: str, source: str) -> None:
        with self._mutex:
            with self._changing(target, source):
                self.remote.call(lambda: self.sftp.link(source, target))

    def chmod(self, path: str, mode: int) -> None:
        with self._mutex:
            with self._changing(path):
                self.remote.call(lambda: self.sftp.chmod(path, mode & 0o7777))
            self._fix_copy_version(path)

    def chown(self, path: str, uid: int, gid: int) -> None:
        with self._mutex:
            with self._changing(path):
                self.remote.call(lambda: self.sftp.chown(path, uid, gid))

    def utimens(self, path: str, times: tuple[int, int] | None = None) -> None:
        with self._mutex:
            now = time.time_ns()
            atime, mtime = times if times is not None else (now, now)
            with self._changing(path):
                self.remote.call(lambda: self.sftp.utime(path, ns=(int(atime), int(mtime))))
            self._fix_copy_version(path)

    def _fix_copy_version(self, path: str) -> None:
        copy = self.state.copies.get(path)
        if copy is not None:
            copy.mtime_ns = _mtime_ns(self._stat(path))

    def truncate(self, path: str, length: int, fh: int | None = None) -> None:
        with self._mutex:
            handle = self.state.handles.get(fh) if fh is not None else None
            if handle is None:
                for h in self.state.handles.values():
                    if h.path == path and h.writable:
                        handle = h
            if handle is not None:
                self._admit(handle, length)
                if handle.remote is not None:
                    self.remote.call(lambda: handle.remote.truncate(length))  # type: ignore[union-attr]
                else:
                    os.ftruncate(handle.fd, length)
                handle.size, handle.dirty = length, True
                return
            with self._changing(path):
                self.remote.call(lambda: self.sftp.truncate(path, length))
            self._drop_copy(path)

    def create(self, path: str, mode: int, fi: Any = None) -> int:
        with self._mutex:
            attrs = asyncssh.SFTPAttrs(permissions=mode & 0o7777)

            async def make() -> None:
                f = await self.sftp.open(path, "wb", attrs)
                await f.close()

            with self._changing(path):
                self.remote.call(make)
            return self._open_write(path, os.O_TRUNC, mode & 0o7777, None)

    def open(self, path: str, flags: int) -> int:
        with self._mutex:
            attrs = self._fresh_stat(path)
            if (flags & os.O_ACCMODE) != os.O_RDONLY:
                return self._open_write(path, flags, (attrs.permissions or 0o644) & 0o7777, attrs)
            heat = self._heat(path)
            heat.reads += 1
            heat.last_access = time.monotonic()
            heat.size = attrs.size or 0
            copy = self._valid_copy(path, attrs)
            heat.tier = copy.tier if copy is not None else Tier.NET
            move = after_read_open(path, heat, self.config.policy, self._free())
            if move is not None:
                self._move(move)
            copy = self.state.copies.get(path)
            if copy is not None:
                fd = os.open(copy.local, os.O_RDONLY)
                return self._add_handle(Handle(path, False, fd=fd, tier=copy.tier, size=copy.size))
            remote = self.remote.call(lambda: self.sftp.open(path, "rb"))
            return self._add_handle(Handle(path, False, remote=remote, size=heat.size))

    def _open_write(
        self, path: str, flags: int, mode: int, attrs: asyncssh.SFTPAttrs | None
    ) -> int:
        self._refresh_usage(USAGE_MAX_AGE)
        heat = self._heat(path)
        heat.writes += 1
        heat.last_access = time.monotonic()
        size = 0 if (flags & os.O_TRUNC or attrs is None) else (attrs.size or 0)
        tier = for_write(size, self.config.policy, self._free())
        if tier == Tier.NET:
            tier = Tier.DISK  # staged on disk until it streams; a copy of what it was
        handle = Handle(path, True, tier=tier, size=size, base=size, mode=mode)
        handle.local = self._new_local(tier)
        copy = self._valid_copy(path, attrs) if attrs is not None else None
        if size and copy is not None:
            _copy_file(copy.local, handle.local)
        elif size:
            fetched = self._fetch(path, tier)
            os.rename(fetched.local, handle.local)
        handle.fd = os.open(handle.local, os.O_RDWR | os.O_CREAT, 0o600)
        if flags & os.O_TRUNC:
            os.ftruncate(handle.fd, 0)
            if attrs is not None and attrs.size:
                handle.dirty = True  # the truncation itself is a change to publish
        handle.next_offset = size if flags & os.O_APPEND else 0
        return self._add_handle(handle)

    def read(self, path: str, size: int, offset: int, fh: int) -> bytes:
        handle = self.state.handles[fh]
        if handle.fd >= 0:
            return os.pread(handle.fd, size, offset)
        with self._mutex:
            remote = handle.remote
            assert remote is not None
            return cast(bytes, self.remote.call(lambda: remote.read(size, offset)))

    def _admit(self, handle: Handle, end: int) -> None:
        """Refuse growth past a limit (EDQUOT/ENOSPC) before a byte is written.

        A streaming handle's bytes are on the server, which measures and
        refuses them itself; staged handles' growth is not there yet, so it is
        added to the server's figure here.
        """
        if handle.remote is not None:
            return
        pending = sum(
            max(0, h.size - h.base)
            for h in self.state.handles.values()
            if h.writable and h.remote is None and h.dirty
        )
        growth = max(0, end - max(handle.size, handle.base)) + pending
        refusal = admit(growth, self.state.usage, self.state.limits)
        if refusal is not None:
            log.info("write to %s refused: %s", handle.path, refusal.reason)
            raise fuse.FuseOSError(refusal.errno)

    def write(self, path: str, data: bytes, offset: int, fh: int) -> int:
        with self._mutex:
            handle = self.state.handles[fh]
            end = offset + len(data)
            self._admit(handle, end)
            handle.sequential = handle.sequential and offset == handle.next_offset
            handle.next_offset = end
            if handle.remote is None and streams(
                offset, len(data), handle.sequential, self.config.policy
            ):
                self._stream(handle)
            if handle.remote is not None:
                remote = handle.remote
                self.remote.call(lambda: remote.write(data, offset))
            else:
                self._local_write(handle, data, offset)
            handle.size = max(handle.size, end)
            handle.dirty = True
            return len(data)

    def _local_write(self, handle: Handle, data: bytes, offset: int) -> None:
        try:
            _pwrite_all(handle.fd, data, offset)
            return
        except OSError as exc:
            if exc.errno != errno.ENOSPC or handle.tier != Tier.MEMORY:
                raise fuse.FuseOSError(exc.errno or errno.EIO) from exc
        # The memory tier is full: demote what has cooled, then move this file to disk.
        for move in to_make_room(Tier.MEMORY, len(data), self._heats_with_copies(), self._free()):
            self._move(move)
        try:
            _pwrite_all(handle.fd, data, offset)
            return
        except OSError:
            pass
        local = self._new_local(Tier.DISK)
        _copy_file(handle.local, local)
        os.close(handle.fd)
        os.unlink(handle.local)
        handle.local, handle.tier = local, Tier.DISK
        handle.fd = os.open(local, os.O_RDWR)
        self.state.ledger.add(
            time.time(),
            Move(handle.path, Tier.MEMORY, Tier.DISK, "demoted: memory full while writing"),
        )
        _pwrite_all(handle.fd, data, offset)

    def _stream(self, handle: Handle) -> None:
        """Send this handle's writes to the volume from now on (it bypasses the fast tiers)."""
        tmp = _part_name(handle.path)
        attrs = asyncssh.SFTPAttrs(permissions=handle.mode)
        remote: asyncssh.SFTPClientFile = self.remote.call(lambda: self.sftp.open(tmp, "wb", attrs))
        offset = 0
        while offset < handle.size:
            data = os.pread(handle.fd, CHUNK, offset)
            if not data:
                break
            self.remote.call(lambda d=data, o=offset: remote.write(d, o))  # type: ignore[misc]
            offset += len(data)
        os.close(handle.fd)
        with contextlib.suppress(OSError):
            os.unlink(handle.local)
        handle.fd, handle.local, handle.remote, handle.remote_tmp = -1, "", remote, tmp
        old_tier = handle.tier
        handle.tier = Tier.NET
        self._drop_copy(handle.path)
        self.state.ledger.add(
            time.time(),
            Move(handle.path, old_tier, Tier.NET, STREAM_REASON),
        )

    def _publish(self, handle: Handle, durable: bool) -> None:
        """Make the handle's bytes the volume's file (atomically), fsynced if `durable`."""
        path = handle.path
        if handle.unlinked:
            handle.dirty = False
            return
        if handle.remote is not None:
            remote = handle.remote
            with self._changing(path):
                if durable:
                    self.remote.call(lambda: remote.fsync())
                if not handle.published:
                    tmp = handle.remote_tmp
                    self.remote.call(lambda: self.sftp.posix_rename(tmp, path))
                    handle.published = True
            handle.dirty = False
            self._heat(path).size = handle.size
            return
        tmp = _part_name(path)
        attrs = asyncssh.SFTPAttrs(permissions=handle.mode)
        fd = handle.fd

        async def upload() -> None:
            async with self.sftp.open(tmp, "wb", attrs) as f:
                offset = 0
                while True:
                    data = os.pread(fd, CHUNK, offset)
                    if not data:
                        break
                    await f.write(data, offset)
                    offset += len(data)
                if durable:
                    await f.fsync()
            await self.sftp.posix_rename(tmp, path)

        with self._changing(path):
            try:
                self.remote.call(upload)
            except fuse.FuseOSError:
                with contextlib.suppress(fuse.FuseOSError):
                    self.remote.call(lambda: self.sftp.remove(tmp))
                raise
        handle.dirty = False
        attrs_now = self._stat(path)
        old = self.state.copies.get(path)
        if old is not None and old.local != handle.local:
            with contextlib.suppress(OSError):
                os.unlink(old.local)
        self.state.copies[path] = Copy(handle.tier, handle.local, handle.size, _mtime_ns(attrs_now))
        heat = self._heat(path)
        heat.tier, heat.size = handle.tier, handle.size

    def sync(self) -> None:
        """Publish every file open for writing here, durably (what a migration needs first)."""
        with self._mutex:
            for handle in list(self.state.handles.values()):
                if handle.writable and handle.dirty:
                    if handle.fd >= 0:
                        os.fsync(handle.fd)
                    self._publish(handle, durable=True)

    def flush(self, path: str, fh: int) -> None:
        with self._mutex:
            handle = self.state.handles.get(fh)
            if handle is not None and handle.writable and handle.dirty:
                self._publish(handle, durable=False)

    def fsync(self, path: str, datasync: int, fh: int) -> None:
        with self._mutex:
            handle = self.state.handles.get(fh)
            if handle is not None and handle.writable:
                if handle.fd >= 0:
                    os.fsync(handle.fd)
                self._publish(handle, durable=True)

    def release(self, path: str, fh: int) -> None:
        with self._mutex:
            handle = self.state.handles.get(fh)
            if handle is None:
                return
            try:
                if handle.writable and handle.dirty:
                    self._publish(handle, durable=False)
            finally:
                self.state.handles.pop(fh, None)
                if handle.remote is not None:
                    remote = handle.remote
                    with contextlib.suppress(fuse.FuseOSError):
                        self.remote.call(lambda: remote.close())
                    if not handle.published and handle.remote_tmp:
                        tmp = handle.remote_tmp
                        with contextlib.suppress(fuse.FuseOSError):
                            self.remote.call(lambda: self.sftp.remove(tmp))
                if handle.fd >= 0:
                    os.close(handle.fd)
                    copy = self.state.copies.get(path)
                    if handle.writable and (copy is None or copy.local != handle.local):
                        with contextlib.suppress(OSError):
                            os.unlink(handle.local)

    # -- locks (served by the storage server for every instance) -------------

    def _before_unlock(self, fh: int | None) -> None:
        """Publish what this descriptor wrote before its lock goes (as NFS does at unlock)."""
        with self._mutex:
            handle = self.state.handles.get(fh) if fh is not None else None
            if handle is not None and handle.writable and handle.dirty and handle.fd >= 0:
                self._publish(handle, durable=False)

    def _after_lock(self, fh: int | None) -> None:
        """A lock granted: the descriptor sees the volume's latest version (close-to-open
        would show it only at the next open; another instance's holder published it)."""
        with self._mutex:
            handle = self.state.handles.get(fh) if fh is not None else None
            if handle is None or handle.unlinked or (handle.writable and handle.dirty):
                return
            path = handle.path
            if handle.remote is not None:
                if handle.writable:
                    return  # streaming: this handle writes the file itself
                old = handle.remote
                handle.remote = self.remote.call(lambda: self.sftp.open(path, "rb"))
                with contextlib.suppress(fuse.FuseOSError):
                    self.remote.call(lambda: old.close())
                return
            attrs = self._fresh_stat(path)
            if handle.writable:  # rewritten in place: its tier holds this one copy already

                async def whole() -> bytes:
                    async with self.sftp.open(path, "rb") as f:
                        return cast(bytes, await f.read())

                data = self.remote.call(whole)
                os.ftruncate(handle.fd, 0)
                _pwrite_all(handle.fd, data, 0)
                handle.size = handle.base = len(data)
                return
            if self._valid_copy(path, attrs) is None:
                copy = self._fetch(path, Tier.DISK)
                self.state.copies[path] = copy
                os.close(handle.fd)
                handle.fd = os.open(copy.local, os.O_RDONLY)
                handle.size = copy.size

    def _drop_page_cache(self, path: str) -> None:
        """The kernel's cached pages of `path` go (an open does that: no keep_cache), so
        a read under the lock sees what another instance's holder published."""
        with contextlib.suppress(OSError):
            os.close(os.open(self.config.mountpoint + path, os.O_RDONLY | os.O_NONBLOCK))

    def flock(self, path: str, owner: int, op: int, fh: int | None = None) -> int:
        """flock(2) on any instance's descriptor of `path`; owner: the open file (kernel's)."""
        kind = "u" if op & fcntl.LOCK_UN else "w" if op & fcntl.LOCK_EX else "r"
        wait = kind != "u" and not op & fcntl.LOCK_NB
        pid = self._program_pid(fuse.fuse_get_context()[2])
        req = dict(op="set", kind="flock", path=path, owner=owner, pid=pid, type=kind,
                   start=0, end=EOF_END, wait=wait)  # fmt: skip
        if kind == "u":
            self._before_unlock(fh)
        err = int(self.remote.lock_call(req, wait)["errno"])
        if not err and kind != "u":
            self._after_lock(fh)
            self._drop_page_cache(path)
        return -err

    def lock(self, path: str, owner: int, cmd: int, lock: Any, fh: int | None = None) -> int:
        """F_GETLK, F_SETLK, F_SETLKW (the kernel hands SEEK_SET ranges; owner: lock_owner)."""
        fl = lock.contents
        kind = {fcntl.F_RDLCK: "r", fcntl.F_WRLCK: "w", fcntl.F_UNLCK: "u"}.get(fl.l_type)
        if kind is None or cmd not in (fcntl.F_GETLK, fcntl.F_SETLK, fcntl.F_SETLKW):
            return -errno.EINVAL
        start = int(fl.l_start)
        end = EOF_END if fl.l_len == 0 else start + int(fl.l_len) - 1
        wait = cmd == fcntl.F_SETLKW and kind != "u"
        req = dict(op="get" if cmd == fcntl.F_GETLK else "set", kind="posix", path=path,
                   owner=owner, pid=self._program_pid(int(fl.l_pid)), type=kind, start=start,
                   end=end, wait=wait)  # fmt: skip
        if kind == "u" and cmd != fcntl.F_GETLK:
            self._before_unlock(fh)
        answer = self.remote.lock_call(req, wait)
        if cmd != fcntl.F_GETLK and kind != "u" and not answer["errno"]:
            self._after_lock(fh)
            self._drop_page_cache(path)
        if cmd == fcntl.F_GETLK and not answer["errno"]:
            if answer["type"] == "u":
                fl.l_type = fcntl.F_UNLCK
            else:
                fl.l_type = fcntl.F_RDLCK if answer["type"] == "r" else fcntl.F_WRLCK
                fl.l_whence = os.SEEK_SET
                fl.l_start = answer["start"]
                fl.l_len = 0 if answer["end"] == EOF_END else answer["end"] - answer["start"] + 1
                fl.l_pid = answer["pid"]
                self._remember(self.getlk_holders, fuse.fuse_get_context()[2], answer["pid"])
        return -int(answer["errno"])

    def _program_pid(self, pid: int) -> int:
        """The program's pid of this instance's `pid` (itself if no tracer named it)."""
        return self.program_pids.get(pid, pid)

    @staticmethod
    def _remember(table: dict[int, int], key: int, value: int) -> None:
        table.pop(key, None)
        table[key] = value
        while len(table) > MAX_PIDS:
            del table[next(iter(table))]

    def setxattr(self, path: str, name: str, value: bytes, options: int, position: int = 0) -> int:
        """Only PID_XATTR, from the instance tracer (no extended attribute reaches the volume)."""
        if name != PID_XATTR:
            raise fuse.FuseOSError(errno.ENOTSUP)
        try:
            real, program = (int(v) for v in value.split())
        except ValueError:
            raise fuse.FuseOSError(errno.EINVAL) from None
        if real <= 0 or program <= 0:
            raise fuse.FuseOSError(errno.EINVAL)
        self._remember(self.program_pids, real, program)
        return 0

    def getxattr(self, path: str, name: str, position: int = 0) -> bytes:
        """GETLK_XATTR.PID: the holder the last F_GETLK of PID found, in the program's pids."""
        prefix = GETLK_XATTR + "."
        if not name.startswith(prefix) or not name[len(prefix) :].isdigit():
            raise fuse.FuseOSError(errno.ENOTSUP)  # as before: no extended attributes
        holder = self.getlk_holders.get(int(name[len(prefix) :]))
        if holder is None:
            raise fuse.FuseOSError(errno.ENODATA)
        return str(holder).encode()

    # -- reports ------------------------------------------------------------

    def report(self) -> dict[str, Any]:
        """Heat, placement and moves of this instance (for `dcp-oss storage ls`)."""
        with self._mutex:
            self._heats_with_copies()
            held = self._held()
            return {
                "instance": self.config.instance,
                "files": {p: h.as_dict() for p, h in self.state.heat.items()},
                "held": {str(t): n for t, n in held.items()},
                "moves": [
                    {"time": round(when, 3), "path": m.path, "from": str(m.source),
                     "to": str(m.target), "reason": m.reason}
                    for when, m in self.state.ledger.moves
                ],
            }  # fmt: skip

    def send_report(self) -> None:
        """Write the report to the server's `/.dcp/` (atomically)."""
        data = json.dumps(self.report()).encode()
        name = f"/.dcp/report-{self.config.instance}.json"
        tmp = f"/.dcp/report-{self.config.instance}.tmp"

        async def put() -> None:
            async with self.sftp.open(tmp, "wb") as f:
                await f.write(data)
            await self.sftp.posix_rename(tmp, name)

        with contextlib.suppress(fuse.FuseOSError):
            self.remote.call(put)
        # Outside the lock: the reading's round trip must not hold up the program's calls
        # (limits and usage are replaced whole, each one assignment).
        self._refresh_usage()


def _pwrite_all(fd: int, data: bytes, offset: int) -> None:
    """pwrite every byte (a file system may write fewer than asked, e.g. on a signal)."""
    view = memoryview(data)
    while view:
        n = os.pwrite(fd, view, offset)
        if n <= 0:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        view, offset = view[n:], offset + n


def _part_name(path: str) -> str:
    head, _, tail = path.rpartition("/")
    return f"{head}/.dcp-part-{secrets.token_hex(6)}-{tail}"[:4000]


def _copy_file(src: str, dst: str) -> None:
    with open(src, "rb") as fin, open(dst, "wb") as fout:
        while chunk := fin.read(1 << 20):
            fout.write(chunk)
        fout.flush()


def _reporter(fs: Dcpfs, stop: threading.Event) -> None:
    while not stop.wait(REPORT_EVERY):
        fs.send_report()
    fs.send_report()


class _Fuse(fuse.FUSE):  # type: ignore[misc]
    """mfusepy, handing lock calls the kernel's lock owner instead of the file handle."""

    def lock(self, path: bytes | None, fip: Any, cmd: int, lock: Any) -> int:
        owner, fh = (int(fip.contents.lock_owner), int(fip.contents.fh)) if fip else (0, None)
        name = path.decode() if path else ""
        return int(self.operations.lock(name, owner, cmd, lock, fh))

    def flock(self, path: bytes, fip: Any, op: int) -> int:
        owner, fh = (int(fip.contents.lock_owner), int(fip.contents.fh)) if fip else (0, None)
        return int(self.operations.flock(path.decode(), owner, op, fh))

    def release(self, path: bytes | None, fip: Any) -> int:
        # The kernel releases an flock with its open file: FUSE says so here (flock_release).
        locks = self.operations.remote.locks
        if fip and fip.contents.flock_release and locks is not None:
            req = {"op": "drop", "kind": "flock", "owner": int(fip.contents.lock_owner), "id": 0}
            self.operations.remote.loop.call_soon_threadsafe(locks.send, req)
        return int(super().release(path, fip))


def main() -> None:
    """`python -m vmagent.storage.dcpfs` with its config (JSON) on stdin; mounts and serves."""
    logging.basicConfig(level=logging.INFO, format="dcpfs: %(levelname)s: %(message)s")
    logging.getLogger("asyncssh").setLevel(logging.WARNING)
    sys.setswitchinterval(0.0005)  # FUSE threads hand work to the SFTP loop thread and back
    try:
        config = FsConfig.from_json(json.loads(sys.stdin.read()))
    except (KeyError, TypeError, ValueError) as exc:
        print(f"dcpfs: bad configuration: {exc}", file=sys.stderr)
        sys.exit(2)
    for directory in (config.memory_dir, config.disk_dir, config.mountpoint):
        Path(directory).mkdir(parents=True, exist_ok=True)
    remote = Remote(config)
    fs = Dcpfs(config, remote)
    stop = threading.Event()
    reporter = threading.Thread(target=_reporter, args=(fs, stop), daemon=True)
    reporter.start()
    try:
        _Fuse(
            fs, config.mountpoint, foreground=True, nothreads=False, allow_other=True,
            default_permissions=True, attr_timeout=0, entry_timeout=ENTRY_TTL, negative_timeout=0,
            big_writes=True, max_write=MAX_WRITE, max_read=MAX_WRITE,
            fsname=f"dcpfs-{config.name}",
        )  # fmt: skip
    finally:
        stop.set()
        reporter.join(10)
        remote.close()


if __name__ == "__main__":
    main()
