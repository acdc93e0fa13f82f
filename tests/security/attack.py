"""The attacker: an unprivileged local user (`nobody`) replaying an attack.

Every test in tests/security runs its attack as a separate process that has
dropped to uid/gid 65534 with no supplementary groups (`setpriv`), against real
components (an agent, a `dcp-oss serve`, a `dcptrace --instances` run) started
by the test as root.  The attacker runs Debian's own `/usr/bin/python3 -I` with
a self-contained, standard-library-only script: it cannot read this checkout
(CI may clone it under a private directory) and brings nothing of DCP's.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
# The OSS fixtures live beside the integration tests; share them.
sys.path.insert(0, str(HERE.parent / "integration"))

NOBODY_UID = 65534
NOBODY_GID = 65534
ATTACKER_PYTHON = "/usr/bin/python3"


def require_attacker() -> None:
    """Skip, saying why, where no unprivileged attacker can be started."""
    if os.geteuid() != 0:
        pytest.skip("security tests start components as root and attack them as nobody")
    if shutil.which("setpriv") is None:
        pytest.skip("setpriv (util-linux) is not installed")
    if not os.access(ATTACKER_PYTHON, os.X_OK):
        pytest.skip(f"{ATTACKER_PYTHON} is not installed (the attacker's interpreter)")


def as_nobody(
    script: str,
    *args: str,
    timeout: float = 60,
    env: dict[str, str] | None = None,
    cwd: str = "/",
) -> subprocess.CompletedProcess[str]:
    """Run a stdlib-only Python `script` as uid/gid nobody; return its result."""
    require_attacker()
    argv = [
        "setpriv",
        f"--reuid={NOBODY_UID}",
        f"--regid={NOBODY_GID}",
        "--clear-groups",
        "--",
        ATTACKER_PYTHON,
        "-I",
        "-c",
        script,
        *args,
    ]
    return subprocess.run(
        argv,
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=cwd,
        env=env if env is not None else {"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8"},
    )
