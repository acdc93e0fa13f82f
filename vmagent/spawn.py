"""Starting a remote program: the HELLO request as a value, and fork+exec (adapter).

`parse_hello` is pure (validates the wire request into an `ExecRequest`).
`spawn` forks the agent and, in the child, recreates the deputy's process
context exactly: session, signal dispositions and mask, ids, umask, rlimits,
cwd and every forwarded descriptor at its original number, then execs.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import functools
import os
import resource
import signal
from dataclasses import dataclass

from vmagent import protocol as P
from vmagent.errors import BadRequest

PR_SET_PDEATHSIG = 1
PR_SET_CHILD_SUBREAPER = 36


@dataclass(frozen=True, slots=True)
class FdSpec:
    """One descriptor the remote program must have at number `fd`."""

    fd: int
    kind: bytes  # protocol.FD_IN / FD_OUT / FD_PATH
    path: bytes = b""
    flags: int = 0
    pos: int = 0


@dataclass(frozen=True, slots=True)
class ExecRequest:
    """Everything needed to start the program as the deputy's process would have."""

    path: bytes
    argv: tuple[bytes, ...]
    env: tuple[bytes, ...]
    cwd: bytes
    umask: int
    rlimits: tuple[tuple[int, int, int], ...]
    fds: tuple[FdSpec, ...]
    uid: int
    gid: int
    groups: tuple[int, ...]
    sigign: int
    sigblk: int


def _int(fields: dict[bytes, bytes], key: bytes, default: int | None = None) -> int:
    raw = fields.get(key)
    if raw is None:
        if default is None:
            raise BadRequest(f"exec request lacks {key.decode()}")
        return default
    try:
        return int(raw)
    except ValueError as exc:
        raise BadRequest(f"exec request field {key.decode()} is not an integer") from exc


def parse_hello(payload: bytes) -> tuple[str, ExecRequest]:
    """(ticket, request) from a HELLO payload; BadRequest if malformed."""
    try:
        fields = P.pairs(payload)
        for key in (b"ticket", b"path", b"argv", b"cwd"):
            if key not in fields:
                raise BadRequest(f"exec request lacks {key.decode()}")
        argv = tuple(P.unrecord(fields[b"argv"]))
        env = tuple(P.unrecord(fields.get(b"env", b"")))
        rlimits = []
        for item in P.unrecord(fields.get(b"rlimits", b"")):
            res, soft, hard = (int(v) for v in P.unrecord(item))
            rlimits.append((res, soft, hard))
        fds = []
        for item in P.unrecord(fields.get(b"fds", b"")):
            fd_s, kind, path, flags_s, pos_s = P.unrecord(item)
            if kind not in (P.FD_IN, P.FD_OUT, P.FD_PATH):
                raise BadRequest(f"unknown descriptor kind {kind!r}")
            if kind == P.FD_PATH and not path.startswith(b"/"):
                raise BadRequest("descriptor path must be absolute")
            fds.append(FdSpec(int(fd_s), kind, path, int(flags_s), int(pos_s)))
        groups_raw = fields.get(b"groups", b"")
        groups = tuple(int(g) for g in groups_raw.split(b",") if g)
    except (P.FrameError, ValueError) as exc:
        raise BadRequest(f"malformed exec request: {exc}") from exc
    if not argv:
        raise BadRequest("exec request has an empty argv")
    if b"\0" in fields[b"path"] or not fields[b"path"]:
        raise BadRequest("exec request has a bad path")
    if len({f.fd for f in fds}) != len(fds) or any(f.fd < 0 for f in fds):
        raise BadRequest("exec request repeats or misnumbers a descriptor")
    request = ExecRequest(
        path=fields[b"path"],
        argv=argv,
        env=env,
        cwd=fields[b"cwd"],
        umask=_int(fields, b"umask", 0o022),
        rlimits=tuple(rlimits),
        fds=tuple(fds),
        uid=_int(fields, b"uid", os.getuid()),
        gid=_int(fields, b"gid", os.getgid()),
        groups=groups,
        sigign=_int(fields, b"sigign", 0),
        sigblk=_int(fields, b"sigblk", 0),
    )
    return fields[b"ticket"].decode(errors="replace"), request


def _signals_of(mask: int) -> set[int]:
    return {n for n in range(1, 65) if mask & (1 << (n - 1))}


@functools.cache
def _libc() -> ctypes.CDLL:
    return ctypes.CDLL(None, use_errno=True)


def become_subreaper() -> None:
    """Orphans of remote programs are re-parented to the agent (so it can reap/kill them)."""
    _libc().prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)


# Signals Python itself sets to SIG_IGN at start-up; SIG_IGN survives exec.
PYTHON_IGNORED = frozenset({int(signal.SIGPIPE), int(signal.SIGXFSZ)})


class SpawnFailed(Exception):
    """The child could not exec (errno and the step that failed)."""

    def __init__(self, err: int, step: str) -> None:
        super().__init__(f"{step}: {os.strerror(err)}")
        self.errno = err
        self.step = step


def spawn(request: ExecRequest, sources: dict[int, int], wrap: tuple[bytes, ...] = ()) -> int:
    """Fork and exec `request`, with descriptor `sources[n]` placed at number n.

    `wrap` prefixes the command (e.g. the tracer: `python3 -m tracer.cli --`).
    Blocks until the child has exec'd or failed (an exec takes ~1 ms).
    """
    path, argv = request.path, list(request.argv)
    if wrap:
        path, argv = wrap[0], [*wrap, request.path, *argv[1:]]
    prctl = _libc().prctl
    # Only ignored dispositions survive exec (caught ones reset by themselves):
    # undo the agent's, apply the deputy's.
    ignore = _signals_of(request.sigign) - {int(signal.SIGKILL), int(signal.SIGSTOP)}
    default = PYTHON_IGNORED - ignore
    blocked = _signals_of(request.sigblk)
    env = dict(_env_pairs(request.env))
    read_end, write_end = os.pipe2(os.O_CLOEXEC)
    pid = os.fork()
    if pid == 0:  # child: only async-signal-safe-ish work, never return
        step = "setup"
        try:
            os.close(read_end)
            prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
            os.setsid()
            signal.set_wakeup_fd(-1)
            for sig in default:
                signal.signal(sig, signal.SIG_DFL)
            for sig in ignore:
                try:
                    signal.signal(sig, signal.SIG_IGN)
                except (OSError, ValueError):
                    pass
            step = "credentials"
            if os.getuid() == 0 and (request.uid, request.gid) != (0, 0):
                os.setgroups(list(request.groups))
                os.setgid(request.gid)
                os.setuid(request.uid)
            os.umask(request.umask)
            for res, soft, hard in request.rlimits:
                try:
                    resource.setrlimit(res, (soft, hard))
                except (ValueError, OSError):
                    pass  # above the agent's own hard limit: keep the agent's
            step = "chdir " + os.fsdecode(request.cwd)
            os.chdir(request.cwd)
            step = "descriptors"
            top = max([*sources, *sources.values(), write_end, 2]) + 1
            err_fd = fcntl.fcntl(write_end, fcntl.F_DUPFD_CLOEXEC, top)
            high = {t: fcntl.fcntl(s, fcntl.F_DUPFD_CLOEXEC, top) for t, s in sources.items()}
            for target, src in high.items():
                os.dup2(src, target, inheritable=True)
            # Close every other descriptor.  Never call closerange(a, a): CPython
            # turns closerange(0, 0) into close_range(0, UINT_MAX) (closes all).
            low = 0
            for target in [*sorted(high), err_fd]:
                if low < target:
                    os.closerange(low, target)
                low = target + 1
            os.closerange(low, 1 << 20)
            signal.pthread_sigmask(signal.SIG_SETMASK, blocked)
            step = "exec " + os.fsdecode(path)
            os.execve(path, argv, env)
        except OSError as exc:
            try:
                os.write(
                    err_fd if "err_fd" in locals() else write_end,
                    f"{exc.errno or errno.EIO} {step}".encode(),
                )
            except OSError:
                pass
        finally:
            os._exit(127)
    os.close(write_end)
    try:
        report = b""
        while chunk := os.read(read_end, 512):
            report += chunk
    finally:
        os.close(read_end)
    if report:
        os.waitpid(pid, 0)
        code, _, step = report.decode(errors="replace").partition(" ")
        raise SpawnFailed(int(code) if code.isdigit() else errno.EIO, step)
    return pid


def _env_pairs(env: tuple[bytes, ...]) -> list[tuple[bytes, bytes]]:
    """execve takes a mapping; entries without '=' cannot be passed and are dropped."""
    out = []
    for item in env:
        key, sep, value = item.partition(b"=")
        if sep and key:
            out.append((key, value))
    return out
