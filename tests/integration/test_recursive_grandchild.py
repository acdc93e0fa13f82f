"""Placed processes' own children: Ctrl-C reaches them, as a tty reaches make's compilers.

A signal the home deputy gets from its terminal (the foreground group's SIGINT)
goes to the placed program's whole process group on its instance, so the
processes it started there get it too, as they would natively.  `kill PID` of
the deputy stays a signal to the placed process alone.
"""

from __future__ import annotations

import fcntl
import json
import os
import pty
import shutil
import signal
import socket
import subprocess
import tempfile
import termios
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from test_dcptrace_oss import Lab, dcptrace, newest_program, start_lab
from test_terminal import read_all, read_until

from tests.conftest import dcptrace_argv, traced, traced_env

pytestmark = pytest.mark.usefixtures("has_ptrace")

# Placed again from the placed sh's instance; it forks a child that stays with it
# (no exec): only a group signal on its instance reaches that child.
GRANDCHILD = (
    "import os, signal, sys, time\n"
    "def on_int(who):\n"
    "    def handler(*_):\n"
    "        print(who + '-int', flush=True)\n"
    "        sys.exit(3)\n"
    "    return handler\n"
    "child = os.fork()\n"
    "signal.signal(signal.SIGINT, on_int('grandchild' if child else 'forked'))\n"
    "if child:\n"
    "    print('ready', flush=True)\n"
    "    try:\n"
    "        time.sleep(60)\n"
    "    finally:\n"
    "        os.waitpid(child, 0)\n"
    "else:\n"
    "    time.sleep(60)\n"
    "print('grandchild-slept', flush=True)\n"
)


def test_ctrl_c_reaches_a_placed_process_s_child() -> None:
    master, slave = pty.openpty()

    def make_controlling() -> None:
        fcntl.ioctl(0, termios.TIOCSCTTY, 0)

    # The root sh stays home; the inner sh is placed on node0, its python child runs there.
    inner = 'python3 -c "$P"; echo inner-after'
    proc = subprocess.Popen(
        [*dcptrace_argv("--instances", "1", "--placement", "spread"),
         "--", "sh", "-c", f"/bin/sh -c '{inner}'"],
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
    assert b"grandchild-int" in out and b"forked-int" in out, out
    assert b"grandchild-slept" not in out and b"inner-after" not in out, out


def test_a_placed_shell_s_execs_are_placed_again() -> None:
    """sh placed on node0 runs its commands on the other instances, stdio and status intact."""
    rec_dir = tempfile.mkdtemp(prefix="dcp-grandchild-")
    rec = Path(rec_dir) / "r.json"
    inner = (
        "hostname; hostname; "
        "printf 'x\\ny\\n' | sort -r; "
        "sh -c 'exit 7'; echo status=\\$?; "
        "/bin/sh -c 'hostname >&2'"
    )
    try:
        res = traced(
            ["sh", "-c", f'/bin/sh -c "{inner}"'],
            "--no-state", "--instances", "3", "--placement", "spread", "--record", str(rec),
            timeout=120,
        )  # fmt: skip
        assert res.returncode == 0, res.stderr
        record = json.loads(rec.read_text())
        procs = record["processes"]
    finally:
        shutil.rmtree(rec_dir, ignore_errors=True)
    (placed_sh,) = [p for p in procs if p["argv"][:1] == ["/bin/sh"]]
    where = placed_sh["instance"]
    assert where.startswith("node"), procs
    home = socket.gethostname()  # what every process sees (issue 11)
    lines = res.stdout.decode().splitlines()
    assert lines == [home, home, "y", "x", "status=7"], lines
    # Placed from `where`: elsewhere, round the other instances (spread); the
    # grandchild's grandchild is placed from the second level too.
    hosts = [
        p["instance"]
        for p in record["placed_processes"]
        if p["argv"] == ["hostname"] and p["parent"] is not None  # where it was placed
    ]
    assert len(hosts) == 3 and set(hosts) - {where} == {"node0", "node1", "node2"} - {where}, (
        where,
        hosts,
    )
    # ...its stderr intact.
    assert res.stderr.decode().strip().splitlines()[-1] == home, res.stderr


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Lab]:
    """Two loopback agents registered with a loopback dcp-oss serve (over HTTP)."""
    lab = Lab(tmp_path_factory.mktemp("oss"))
    try:
        start_lab(lab, "127.0.0.1", {n: ("127.0.0.1:0", "") for n in ("n0", "n1")})
        yield lab
    finally:
        lab.stop()


def test_with_a_running_dcp_oss_an_instance_places_through_it(lab: Lab) -> None:
    """`--oss URL`: a placed sh's children are placed again by its agent over HTTP, logged."""
    # Without the shared cwd: with it, an exec placed from an instance goes only where
    # the storage is mounted, so the first ones run beside their parent while the
    # other instance mounts (test_storage_oss.py covers that).
    res = dcptrace(lab, lab.url, "sh", "-c", "/bin/sh -c './marker.sh; ./marker.sh 4'",
                   token=lab.token, flags=("--no-share-cwd",))  # fmt: skip
    assert res.returncode == 4, res.stderr
    where = res.stdout.decode().split("\n")[:-1]
    # Each marker names the agent that started it: placed again, not the sh's child.
    assert len(where) == 2 and set(where) <= {"on n0", "on n1"}, where
    prog = newest_program(lab)
    text = "\n".join(x["text"] for x in lab.get(f"/v1/programs/{prog['id']}/logs")["lines"])
    # The markers, and their own tr and sed, each placed from an instance.
    placed = [x for x in text.splitlines() if x.startswith("placed: pid")]
    assert len(placed) >= 2 and all(" runs its exec on n" in x for x in placed), text
    rows = lab.get("/v1/instances", lab.admin)
    assert {r["name"]: r["used_slots"] for r in rows} == {"n0": 0, "n1": 0}  # all released
