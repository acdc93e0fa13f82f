"""Ctrl-C and Ctrl-Z on a real terminal behave as without tracing."""

from __future__ import annotations

import fcntl
import os
import pty
import select
import signal
import subprocess
import termios
import time
from pathlib import Path

import pytest

from tests.conftest import dcptrace_argv, traced_env

pytestmark = pytest.mark.usefixtures("has_ptrace")


def state(pid: int) -> str:
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]


def on_terminal(argv: list[str]) -> tuple[subprocess.Popen[bytes], int]:
    """Start dcptrace as the session leader of a new pty (its controlling terminal)."""
    master, slave = pty.openpty()

    def make_controlling() -> None:
        fcntl.ioctl(0, termios.TIOCSCTTY, 0)

    proc = subprocess.Popen(
        [*dcptrace_argv(), "--", *argv], env=traced_env(), stdin=slave, stdout=slave,
        stderr=slave, start_new_session=True, preexec_fn=make_controlling,
    )  # fmt: skip
    os.close(slave)
    return proc, master


def read_until(master: int, needle: bytes, seconds: float = 15.0) -> bytes:
    """Read the terminal until `needle` appears (bounded by `seconds`)."""
    out = b""
    deadline = time.monotonic() + seconds
    while needle not in out and time.monotonic() < deadline:
        ready, _, _ = select.select([master], [], [], 0.2)
        if ready:
            try:
                out += os.read(master, 4096)
            except OSError:
                break
    assert needle in out, out
    return out


def read_all(master: int) -> bytes:
    out = b""
    while True:
        try:
            chunk = os.read(master, 4096)
        except OSError:
            return out
        if not chunk:
            return out
        out += chunk


def test_ctrl_c_interrupts_the_program_and_dcptrace_reports_it() -> None:
    proc, master = on_terminal(["sh", "-c", "echo ready; sleep 30; echo not-reached"])
    try:
        read_until(master, b"ready")
        time.sleep(0.3)
        os.write(master, b"\x03")  # the terminal sends SIGINT to the foreground group
        assert proc.wait(timeout=15) == -signal.SIGINT
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        out = read_all(master)
        os.close(master)
    assert b"not-reached" not in out


def job_control_session(command: str) -> bytes:
    """Run `command` under bash with job control on a new pty: Ctrl-Z after 'ready'."""
    script = f"set -m; {command}; echo stopped=$?; fg >/dev/null; echo after=$?"
    master, slave = pty.openpty()

    def make_controlling() -> None:
        fcntl.ioctl(0, termios.TIOCSCTTY, 0)

    proc = subprocess.Popen(
        ["bash", "--norc", "--noprofile", "-c", script], env=traced_env(), stdin=slave,
        stdout=slave, stderr=slave, start_new_session=True, preexec_fn=make_controlling,
    )  # fmt: skip
    os.close(slave)
    out = b""
    try:
        out = read_until(master, b"ready")
        time.sleep(0.3)
        os.write(master, b"\x1a")  # Ctrl-Z: SIGTSTP to the foreground job
        assert proc.wait(timeout=20) == 0
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        out += read_all(master)
        os.close(master)
    return out.replace(b"\r\n", b"\n")


def test_ctrl_z_stops_the_job_and_fg_resumes_it_as_natively() -> None:
    program = "sh -c 'echo ready; sleep 1; echo resumed'"
    native = job_control_session(program)
    traced = job_control_session(f"{' '.join(dcptrace_argv())} -- {program}")
    for out in (native, traced):
        lines = [line.strip() for line in out.splitlines()]
        # The shell saw the job stop on SIGTSTP; it ran on only after fg.
        assert lines.index(b"stopped=148") < lines.index(b"resumed") < lines.index(b"after=0"), out
