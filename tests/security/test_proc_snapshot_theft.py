"""Another user reads the /proc snapshots an instance tracer keeps for a program.

On an instance, /proc/N of a program pid held elsewhere is a snapshot of home's
/proc/N (`vmagent.trace.procview`) in a directory of the tracer's.  The attack:
while a root program holds one (its placed shell read a sibling's
/proc/N/comm), `nobody` lists the snapshot directory and opens every name a
snapshot can have.  Each must be refused; the snapshot exists (the test
checks it as root), and is gone with the run.
"""

from __future__ import annotations

import glob
import os
import subprocess
import time
from pathlib import Path

import pytest
from attack import as_nobody, require_attacker

from tests.conftest import dcptrace_argv, traced_env

pytestmark = [
    pytest.mark.security,
    pytest.mark.netns,
    pytest.mark.skipif(os.geteuid() != 0, reason="namespaced instances need root"),
]

# The placed shell reads the sleep's comm (a snapshot, kept while it runs), says
# so, and waits for the attack to end.
PROGRAM = r"""
sleep 120 & p=$!
sh -c 'read name < /proc/$1/comm; echo "$1 $name" > seen.tmp; mv seen.tmp seen
until [ -e done ]; do sleep 0.1; done' _ $p
kill $p
"""
ATTACK = r"""
import os, sys
root, pid = sys.argv[1], sys.argv[2]
got = []
try:
    got.append("listed " + ",".join(os.listdir(root)))
except OSError:
    pass
for seq in range(1, 64):
    for name in ("comm", "cmdline", "status", "stat"):
        try:
            with open(f"{root}/{pid}.{seq}/{name}", "rb") as f:
                got.append(f"read {seq}/{name}: {f.read()!r}")
        except OSError:
            pass
    try:
        got.append(f"listed {seq}: {os.listdir(f'{root}/{pid}.{seq}')}")
    except OSError:
        pass
print("\n".join(got) if got else "nothing read")
"""


def test_nobody_cannot_read_a_program_s_proc_snapshot(tmp_path: Path) -> None:
    require_attacker()
    before = set(glob.glob("/tmp/dcp-proc-*"))
    argv = [*dcptrace_argv("--no-state", "--instances", "3", "--placement", "spread"),
            "--", "sh", "-c", PROGRAM]  # fmt: skip
    run = subprocess.Popen(argv, cwd=tmp_path, env=traced_env(), stdout=subprocess.DEVNULL,
                           stderr=subprocess.PIPE)  # fmt: skip
    try:
        deadline = time.monotonic() + 120
        while not (tmp_path / "seen").exists():
            assert run.poll() is None, run.stderr.read() if run.stderr else b""
            assert time.monotonic() < deadline, "the placed shell never read the sibling's /proc"
            time.sleep(0.1)
        pid, name = (tmp_path / "seen").read_text().split()
        assert name == "sleep"
        roots = set(glob.glob("/tmp/dcp-proc-*")) - before
        snapshots = [r for r in roots if glob.glob(f"{r}/{pid}.*/comm")]
        assert snapshots, f"no snapshot of /proc/{pid} among {roots}"
        for root in snapshots:
            res = as_nobody(ATTACK, root, pid)
            assert res.returncode == 0, res.stderr
            assert res.stdout == "nothing read\n", res.stdout
    finally:
        (tmp_path / "done").touch()
        try:
            run.wait(timeout=120)
        finally:
            if run.poll() is None:
                run.kill()
                run.wait()
    assert not any(os.path.exists(r) for r in snapshots), "snapshots left after the run"
