"""File locks of a placed program on the descriptors it inherited from its deputy (issue 14).

A placed process's inherited descriptor is a copy: a pipe the agent relays, or
the same file reopened on the instance.  The lock that matters is on the
*deputy's* open file description at home, which the program's parent and
siblings share (`( flock 9; ... ) 9>lock`): a lock on the copy would exclude
nobody.  So the instance tracer T stops flock and fcntl's lock commands and
asks the agent (`op=lock` on its channel); the agent sends the request to the
deputy (LOCK frame) when the descriptor is one of the session's copies, and
the deputy takes the lock on its own descriptor, blocking in a thread if it
must, then answers (LOCKED).  Any other descriptor (a file the program opened
itself) is locked natively by the instance's kernel (`op=native`).

Records (`vmagent.trace.channel`'s encoding) on a socket of their own, which T
hands the agent on its channel first (`op=lockchan`, with the descriptor):

T -> agent   `op=lock req pid fd call cmd arg` (call `flock`: arg the operation;
             `fcntl`: cmd and the 32-byte struct flock); `op=lock req call=cancel`
             (a signal interrupted the wait: the deputy undoes a late grant)
agent -> T   `op=locked req result data` (data: F_GETLK's struct flock, pids in
             the home's numbers, i.e. the program's); `op=native req`.

Pure codec plus `inherited`, the agent's /proc and kcmp(2) adapter.
"""

from __future__ import annotations

import ctypes
import os
import stat
from collections.abc import Mapping

from vmagent.exec import protocol as P

OP_LOCKCHAN = b"lockchan"  # T -> agent, with [sock]: lock requests come on sock from now
OP_LOCK = b"lock"
OP_LOCKED = b"locked"
OP_NATIVE = b"native"
CANCEL = b"cancel"

# fcntl commands that take or test record locks (x86_64 <asm-generic/fcntl.h>).
F_GETLK, F_SETLK, F_SETLKW = 5, 6, 7
F_OFD_GETLK, F_OFD_SETLK, F_OFD_SETLKW = 36, 37, 38
LOCK_CMDS = frozenset({F_GETLK, F_SETLK, F_SETLKW, F_OFD_GETLK, F_OFD_SETLK, F_OFD_SETLKW})
GET_CMDS = frozenset({F_GETLK, F_OFD_GETLK})
FLOCK_SIZE = 32  # sizeof(struct flock) on x86_64
L_PID = 24  # offset of l_pid in it (l_type, l_whence: 2 bytes each; l_start, l_len: 8, aligned)
LOCK_NB = 4
F_UNLCK = 2

SYS_KCMP = 312  # x86_64
KCMP_FILE = 0


def lock_record(req: int, pid: int, fd: int, call: str, cmd: int, arg: bytes) -> bytes:
    """T -> agent: lock (or test) `fd` of process `pid` for the program."""
    return P.unpairs(
        {
            b"op": OP_LOCK,
            b"req": b"%d" % req,
            b"pid": b"%d" % pid,
            b"fd": b"%d" % fd,
            b"call": call.encode(),
            b"cmd": b"%d" % cmd,
            b"arg": arg,
        }
    )


def cancel_record(req: int) -> bytes:
    """T -> agent: request `req` is given up (its caller got EINTR)."""
    return P.unpairs({b"op": OP_LOCK, b"req": b"%d" % req, b"call": CANCEL})


def locked_record(req: bytes, result: bytes, data: bytes) -> bytes:
    """agent -> T: the deputy's answer."""
    return P.unpairs({b"op": OP_LOCKED, b"req": req, b"result": result, b"data": data})


def native_record(req: bytes) -> bytes:
    """agent -> T: not an inherited descriptor: the call runs on this kernel."""
    return P.unpairs({b"op": OP_NATIVE, b"req": req})


def deputy_request(record: Mapping[bytes, bytes]) -> bytes:
    """The LOCK payload for the deputy, from T's `op=lock` (only the fields it needs)."""
    return P.unpairs({k: record.get(k, b"") for k in (b"req", b"call", b"cmd", b"arg")})


def blocking(call: str, cmd: int, arg: int) -> bool:
    """Whether the call may wait (flock without LOCK_NB, F_SETLKW, F_OFD_SETLKW)."""
    if call == "flock":
        return not arg & LOCK_NB
    return cmd in (F_SETLKW, F_OFD_SETLKW)


_libc = ctypes.CDLL(None, use_errno=True)


def same_description(pid: int, fd: int, ours: int) -> bool:
    """kcmp(2): is `pid`'s `fd` the very open file description of our `ours`?"""
    return _libc.syscall(SYS_KCMP, pid, os.getpid(), KCMP_FILE, fd, ours) == 0


def inherited(pid: int, fd: int, paths: Mapping[int, int], pipes: Mapping[int, int]) -> int | None:
    """The deputy's descriptor that `pid`'s `fd` is a copy of, or None.

    `paths`: deputy fd -> our copy of a reopened file (the program's shares its
    description); `pipes`: deputy fd -> our end of a relayed pipe (the
    program's is the other end of the same pipe: same inode).
    """
    try:
        st = os.stat(f"/proc/{pid}/fd/{fd}")
    except OSError:
        return None
    if stat.S_ISFIFO(st.st_mode):
        for target, ours in pipes.items():
            try:
                mine = os.fstat(ours)
                if (mine.st_dev, mine.st_ino) == (st.st_dev, st.st_ino):
                    return target
            except OSError:
                continue
        return None
    for target, ours in paths.items():
        if same_description(pid, fd, ours):
            return target
    return None
