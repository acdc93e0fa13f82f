"""What the home deputy tells the agent about its process: the HELLO payload.

The deputy describes the process it stands in for as it was exec'd: the inherited
descriptors (which to reopen by path, which to stream in or out), the environment,
cwd, umask, rlimits, ids, and the ignored and blocked signal masks.  Everything is
read from /proc/self so that the deputy loads no pure-Python module of the standard
library (the deputy's rule, see `vmagent.exec.deputy`): only `os` (already loaded by
the interpreter) and `vmagent.exec.protocol`.
"""

import os

from vmagent.exec import protocol as P

ACCMODE = 3  # O_ACCMODE
# Never forwarded to an instance: the account's OSS token.
PRIVATE_ENV = (b"DCP_TOKEN=",)


def _signal_masks() -> tuple[int, int]:
    """(ignored, blocked) signal masks of this process, from /proc/self/status."""
    ignored = blocked = 0
    with open("/proc/self/status", "rb") as f:
        for line in f:
            if line.startswith(b"SigIgn:"):
                ignored = int(line.split()[1], 16)
            elif line.startswith(b"SigBlk:"):
                blocked = int(line.split()[1], 16)
    return ignored, blocked


def _fdinfo(fd: int) -> tuple[int, int]:
    """(flags, pos) of a descriptor from /proc/self/fdinfo."""
    flags = pos = 0
    with open(f"/proc/self/fdinfo/{fd}", "rb") as f:
        for line in f:
            if line.startswith(b"flags:"):
                flags = int(line.split()[1], 8)
            elif line.startswith(b"pos:"):
                pos = int(line.split()[1])
    return flags, pos


def classify_fds() -> tuple[list[bytes], list[int], list[int]]:
    """Describe the inherited descriptors: (HELLO records, fds to stream in, out)."""
    records: list[bytes] = []
    ins: list[int] = []
    outs: list[int] = []
    fds = sorted(int(n) for n in os.listdir("/proc/self/fd"))
    for fd in fds:
        try:
            st = os.fstat(fd)
            flags, pos = _fdinfo(fd)
        except OSError:
            continue  # the descriptor of the listdir itself, already closed
        fmt = st.st_mode & 0o170000
        acc = flags & ACCMODE
        tty = os.isatty(fd)
        kind = b""
        path = b""
        if (fmt == 0o100000 and acc != os.O_WRONLY) or (fmt == 0o020000 and not tty):
            path = os.readlink(f"/proc/self/fd/{fd}").encode()
            if path.startswith(b"/") and not path.endswith(b" (deleted)"):
                kind = P.FD_PATH
        rdev = b""
        if not kind and fmt in (0o010000, 0o140000, 0o020000, 0o100000):
            # pipes, sockets, ttys and files open for writing are streamed
            if acc == os.O_RDONLY or (acc == os.O_RDWR and fd == 0):
                kind = P.FD_IN
            else:
                kind = P.FD_OUT
            if tty:
                # An instance that sees this very terminal device (same host)
                # reopens it, so the program gets a real tty; others stream.
                path = os.readlink(f"/proc/self/fd/{fd}").encode()
                rdev = str(st.st_rdev).encode()
        if not kind:
            continue  # directories, event fds...: the remote program goes without
        if kind == P.FD_IN:
            ins.append(fd)
        elif kind == P.FD_OUT:
            outs.append(fd)
        keep = flags & (ACCMODE | os.O_APPEND | os.O_NONBLOCK)
        items = [str(fd).encode(), kind, path, str(keep).encode(), str(pos).encode()]
        records.append(P.record([*items, rdev] if rdev else items))
    return records, ins, outs


def _rlimits() -> bytes:
    """Every rlimit, from /proc/self/limits (rows in RLIMIT_* order; -1 = unlimited).

    Reading the file avoids loading the `resource` extension module (~0.3 ms).
    """
    items: list[bytes] = []
    with open("/proc/self/limits", "rb") as f:
        rows = f.read().splitlines()[1:]
    for res, row in enumerate(rows):
        fields = row[26:].split()
        if len(fields) < 2:
            continue
        soft, hard = (b"-1" if v == b"unlimited" else v for v in fields[:2])
        items.append(P.record([str(res).encode(), soft, hard]))
    return P.record(items)


def build_hello(
    rest: list[bytes],
    fd_records: list[bytes],
    masks: tuple[int, int] | None = None,
    extra: dict[bytes, bytes] | None = None,
) -> bytes:
    """The HELLO payload describing this process and the program to start."""
    with open("/proc/self/environ", "rb") as f:
        # The environment as exec'd, before Python touched it (locale coercion).
        env = [e for e in f.read().split(b"\0") if e and not e.startswith(PRIVATE_ENV)]
    mask = os.umask(0)
    os.umask(mask)
    # Python ignores SIGPIPE and SIGXFSZ itself; every other ignored signal was
    # inherited across the exec and must stay ignored remotely.
    ignored, blocked = masks if masks is not None else _signal_masks()
    ignored &= ~((1 << (13 - 1)) | (1 << (25 - 1)))
    fields = {
        b"path": rest[0],
        b"argv": P.record(rest[1:]),
        b"env": P.record(env),
        b"cwd": os.getcwdb(),
        b"umask": str(mask).encode(),
        b"rlimits": _rlimits(),
        b"fds": P.record(fd_records),
        b"uid": str(os.getuid()).encode(),
        b"gid": str(os.getgid()).encode(),
        b"groups": b",".join(str(g).encode() for g in os.getgroups()),
        b"sigign": str(ignored).encode(),
        b"sigblk": str(blocked).encode(),
    }
    fields.update(extra or {})  # view, parent (issue 10)
    return P.unpairs(fields)
