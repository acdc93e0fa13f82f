"""Issue 11 items 7-8: one hostname and one PID space per program, wherever it runs.

Each case is differential: the same script natively, under plain `dcptrace`
and under `dcptrace --instances 3 --placement spread`, asserting the native
behaviour.  Namespaced instances (root) are where the difference would show:
each has its own UTS and PID namespace, so a placed process would otherwise
see `node1` and pid 2.
"""

from __future__ import annotations

import os
import socket
import subprocess
from pathlib import Path

import pytest

from tests.conftest import WHERE_SH, dcptrace_argv, traced_env

pytestmark = [
    pytest.mark.root,
    pytest.mark.netns,
    pytest.mark.skipif(os.geteuid() != 0, reason="namespaced instances (own UTS/PID) need root"),
]

MODES = {
    "native": [],
    "plain": dcptrace_argv("--no-state"),
    "spread": dcptrace_argv("--no-state", "--instances", "3", "--placement", "spread"),
}


def run_all(script: str, cwd: Path | None = None) -> dict[str, subprocess.CompletedProcess]:
    """`sh -c script` natively, under dcptrace and on three instances."""
    out = {}
    for mode, prefix in MODES.items():
        argv = [*prefix, "--", "sh", "-c", script] if prefix else ["sh", "-c", script]
        out[mode] = subprocess.run(
            argv, capture_output=True, env=traced_env(), cwd=cwd, timeout=120
        )
        assert out[mode].returncode == 0, (mode, out[mode].stderr)
    return out


HOSTNAMES = (
    # Each line is a placed exec (or a placed shell's builtin read).
    "hostname; uname -n; hostname; "
    "sh -c 'read h < /proc/sys/kernel/hostname; echo $h'; "
    "python3 -c 'import socket, os; print(socket.gethostname(), os.uname().nodename)'; "
    "sh -c \"" + WHERE_SH.replace('"', '\\"').replace("$", "\\$") + "\""
)


def test_the_program_sees_its_home_hostname_on_every_instance() -> None:
    home = socket.gethostname()
    runs = run_all(HOSTNAMES)
    want = f"{home}\n{home}\n{home}\n{home}\n{home} {home}\n"
    for mode, res in runs.items():
        lines = res.stdout.decode()
        assert lines.startswith(want), (mode, lines)
    # ...and the execs did run on the instances: the last line is where.
    assert runs["spread"].stdout.decode().splitlines()[-1].startswith("node"), runs["spread"]
