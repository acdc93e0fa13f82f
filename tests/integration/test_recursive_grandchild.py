"""Placed processes' own children: Ctrl-C reaches them, as a tty reaches make's compilers.

A signal the home deputy gets from its terminal (the foreground group's SIGINT)
goes to the placed program's whole process group on its instance, so the
processes it started there get it too, as they would natively.  `kill PID` of
the deputy stays a signal to the placed process alone.
"""

from __future__ import annotations

import fcntl
import os
import pty
import signal
import subprocess
import termios
import time

import pytest
from test_terminal import read_all, read_until

from tests.conftest import dcptrace_argv, traced_env

pytestmark = pytest.mark.usefixtures("has_ptrace")

GRANDCHILD = (
    "import signal, sys, time\n"
    "def on_int(*_):\n"
    "    print('grandchild-int', flush=True)\n"
    "    sys.exit(3)\n"
    "signal.signal(signal.SIGINT, on_int)\n"
    "print('ready', flush=True)\n"
    "time.sleep(60)\n"
    "print('grandchild-slept', flush=True)\n"
)


def test_ctrl_c_reaches_a_placed_process_s_child() -> None:
    master, slave = pty.openpty()

    def make_controlling() -> None:
        fcntl.ioctl(0, termios.TIOCSCTTY, 0)

    # The root sh stays home; the inner sh is placed on node0, its python child runs there.
    inner = 'python3 -c "$P"; echo inner-after'
    proc = subprocess.Popen(
        [*dcptrace_argv("--instances", "1"), "--", "sh", "-c", f"/bin/sh -c '{inner}'"],
        env=traced_env({"P": GRANDCHILD}), stdin=slave, stdout=slave, stderr=slave,
        start_new_session=True, preexec_fn=make_controlling,
    )  # fmt: skip
    os.close(slave)
    try:
        read_until(master, b"ready", 60)
        time.sleep(0.3)
        os.write(master, b"\x03")  # the terminal sends SIGINT to the foreground group
        assert proc.wait(timeout=30) == -signal.SIGINT
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        out = read_all(master)
        os.close(master)
    assert b"grandchild-int" in out, out
    assert b"grandchild-slept" not in out and b"inner-after" not in out, out
