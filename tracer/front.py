"""dcptrace's two processes: the front the shell waits on, and the tracer behind it.

The front exits with the program's status as soon as the program's main
process ends, as a native run would, while the tracer child keeps serving
any background processes the program left running (their seccomp filter
needs a tracer: without one, intercepted calls fail with ENOSYS).

Lifeline: the front holds the write end of a pipe.  If the front dies without
writing its release byte (kill -9), the tracer sees EOF and exits at once;
PTRACE_O_EXITKILL then kills every tracee.  No tracee outlives an abnormal end.

Messages tracer -> front, one line each: `pid N`, `exit N`, `signal N`,
`dumped N` (killed by signal N, core written), `stop N`,
`limit TEXT` (the OSS stopped the program at a limit: dcptrace then says TEXT and
exits LIMIT_STATUS whatever the program's own end), and `done N` once the
observation outputs (summary, record, trace) are finished: N is 0 when all
were written, 125 when one was lost (the tracer said which).
"""

from __future__ import annotations

import os
import signal
import sys
import threading
from collections.abc import Callable, Sequence
from typing import NamedTuple

from tracer.spawn import CATCHABLE_SIGNALS

_RELEASE = b"r"
LIMIT_STATUS = 124  # a limit stopped the program (as timeout(1) says its time ran out)
# Every signal another process sends to dcptrace (kill, sigqueue) is passed to
# the program's main process, as if sent to it: all of them but SIGKILL and
# SIGSTOP, which cannot be caught.  The same signals from the terminal, or any
# the kernel raises for the front itself (a child's SIGCHLD, SIGPIPE of its own
# write), are not: si_code tells them apart (see _Forwarder).
FORWARDED_SIGNALS = CATCHABLE_SIGNALS
TTY_SIGNALS = (signal.SIGINT, signal.SIGQUIT, signal.SIGTSTP, signal.SIGTTIN, signal.SIGTTOU)
_FRONT_STOP_SIGNALS = (signal.SIGTSTP, signal.SIGTTIN, signal.SIGTTOU)


class MainEnd(NamedTuple):
    """How the program's main process ended."""

    exit_status: int | None
    signal: int | None
    outputs_lost: bool = False  # a requested output (trace, summary, record) was not written
    core_dumped: bool = False  # killed by `signal` with a core written
    limit: str | None = None  # why the OSS stopped the program (`limit` message)


class TracerLink:
    """The tracer child's side: report to the front, die with it."""

    def __init__(
        self,
        status_w: int,
        lifeline_r: int,
        keep_stderr: bool,
        abandon: Sequence[Callable[[], None]] = (),
    ) -> None:
        self._status = status_w
        self._lifeline = lifeline_r
        self._keep_stderr = keep_stderr
        self.released = threading.Event()
        self._abandon: list[Callable[[], None]] = list(abandon)

    def watch_lifeline(self) -> None:
        """Exit the tracer (killing the tracees) if the front dies unreleased."""

        def watch() -> None:
            data = os.read(self._lifeline, 1)
            if data == _RELEASE:
                self.released.set()
                return
            for cleanup in self._abandon:
                cleanup()
            os._exit(1)

        threading.Thread(target=watch, name="dcptrace-lifeline", daemon=True).start()

    def send(self, line: str) -> None:
        """One message to the front (ignored once the front is gone)."""
        try:
            os.write(self._status, line.encode() + b"\n")
        except OSError:
            pass
        kind = line.split(" ", 1)[0]
        # The tracer must not hold the caller's pipes open: a reader of
        # dcptrace's output sees EOF when the program's own processes close it.
        if kind == "pid":
            _to_devnull(0, 1)
        elif kind in ("exit", "signal", "dumped") and not self._keep_stderr:
            _to_devnull(2)


def _survive(sig: int, frame: object) -> None:
    """The tracer's handler of a signal sent to its process group: carry on."""


def _to_devnull(*fds: int) -> None:
    null = os.open(os.devnull, os.O_RDWR)
    for fd in fds:
        os.dup2(null, fd)
    os.close(null)


def run_split(
    tracer_main: Callable[[TracerLink], int],
    wait_for_tracer: bool,
    abandon: Sequence[Callable[[], None]] = (),
) -> MainEnd:
    """Fork the tracer child running `tracer_main`; return how the main process ended.

    With `wait_for_tracer` (observation outputs requested) the front also waits
    for the tracer to finish, so summaries and records are complete on return.
    `abandon` cleans up what the front made before the fork (temporary output
    files) if the front dies: known to the tracer before it watches the lifeline,
    so a front killed at once leaves nothing behind either.
    """
    status_r, status_w = os.pipe()
    lifeline_r, lifeline_w = os.pipe()
    old_mask = signal.pthread_sigmask(signal.SIG_BLOCK, FORWARDED_SIGNALS)
    tracer_pid = os.fork()
    if tracer_pid == 0:
        code = 1
        try:
            os.close(status_r)
            os.close(lifeline_w)
            # The terminal's signals reach the program's group directly, and
            # so do those sent to the group (`timeout` signals its own): the
            # tracer must survive them to keep serving it.  A handler rather
            # than SIG_IGN where it can: processes it starts get SIG_DFL.
            for sig in FORWARDED_SIGNALS - {signal.SIGCHLD}:
                tty = sig in TTY_SIGNALS
                signal.signal(sig, signal.SIG_IGN if tty else _survive)
            signal.pthread_sigmask(signal.SIG_SETMASK, old_mask)
            link = TracerLink(status_w, lifeline_r, keep_stderr=wait_for_tracer, abandon=abandon)
            link.watch_lifeline()
            code = tracer_main(link)
        except BaseException:
            import traceback

            traceback.print_exc()
            code = 125
        finally:
            os._exit(code)
    os.close(status_w)
    os.close(lifeline_r)
    # The front stops only by mirroring the program's main process (see
    # mirror_stop): stopping on the terminal's own SIGTSTP as well would
    # stop it a second time after the shell's SIGCONT.
    previous = {sig: signal.signal(sig, signal.SIG_IGN) for sig in _FRONT_STOP_SIGNALS}
    try:
        end = _follow(status_r, tracer_pid, until_done=wait_for_tracer)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    try:
        os.write(lifeline_w, _RELEASE)
    except BrokenPipeError:
        pass  # the tracer already finished
    os.close(lifeline_w)
    # A signal still pending here (the terminal's Ctrl-C reached this process
    # too) was meant for the program, which has ended: drop it, do not let it
    # interrupt dcptrace as it exits with the program's status.
    while signal.sigtimedwait(FORWARDED_SIGNALS, 0) is not None:
        pass
    signal.pthread_sigmask(signal.SIG_SETMASK, old_mask)
    return end


def _follow(status_r: int, tracer_pid: int, until_done: bool) -> MainEnd:
    """How the main process ended; with `until_done`, once the outputs are written too."""
    buf = b""
    end: MainEnd | None = None
    forwarder: _Forwarder | None = None
    limit: str | None = None
    with os.fdopen(status_r, "rb", buffering=0) as f:
        while True:
            chunk = f.read(4096)
            if not chunk:
                break
            buf += chunk
            while b"\n" in buf:
                line, buf = buf.split(b"\n", 1)
                kind, _, value = line.decode(errors="replace").partition(" ")
                if kind == "limit":
                    limit = value
                    continue
                n = int(value)
                if kind == "pid":
                    forwarder = _Forwarder(n)
                    forwarder.start()
                elif kind in ("exit", "signal", "dumped"):
                    end = MainEnd(n, None) if kind == "exit" else MainEnd(None, n)
                    end = MainEnd(
                        end.exit_status, end.signal, core_dumped=kind == "dumped", limit=limit
                    )
                    if not until_done:
                        return end
                elif kind == "done" and end is not None:
                    return MainEnd(end.exit_status, end.signal, n != 0, end.core_dumped, limit)
                elif kind == "stop":
                    sent = forwarder is not None and forwarder.stop_sent.is_set()
                    if forwarder is not None:
                        forwarder.stop_sent.clear()
                    mirror_stop(n, always=sent)
    if end is not None:
        # The tracer ended after reporting the main process; when outputs were
        # asked for, ending without `done` means they were not all written.
        return MainEnd(end.exit_status, end.signal, until_done, end.core_dumped, limit)
    # The tracer ended without a word about the main process: it failed (its
    # own error line, if it could write one, is already on stderr).
    _, status = os.waitpid(tracer_pid, 0)
    code = os.waitstatus_to_exitcode(status)
    if code < 0:
        name = signal.Signals(-code).name
        print(f"dcptrace: the tracer was killed by {name}; the program was stopped with it",
              file=sys.stderr)  # fmt: skip
    return MainEnd(code if code > 0 else 125, None)


def mirror_stop(sig: int, always: bool = False) -> None:
    """Stop dcptrace with `sig` when the program's main process stopped on it.

    When dcptrace passed the stop on (`always`: someone ran `kill -TSTP` on
    it), or when it is in its terminal's foreground group: the shell then sees
    the job stopped (with the same signal) and resumes the whole group,
    dcptrace and program, with SIGCONT on `fg`; a SIGCONT to dcptrace alone is
    passed on to the program as well.
    """
    if not always and not _in_foreground():
        return
    previous = signal.signal(sig, signal.SIG_DFL)
    try:
        # Sent to this thread, the stop takes effect before pthread_kill returns.
        signal.pthread_sigmask(signal.SIG_UNBLOCK, [sig])
        signal.pthread_kill(threading.get_ident(), sig)
    finally:
        signal.pthread_sigmask(signal.SIG_BLOCK, [sig])
        signal.signal(sig, previous)


def _in_foreground() -> bool:
    try:
        fd = os.open("/dev/tty", os.O_RDONLY | os.O_NOCTTY)
    except OSError:
        return False
    try:
        return os.tcgetpgrp(fd) == os.getpgrp()
    except OSError:
        return False
    finally:
        os.close(fd)


class _Forwarder(threading.Thread):
    """Passes signals sent to dcptrace on to the program's main process."""

    def __init__(self, pid: int) -> None:
        super().__init__(name="dcptrace-signals", daemon=True)
        self.pid = pid
        # A stop signal passed on: the program's stop it causes stops dcptrace too.
        self.stop_sent = threading.Event()

    def run(self) -> None:
        while True:
            info = signal.sigwaitinfo(FORWARDED_SIGNALS)
            # si_code > 0: raised by the kernel (the terminal's keys and
            # SIGWINCH, which reached the program's group too; the tracer's
            # SIGCHLD); <= 0: sent by a process (kill, sigqueue, tgkill).
            if info.si_code > 0:
                continue
            if info.si_signo in _FRONT_STOP_SIGNALS:
                self.stop_sent.set()
            try:
                os.kill(self.pid, info.si_signo)
            except ProcessLookupError:
                return
