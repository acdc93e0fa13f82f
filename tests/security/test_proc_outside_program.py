"""A placed program reads /proc of a home process outside the program.

On an instance, /proc/N of a program pid the instance does not hold is read at
home by the session's deputy (`vmagent.exec.deputy.proc_view`).  The attack: a
process placed on an instance names the pid of a home process that is not the
program's (started beside the run, with a marker in its argv) in /proc paths
and `ps -p`, directly and from processes placed from that instance (whose
deputies run on an instance too).  `nobody` reads that process's /proc at
home natively (`as_nobody`); under dcptrace the program's one machine has no
such process, and nothing of it may be read (by a root program here: the
check is the program's, not the user's; a non-root program placed from an
instance cannot place further yet).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from attack import as_nobody, require_attacker

from tests.conftest import dcptrace_argv, traced_env

pytestmark = [
    pytest.mark.security,
    pytest.mark.netns,
    pytest.mark.skipif(os.geteuid() != 0, reason="namespaced instances need root"),
]

MARKER = "victim-outside-the-program"
PROGRAM = r"""
sh -c '
cat /proc/$1/cmdline /proc/$1/status /proc/$1/comm
test -d /proc/$1 && echo "a directory"
read line < /proc/$1/cmdline && echo "builtin read: $line"
ps -o pid=,args= -p $1; echo "ps: $?"
' _ "$1"
"""
VICTIM = "import time; time.sleep(300)"
READ = "import sys; print(open(f'/proc/{sys.argv[1]}/cmdline').read())"


def test_a_placed_program_cannot_read_proc_outside_it(tmp_path: Path) -> None:
    require_attacker()
    victim = subprocess.Popen([sys.executable, "-c", VICTIM, MARKER])
    try:
        argv = [*dcptrace_argv("--no-state", "--instances", "3", "--placement", "spread"),
                "--", "sh", "-c", PROGRAM, "sh", str(victim.pid)]  # fmt: skip
        res = subprocess.run(argv, cwd="/", env=traced_env(), capture_output=True,
                             timeout=120)  # fmt: skip
        # Natively, nobody reads it: the refusal is dcptrace's.
        native = as_nobody(READ, str(victim.pid))
    finally:
        victim.kill()
        victim.wait()
    assert MARKER in native.stdout, native
    out = res.stdout.decode(errors="replace")
    assert MARKER not in out, out
    assert "a directory" not in out and "builtin read" not in out, out
    assert out.endswith("ps: 1\n"), (out, res.stderr)
