"""Attack: reach a program's loopback-only service through its program address.

A program run by root with `dcptrace --instances 2 --placement spread` starts a
server bound to 127.0.0.1 on one instance (a local-only service: an admin
port, a database); its own processes on the other instance reach it at
`localhost` (the redirect, issue 13).  The attacker, uid nobody on the same
host, knows the program address and the port and connects to it, and to the
instance's own address: both must fail.  Before issue 13 there was no
program address; this was checked against a planner that steered every
listener from the host (the naive redirect): the attacker then got in.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest
from attack import as_nobody

from tests.conftest import dcptrace_argv, traced_env, wait_for

pytestmark = [pytest.mark.security, pytest.mark.root, pytest.mark.netns]

PORT = 8765

WAIT = r"""
import os, socket, sys, time
port, flag = int(sys.argv[1]), sys.argv[2]
while True:
    try:
        c = socket.create_connection(("127.0.0.1", port), timeout=1)
        c.sendall(b"GET / HTTP/1.0\r\n\r\n")
        ok = c.recv(12)
        c.close()
        if ok.startswith(b"HTTP/1.0 200"):
            break
    except OSError:
        pass
    time.sleep(0.1)
open(flag, "w").close()
while not os.path.exists(flag + ".go"):
    time.sleep(0.05)
"""

PROGRAM = r"""
cd "$1"
python3 -m http.server PORT --bind 127.0.0.1 > server.log 2>&1 &
S=$!
hostname -I > addresses
python3 wait.py PORT reached
kill $S
wait $S
exit 0
"""

ATTACK = r"""
import socket, sys
for host in sys.argv[2:]:
    try:
        c = socket.create_connection((host, int(sys.argv[1])), timeout=3)
        c.sendall(b"GET / HTTP/1.0\r\n\r\n")
        print(host, "IN", c.recv(12))
    except OSError as exc:
        print(host, "refused", exc.errno)
"""


def test_nobody_cannot_reach_a_loopback_service_at_the_program_address(tmp_path: Path) -> None:
    if os.geteuid() != 0:
        pytest.skip("local instances in namespaces need root")
    d = tmp_path
    d.chmod(0o755)
    (d / "wait.py").write_text(WAIT)
    (d / "prog.sh").write_text(PROGRAM.replace("PORT", str(PORT)))
    p = subprocess.Popen(
        [*dcptrace_argv("--instances", "2", "--placement", "spread"),
         "--", "sh", str(d / "prog.sh"), str(d)],
        env=traced_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        stdin=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        assert wait_for(lambda: (d / "reached").exists() or p.poll() is not None, 120)
        assert (d / "reached").exists(), p.communicate(timeout=30)
        words = (d / "addresses").read_text().split()
        program = next(w for w in words if w.startswith("10.214."))
        instance = next(w for w in words if w.startswith("10.213."))
        got = as_nobody(ATTACK, str(PORT), program, instance)
        (d / "reached.go").touch()
        _out, err = p.communicate(timeout=120)
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
    assert p.returncode == 0, err.decode()
    lines = got.stdout.splitlines()
    assert len(lines) == 2 and all(" refused " in line for line in lines), got
    assert shutil.which("setpriv")
