"""AF_UNIX path sockets between kernels (issue 13): what the instance tracer reads.

A `bind` of a path socket is told to the agent (`op=unixbind req pid path
kind`, T waits for the answer, as for a TCP listener), its end too
(`op=unixgone pid path`).  A `connect` to a path no socket of this kernel is
bound to is asked about (`op=unixconnect req pid path kind`): the agent
answers `op=unixrelay req name=HEX` when the OSS knows the path bound on
another instance and the binder's agent connected to it (T then runs the
connect to the abstract socket `\\0dcp-relay-HEX` the agent splices to it),
`op=netrefused req errno=E` when that cannot be (a datagram or seqpacket
socket: EOPNOTSUPP; the binder's socket does not listen: ECONNREFUSED), or
`op=netack req`: nothing is known, the connect runs as it is.

A `sendmsg` carrying SCM_RIGHTS on a relayed socket (its peer is an agent's
relay socket, `\\0dcp-relay-...`, on either end) fails with EOPNOTSUPP: a
descriptor cannot cross kernels, and the relay carries bytes only.

Paths are absolute (a relative one is joined to the caller's working
directory): the program's instances see one file tree.
"""

from __future__ import annotations

import ctypes
import os
import socket
import stat
from collections.abc import Callable

from tracer.ptraceio import read_memory
from vmagent.trace import channel

SUN_LEN = 110  # sizeof(struct sockaddr_un)
MAX_PATH = 107
OP_UNIXBIND = b"unixbind"
OP_UNIXGONE = b"unixgone"
OP_UNIXCONNECT = b"unixconnect"
OP_UNIXRELAY = b"unixrelay"
RELAY_PREFIX = b"dcp-relay-"
RELAY_TIMEOUT = 30.0  # s T holds a connect for the agent's relay (OSS, the binder's agent)
KINDS = {1: "stream", 2: "dgram", 5: "seqpacket"}  # /proc/net/unix Type
LISTENING = 0x10000  # __SO_ACCEPTCON in /proc/net/unix Flags


def sockaddr_path(tid: int, addr: int, size: int) -> bytes | None:
    """The path an AF_UNIX address in `tid`'s memory names (None: another family,
    abstract, unnamed)."""
    if size < 3 or addr == 0:
        return None
    try:
        raw = read_memory(tid, addr, min(size, SUN_LEN))
    except OSError:
        return None
    if len(raw) < 3 or int.from_bytes(raw[:2], "little") != socket.AF_UNIX or raw[2] == 0:
        return None
    return raw[2:].split(b"\0", 1)[0]


def absolute(pid: int, path: bytes) -> str | None:
    """`path` made absolute against `pid`'s working directory (None: too long, or gone)."""
    if not path.startswith(b"/"):
        try:
            cwd = os.readlink(f"/proc/{pid}/cwd").encode(errors="surrogateescape")
        except OSError:
            return None
        path = os.path.join(cwd, path)
    path = os.path.normpath(path)
    if len(path) > MAX_PATH:
        return None
    return path.decode(errors="surrogateescape")


def unix_table(pid: int) -> list[tuple[int, int, int, str]]:
    """(inode, type, flags, path) of the AF_UNIX sockets of `pid`'s network namespace."""
    out: list[tuple[int, int, int, str]] = []
    try:
        with open(f"/proc/{pid}/net/unix", errors="surrogateescape") as f:
            next(f, None)
            for line in f:
                cols = line.split(None, 7)
                if len(cols) < 7:
                    continue
                path = cols[7].rstrip("\n") if len(cols) > 7 else ""
                out.append((int(cols[6]), int(cols[4], 16), int(cols[3], 16), path))
    except (OSError, ValueError):
        return out
    return out


def kind_of(pid: int, inode: int) -> str:
    """"stream", "dgram" or "seqpacket" of socket `inode` ("" if not an AF_UNIX one)."""
    for ino, kind, _flags, _path in unix_table(pid):
        if ino == inode:
            return KINDS.get(kind, "")
    return ""


def bound_here(pid: int, path: str, named: bytes) -> bool:
    """Whether a socket of this kernel is bound to `path` (absolute) or to `named` as
    the program wrote it (a relative name shows as given)."""
    given = named.decode(errors="surrogateescape")
    for _ino, _kind, _flags, shown in unix_table(pid):
        if shown and not shown.startswith("@") and shown in (path, given):
            return True
    return False


def alive(pid: int, inode: int) -> bool:
    """Whether AF_UNIX socket `inode` still exists in `pid`'s network namespace."""
    return any(ino == inode for ino, _k, _f, _p in unix_table(pid))


def relay_address(name: bytes) -> bytes:
    """The sockaddr_un of the agent's relay socket `\\0dcp-relay-NAME`."""
    return socket.AF_UNIX.to_bytes(2, "little") + b"\0" + RELAY_PREFIX + name


def socket_file(pid: int, path: str) -> tuple[int, int] | None:
    """(st_dev, st_ino) of the socket file at `path` as `pid` sees it (None: not a socket
    file there, e.g. a symbolic link put in its place)."""
    try:
        st = os.stat(f"/proc/{pid}/root{path}", follow_symlinks=False)
    except OSError:
        return None
    return (st.st_dev, st.st_ino) if stat.S_ISSOCK(st.st_mode) else None


def bind_record(req: int, pid: int, path: str, kind: str, file: tuple[int, int]) -> bytes:
    """T -> agent: `path` is bound here, its socket file is `file` (T waits)."""
    return channel.encode(
        OP_UNIXBIND, req=f"u{req}", pid=pid, path=path, kind=kind, dev=file[0], ino=file[1]
    )


def gone_record(pid: int, path: str) -> bytes:
    """T -> agent: the socket bound to `path` is gone (fire and forget)."""
    return channel.encode(OP_UNIXGONE, pid=pid, path=path)


def connect_record(req: int, pid: int, path: str, kind: str) -> bytes:
    """T -> agent: reach `path`, bound on no socket of this kernel (T waits)."""
    return channel.encode(OP_UNIXCONNECT, req=f"u{req}", pid=pid, path=path, kind=kind)


MSGHDR = 56  # sizeof(struct msghdr) on 64-bit
MMSGHDR = 64  # sizeof(struct mmsghdr): a msghdr, its msg_len, padding
MAX_VLEN = 1024  # UIO_MAXIOV: the most messages one sendmmsg sends
MAX_CONTROL = 4096  # bytes of ancillary data read
SOL_SOCKET, SCM_RIGHTS = 1, 1
PIDFD_GETFD = 438  # the same number on every architecture


def sends_descriptors(tid: int, msghdr: int) -> bool:
    """Whether the msghdr at `msghdr` in `tid`'s memory carries SCM_RIGHTS."""
    try:
        head = read_memory(tid, msghdr, MSGHDR)
        if len(head) < MSGHDR:
            return False
        control = int.from_bytes(head[32:40], "little")
        size = min(int.from_bytes(head[40:48], "little"), MAX_CONTROL)
        raw = read_memory(tid, control, size) if control and size >= 16 else b""
    except OSError:
        return False
    at = 0
    while at + 16 <= len(raw):  # struct cmsghdr: len (8), level (4), type (4)
        length = int.from_bytes(raw[at : at + 8], "little")
        level = int.from_bytes(raw[at + 8 : at + 12], "little")
        kind = int.from_bytes(raw[at + 12 : at + 16], "little")
        if level == SOL_SOCKET and kind == SCM_RIGHTS:
            return True
        if length < 16:
            return False
        at += (length + 7) & ~7
    return False


def any_sends_descriptors(tid: int, msgvec: int, vlen: int) -> bool:
    """Whether any of the `vlen` mmsghdr at `msgvec` (a sendmmsg) carries SCM_RIGHTS."""
    return any(
        sends_descriptors(tid, msgvec + i * MMSGHDR) for i in range(min(vlen, MAX_VLEN))
    )


def _syscall() -> Callable[..., int]:
    libc = ctypes.CDLL(None, use_errno=True)
    call: Callable[..., int] = libc.syscall
    return call


def peer_name(pid: int, fd: int) -> bytes:
    """The address of the peer of `pid`'s socket `fd` (b"": none, not a unix socket, or
    the descriptor cannot be borrowed)."""
    try:
        pidfd = os.pidfd_open(pid)
    except OSError:
        return b""
    try:
        mine = _syscall()(PIDFD_GETFD, pidfd, fd, 0)
        if mine < 0:
            return b""
        try:
            with socket.socket(fileno=os.dup(mine)) as s:
                if s.family != socket.AF_UNIX:
                    return b""
                peer = s.getpeername()
        finally:
            os.close(mine)
    except OSError:
        return b""
    finally:
        os.close(pidfd)
    return peer if isinstance(peer, bytes) else peer.encode(errors="surrogateescape")


def relayed(pid: int, fd: int) -> bool:
    """Whether socket `fd` of `pid` is one end of an agents' relay (its peer is the
    agent's socket `\\0dcp-relay-...`)."""
    return peer_name(pid, fd).startswith(b"\0" + RELAY_PREFIX)
