"""Start a program seized by the calling thread, with the seccomp filter in place.

The child waits on a pipe until the parent has PTRACE_SEIZEd it (so EXITKILL
and the fork/exec/seccomp options hold from its first instruction of the
program), restores the signal state a shell would give it, installs the filter
and execs.  All Python work in the child is done on objects prepared before
fork; the child never allocates locks another thread could hold.
"""

from __future__ import annotations

import errno
import os
import signal
import stat
from collections.abc import Callable, Mapping, Sequence
from typing import NamedTuple

from tracer import ptraceio
from tracer.errors import SpawnError
from tracer.seccomp import PreparedFilter

# glibc keeps the first two real-time signals for its threads (cancellation,
# setxid); they are neither blockable through it nor anyone else's to send.
_LIBC_RESERVED = frozenset({32, 33})
# Every signal a process can catch: dcptrace passes each on to the program
# (front.py) and its tracer survives each (the tracer child handles them).
CATCHABLE_SIGNALS = frozenset(
    signal.Signals(n) if n < signal.SIGRTMIN else n
    for n in range(1, signal.SIGRTMAX + 1)
    if n not in (signal.SIGKILL, signal.SIGSTOP) and n not in _LIBC_RESERVED
)
# Dispositions dcptrace changes (Python ignores SIGPIPE and SIGXFSZ; the tracer
# ignores or handles the rest); exec keeps SIG_IGN, so the child puts back
# what the user started dcptrace with (SIG_IGN under nohup or `trap '' SIG`).
RESTORED_SIGNALS = tuple(sorted(CATCHABLE_SIGNALS))


def initial_dispositions() -> dict[int, signal.Handlers]:
    """SIG_IGN or SIG_DFL for each restored signal, as the user's shell gave them."""
    out: dict[int, signal.Handlers] = {}
    for sig in RESTORED_SIGNALS:
        handler = signal.getsignal(sig)
        ignored = handler == signal.SIG_IGN and sig not in (signal.SIGPIPE, signal.SIGXFSZ)
        out[int(sig)] = signal.SIG_IGN if ignored else signal.SIG_DFL
    return out


class Spawned(NamedTuple):
    """A started, seized program; `errors` reports an exec failure in the child."""

    pid: int
    path: str
    errors: int  # read end of a CLOEXEC pipe: EOF on success, errno text on failure


def resolve(
    program: str, env: Mapping[str, str], real_of: Callable[[str], str] | None = None
) -> str:
    """Find the program as execvp would; raise SpawnError with the shell's exit code.

    `real_of` turns a path the program sees into the real one (under --map);
    the path returned is the one the program sees, which its exec will use.
    """
    real = real_of or (lambda p: p)
    if "/" in program:
        path = program
    else:
        for directory in env.get("PATH", os.defpath).split(os.pathsep):
            candidate = os.path.join(directory or ".", program)
            found = real(candidate)
            if os.path.isfile(found) and os.access(found, os.X_OK):
                path = candidate
                break
        else:
            raise SpawnError(program, "command not found", 127)
    try:
        st = os.stat(real(path))
    except FileNotFoundError:
        raise SpawnError(program, "No such file or directory", 127) from None
    except OSError as exc:
        raise SpawnError(program, exc.strerror or str(exc), 126) from None
    if stat.S_ISDIR(st.st_mode):
        raise SpawnError(program, "Is a directory", 126)
    if not os.access(real(path), os.X_OK):
        raise SpawnError(program, "Permission denied", 126)
    return path


def spawn(
    argv: Sequence[str],
    env: Mapping[str, str],
    filt: PreparedFilter,
    path: str,
    sigmask: set[int | signal.Signals],
    dispositions: Mapping[int, signal.Handlers],
) -> Spawned:
    """Fork, seize and exec `argv` under `filt` with `sigmask`; run on the tracer thread."""
    args = [os.fsencode(a) for a in argv]
    envb = {os.fsencode(k): os.fsencode(v) for k, v in env.items()}
    bpath = os.fsencode(path)
    go_r, go_w = os.pipe()
    err_r, err_w = os.pipe2(os.O_CLOEXEC)
    pid = os.fork()
    if pid == 0:  # child: no raising, no logging, only _exit
        code = 127
        try:
            os.close(go_w)
            os.close(err_r)
            if not os.read(go_r, 1):
                os._exit(125)  # the parent could not seize us: never run untraced
            os.close(go_r)
            for sig in RESTORED_SIGNALS:
                signal.signal(sig, dispositions.get(int(sig), signal.SIG_DFL))
            signal.pthread_sigmask(signal.SIG_SETMASK, sigmask)
            err = filt.install()
            if err:
                os.write(err_w, f"cannot install seccomp filter: {os.strerror(err)}".encode())
                os._exit(126)
            try:
                os.execve(bpath, args, envb)
            except OSError as exc:
                if exc.errno != errno.ENOEXEC:
                    raise
                # No #! line: run it with the shell, as execvp does.
                os.execve(b"/bin/sh", [b"/bin/sh", bpath, *args[1:]], envb)
        except OSError as exc:
            code = 126 if exc.errno in (errno.EACCES, errno.ENOEXEC, errno.EISDIR) else 127
            os.write(err_w, (exc.strerror or "exec failed").encode())
        finally:
            os._exit(code)
    os.close(go_r)
    os.close(err_w)
    try:
        ptraceio.seize(pid)
    except ptraceio.PtraceRequestError as exc:
        os.close(go_w)  # the child reads EOF and exits without running the program
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        os.close(err_r)
        tracer = _tracer_of_self()
        if tracer:
            raise SpawnError(
                argv[0],
                f"cannot trace it: dcptrace is itself traced by pid "
                f"{tracer}, and a process has only one tracer",
                125,
            ) from exc
        raise SpawnError(argv[0], f"cannot trace it: {exc}", 125) from exc
    os.write(go_w, b"x")
    os.close(go_w)
    return Spawned(pid, path, err_r)


def _tracer_of_self() -> int:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("TracerPid:"):
                    return int(line.split()[1])
    except (OSError, ValueError):
        pass
    return 0


def exec_failure(spawned: Spawned) -> str | None:
    """The child's exec error message, or None when exec succeeded."""
    chunks = []
    while chunk := os.read(spawned.errors, 4096):
        chunks.append(chunk)
    os.close(spawned.errors)
    return b"".join(chunks).decode(errors="replace") or None
