"""Starting a remote program: the HELLO request as a value, and fork+exec (adapter).

`parse_hello` is pure (validates the wire request into an `ExecRequest`).
`fork_program` forks the agent and, in the child, recreates the deputy's
process context exactly: session, signal dispositions and mask, ids, umask,
rlimits, cwd and every forwarded descriptor at its original number; then the
child waits at its `Gate` until its instance tracer has seized it, installs
the seccomp filter and execs.  The agent learns the exec's outcome from the
child's report pipe (`Forked.errors`, `parse_report`) on its loop.
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import errno
import fcntl
import functools
import os
import resource
import select
import signal
import socket
from collections.abc import Callable
from dataclasses import dataclass

from tracer.seccomp import PreparedFilter
from vmagent.errors import AuthError, BadRequest
from vmagent.exec import protocol as P
from vmagent.exec.tickets import Grant, exec_digest
from vmagent.exec.view import View, checked

PR_SET_PDEATHSIG = 1
PR_SET_CHILD_SUBREAPER = 36
PR_SET_PTRACER = 0x59616D61  # Yama: who may trace this process (and that one's descendants)
CLONE_NEWUTS = 0x04000000
NOT_TRACED = 125  # exit status of a program whose tracer never released it
_GATE_CLOSED = b"gate"  # the child's report: its gate closed before it was released
_READY = b"R"  # the child's first byte when it must name its tracer first (Yama)
GATE_HUNG = "the instance tracer did not answer"


@dataclass(frozen=True, slots=True)
class Gate:
    """Hold the forked child until its tracer has seized it, then install `filter` and exec.

    The child blocks reading a pipe whose write end the agent hands to the
    tracer with the child's pid (`hand_off`); the tracer writes one byte
    once it has seized the child.  EOF instead (the tracer refused or died)
    and the child exits NOT_TRACED without running anything.  The filter is
    installed right after, before the child takes the program's credentials
    (`filter` sets no_new_privs only when the agent is not root).  `ptracer`
    (Yama ptrace_scope 1 only): the process whose descendants may trace the
    child (the zygote).
    """

    filter: PreparedFilter
    ptracer: int = 0


@dataclass(frozen=True, slots=True)
class FdSpec:
    """One descriptor the remote program must have at number `fd`."""

    fd: int
    kind: bytes  # protocol.FD_IN / FD_OUT / FD_PATH
    path: bytes = b""
    flags: int = 0
    pos: int = 0
    rdev: int = 0  # a terminal's device number: reopen `path` if it is that device


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
    # Issue 10: the program's view as the HELLO carries it (checked against the
    # ticket by `bind`), and the deputy's own process, `INSTANCE:PID`.
    view_raw: bytes = b""
    parent: bytes = b""
    # Issue 11: the deputy's program pid and its parent's (0: not said), which the
    # instance tracer answers getpid/getppid with (`vmagent.trace.pidspace`).
    pid: int = 0
    ppid: int = 0
    view: View | None = None  # set by `bind` once the ticket vouched for it


MAX_ID = (1 << 32) - 2  # largest uid/gid
MAX_PID = (1 << 31) - 1  # a program pid (vmagent.trace.pidspace numbers reach 2^31 - 1)
MAX_FD = (1 << 20) - 1  # spawn closes descriptors up to 2^20
MAX_OFFSET = (1 << 63) - 1
MAX_MASK = (1 << 64) - 1
RLIMIT_COUNT = 16  # RLIM_NLIMITS on Linux


def _int(
    fields: dict[bytes, bytes], key: bytes, default: int | None, low: int, high: int
) -> int | None:
    raw = fields.get(key)
    if raw is None:
        return default
    return _ranged(raw, key.decode(), low, high)


def _ranged(raw: bytes, what: str, low: int, high: int) -> int:
    """An integer field in [low, high]; BadRequest naming the field otherwise."""
    if len(raw) > 24:
        raise BadRequest(f"exec request field {what} is out of range")
    try:
        value = int(raw)
    except ValueError as exc:
        raise BadRequest(f"exec request field {what} is not an integer") from exc
    if not low <= value <= high:
        raise BadRequest(f"exec request field {what} is out of range ({value})")
    return value


def _no_nul(items: tuple[bytes, ...] | list[bytes], what: str) -> None:
    for i, item in enumerate(items):
        if b"\0" in item:
            raise BadRequest(f"exec request has a NUL byte in {what}[{i}]")


def parse_hello(payload: bytes) -> ExecRequest:
    """The request of a HELLO payload; BadRequest (with the reason) if malformed.

    uid/gid/groups here are what the deputy says; `bind` replaces them with
    the ticket's.  Absent uid/gid come out as -1 (the ticket decides).
    """
    try:
        fields = P.pairs(payload)
        for key in (b"path", b"argv", b"cwd"):
            if key not in fields:
                raise BadRequest(f"exec request lacks {key.decode()}")
        argv = tuple(P.unrecord(fields[b"argv"]))
        env = tuple(P.unrecord(fields.get(b"env", b"")))
        rlimits = []
        for item in P.unrecord(fields.get(b"rlimits", b"")):
            res, soft, hard = P.unrecord(item)
            rlimits.append(
                (
                    _ranged(res, "rlimit", 0, RLIMIT_COUNT - 1),
                    _ranged(soft, "rlimit", -1, MAX_OFFSET),
                    _ranged(hard, "rlimit", -1, MAX_OFFSET),
                )
            )
        fds = []
        for item in P.unrecord(fields.get(b"fds", b"")):
            fd_s, kind, path, flags_s, pos_s, *extra = P.unrecord(item)
            if kind not in (P.FD_IN, P.FD_OUT, P.FD_PATH):
                raise BadRequest(f"unknown descriptor kind {kind!r}")
            if (kind == P.FD_PATH or extra) and not path.startswith(b"/"):
                raise BadRequest("descriptor path must be absolute")
            _no_nul([path], "descriptor path")
            rdev = _ranged(extra[0], "descriptor rdev", 0, MAX_MASK) if extra else 0
            fds.append(
                FdSpec(
                    _ranged(fd_s, "descriptor number", 0, MAX_FD),
                    kind,
                    path,
                    _ranged(flags_s, "descriptor flags", 0, (1 << 31) - 1),
                    _ranged(pos_s, "descriptor offset", 0, MAX_OFFSET),
                    rdev,
                )
            )
        groups_raw = fields.get(b"groups", b"")
        groups = tuple(_ranged(g, "groups", 0, MAX_ID) for g in groups_raw.split(b",") if g)
    except (P.FrameError, ValueError) as exc:
        raise BadRequest(f"malformed exec request: {exc}") from exc
    if not argv:
        raise BadRequest("exec request has an empty argv")
    path = fields[b"path"]
    if not path:
        raise BadRequest("exec request has an empty path")
    _no_nul([path], "path")
    _no_nul(argv, "argv")
    _no_nul(env, "env")
    _no_nul([fields[b"cwd"]], "cwd")
    if len({f.fd for f in fds}) != len(fds):
        raise BadRequest("exec request repeats a descriptor")
    uid = _int(fields, b"uid", -1, 0, MAX_ID)
    gid = _int(fields, b"gid", -1, 0, MAX_ID)
    umask = _int(fields, b"umask", 0o022, 0, 0o777)
    sigign = _int(fields, b"sigign", 0, 0, MAX_MASK)
    sigblk = _int(fields, b"sigblk", 0, 0, MAX_MASK)
    assert uid is not None and gid is not None and umask is not None
    assert sigign is not None and sigblk is not None
    return ExecRequest(
        path=path,
        argv=argv,
        env=env,
        cwd=fields[b"cwd"],
        umask=umask,
        rlimits=tuple(rlimits),
        fds=tuple(fds),
        uid=uid,
        gid=gid,
        groups=groups,
        sigign=sigign,
        sigblk=sigblk,
        view_raw=fields.get(b"view", b""),
        parent=fields.get(b"parent", b"")[:256],
        pid=_int(fields, b"pid", 0, 0, MAX_PID) or 0,
        ppid=_int(fields, b"ppid", 0, 0, MAX_PID) or 0,
    )


def bind(request: ExecRequest, grant: Grant) -> ExecRequest:
    """The request as the ticket allows it: its exec, run as its uid/gid/groups.

    The HELLO's own ids are only a cross-check: one that differs from the
    ticket's is refused, never obeyed.
    """
    if exec_digest(request.path, request.argv) != grant.digest:
        raise AuthError("the exec ticket was issued for another program or argv")
    if request.uid not in (-1, grant.uid) or request.gid not in (-1, grant.gid):
        raise AuthError(
            f"the request names uid {request.uid} gid {request.gid} but the exec ticket "
            f"vouches for uid {grant.uid} gid {grant.gid}"
        )
    view = checked(request.view_raw, grant.program, grant.view)
    fds = tuple(dataclasses.replace(f, path=view.real(f.path)) for f in request.fds)
    return dataclasses.replace(
        request, uid=grant.uid, gid=grant.gid, groups=grant.groups, view=view,
        cwd=view.real(request.cwd), fds=fds,
    )  # fmt: skip


def _signals_of(mask: int) -> set[int]:
    return {n for n in range(1, 65) if mask & (1 << (n - 1))}


@functools.cache
def _libc() -> ctypes.CDLL:
    return ctypes.CDLL(None, use_errno=True)


def take_hostname(name: str) -> None:
    """Give this process (and what it starts) a UTS namespace of its own named `name`.

    Issue 11: the program sees one hostname (its view's `home`) on every
    instance: `hostname`, `uname -n` and /proc/sys/kernel/hostname alike.
    Nothing to do where the hostname is already `name`.  Needs CAP_SYS_ADMIN
    (the agent runs as root on local instances and in VMs); OSError otherwise.
    """
    if socket.gethostname() == name:
        return
    if _libc().unshare(CLONE_NEWUTS) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))
    socket.sethostname(name)


def become_subreaper() -> None:
    """Orphans of remote programs are re-parented to the agent (so it can reap/kill them)."""
    _libc().prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)


# Signals Python itself sets to SIG_IGN at start-up; SIG_IGN survives exec.
PYTHON_IGNORED = frozenset({int(signal.SIGPIPE), int(signal.SIGXFSZ)})


def caught() -> set[int]:
    """The signals this process has a Python handler for (the agent's)."""
    out = set()
    for sig in signal.valid_signals():
        with contextlib.suppress(OSError, ValueError):
            if callable(signal.getsignal(sig)):
                out.add(int(sig))
    return out


class SpawnFailed(Exception):
    """The child could not exec (errno and the step that failed)."""

    def __init__(self, err: int, step: str) -> None:
        super().__init__(f"{step}: {os.strerror(err)}")
        self.errno = err
        self.step = step


class GateClosed(SpawnFailed):
    """The child's tracer never released it: the program did not run."""

    def __init__(self, message: str = "instance tracer unavailable") -> None:
        Exception.__init__(self, message)
        self.errno = errno.EPERM
        self.step = "trace"
        self.status = NOT_TRACED


@dataclass(frozen=True, slots=True)
class Forked:
    """A forked child on its way to exec: `errors` reaches EOF once it exec'd.

    Before EOF the child may write its failure report (`failure` reads it).
    """

    pid: int
    errors: int


def parse_report(report: bytes) -> SpawnFailed | None:
    """The failure a child's report describes (None for none: it exec'd)."""
    if not report:
        return None
    if report == _GATE_CLOSED:
        return GateClosed()
    code, _, step = report.decode(errors="replace").partition(" ")
    return SpawnFailed(int(code) if code.isdigit() else errno.EIO, step)


def fork_program(
    request: ExecRequest,
    sources: dict[int, int],
    gate: Gate | None,
    hand_off: Callable[[int, int], None] | None = None,
    timeout: float = 10.0,
) -> Forked:
    """Fork the child of `request`, with descriptor `sources[n]` placed at number n.

    With a `gate`, `hand_off(pid, go_w)` gets the child's pid and the write
    end of its gate (it owns and closes it) before the child may go on; if
    it raises, the child exits unrun (waited for here) and the exception
    propagates.  `gate` None runs the program untraced (benchmarks' baseline
    only).  Returns without waiting for the exec (`timeout` bounds the one
    wait there is: for a child that must name its tracer first).
    """
    path, argv = request.path, list(request.argv)
    prctl = _libc().prctl
    # Only ignored dispositions survive exec (caught ones reset by themselves):
    # undo the agent's, apply the deputy's.
    ignore = _signals_of(request.sigign) - {int(signal.SIGKILL), int(signal.SIGSTOP)}
    default = PYTHON_IGNORED - ignore
    blocked = _signals_of(request.sigblk)
    env = dict(_env_pairs(request.env))
    read_end, write_end = os.pipe2(os.O_CLOEXEC)
    go_r, go_w = os.pipe2(os.O_CLOEXEC) if gate is not None else (-1, -1)
    # Every signal is held from the fork to the exec: until the child has reset
    # them, the agent's handlers (SIGTERM, SIGINT, SIGCHLD) are its own, and a
    # signal sent to the program's pid in that window (a sibling's `kill $!`
    # right after the placement) would run one and be lost.  Held, it stays
    # pending and is delivered as the program's mask and dispositions say.
    held = signal.pthread_sigmask(signal.SIG_BLOCK, signal.valid_signals())
    try:
        pid = os.fork()
    except BaseException:
        signal.pthread_sigmask(signal.SIG_SETMASK, held)
        raise
    if pid == 0:  # child: only async-signal-safe-ish work, never return
        step = "setup"
        try:
            os.close(read_end)
            prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
            if gate is not None:
                os.close(go_w)
                if gate.ptracer:
                    prctl(PR_SET_PTRACER, gate.ptracer, 0, 0, 0)
                    os.write(write_end, _READY)
            os.setsid()
            signal.set_wakeup_fd(-1)
            for sig in caught() - ignore:
                signal.signal(sig, signal.SIG_DFL)
            for sig in default:
                signal.signal(sig, signal.SIG_DFL)
            for sig in ignore:
                try:
                    signal.signal(sig, signal.SIG_IGN)
                except (OSError, ValueError):
                    pass
            if gate is not None:
                # Traced from here on.  The filter goes in with the agent's own
                # credentials: as root it needs no no_new_privs, so a set-user-ID
                # program the user runs keeps its privilege, as natively (its
                # tracer is root too).  The calls below it are served like the
                # program's (a mapped cwd is the view's).
                step = "trace"
                if not os.read(go_r, 1):
                    os.write(write_end, _GATE_CLOSED)
                    os._exit(NOT_TRACED)  # never run untraced
                os.close(go_r)
                step = "seccomp"
                err = gate.filter.install()
                if err:
                    raise OSError(err, os.strerror(err))
            if request.view is not None and request.view.home and os.geteuid() == 0:
                step = "hostname"
                take_hostname(request.view.home)
            step = "credentials"
            if os.getuid() == 0:
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
    signal.pthread_sigmask(signal.SIG_SETMASK, held)
    os.close(write_end)
    if gate is None:
        return Forked(pid, read_end)
    os.close(go_r)
    try:
        if gate.ptracer:  # the tracer may only seize once the child named it
            ready = _read_report(read_end, timeout, len(_READY))
            if ready != _READY:  # it died first, or hangs: it never runs
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
                raise GateClosed()
        assert hand_off is not None
        hand_off(pid, go_w)
    except BaseException:
        with contextlib.suppress(OSError):
            os.close(go_w)  # the child reads EOF and exits unrun
        with contextlib.suppress(ChildProcessError):
            os.waitpid(pid, 0)
        os.close(read_end)
        raise
    return Forked(pid, read_end)


def _read_report(fd: int, timeout: float | None, limit: int = 1 << 16) -> bytes | None:
    """What the child wrote on its error pipe until EOF or `limit` bytes; None on timeout."""
    report = b""
    while len(report) < limit:
        if timeout is not None and not select.select([fd], [], [], timeout)[0]:
            return None
        chunk = os.read(fd, min(512, limit - len(report)))
        if not chunk:
            break
        report += chunk
    return report


def _env_pairs(env: tuple[bytes, ...]) -> list[tuple[bytes, bytes]]:
    """execve takes a mapping; entries without '=' cannot be passed and are dropped."""
    out = []
    for item in env:
        key, sep, value = item.partition(b"=")
        if sep and key:
            out.append((key, value))
    return out
