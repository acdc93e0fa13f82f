"""Attack: a local user reads the OSS's SQLite file (token hashes, exec keys) from its data dir.

Before: `oss.sqlite3` 0644 in a 0755 directory; `nobody` read an instance's exec
key and minted tickets with it.  After: the directory is 0700 and every file
0600; `dcp-oss` refuses to start on a directory (or database) others could read
or another user owns, with one line.
"""

from __future__ import annotations

import os
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
from attack import NOBODY_GID, NOBODY_UID, as_nobody
from ossproc import OssProcess, oss_argv, oss_env

pytestmark = pytest.mark.security

READ_EVERYTHING = r"""
import os, sys
data = sys.argv[1]
got = []
try:
    got.append("listed " + ",".join(sorted(os.listdir(data))))
except OSError as e:
    got.append(f"list refused {e.errno}")
for name in ("oss.sqlite3", "oss.sqlite3-wal", "oss.sqlite3-shm"):
    try:
        with open(os.path.join(data, name), "rb") as f:
            got.append(f"read {name} {len(f.read())}")
    except FileNotFoundError:
        got.append(f"absent {name}")
    except OSError as e:
        got.append(f"refused {name} {e.errno}")
print("\n".join(got))
"""


def test_nobody_cannot_read_the_state_or_any_key(oss: OssProcess) -> None:
    oss.cli("instance-token", "vm1")  # an instance credential and key material in the DB
    tenant = oss.account("victim")
    assert oss.http("POST", "/v1/programs", tenant, {"argv": ["true"]}).status == 200
    assert stat.S_IMODE(oss.data.stat().st_mode) == 0o700
    files = sorted(oss.data.iterdir())
    assert any(f.name == "oss.sqlite3" for f in files)
    for f in files:
        assert stat.S_IMODE(f.stat().st_mode) & 0o077 == 0, f"{f} is {f.stat().st_mode:o}"
    got = as_nobody(READ_EVERYTHING, str(oss.data))
    assert got.returncode == 0, got.stderr
    assert "read " not in got.stdout and "listed" not in got.stdout, got.stdout
    assert "list refused" in got.stdout


def _serve_once(data: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        oss_argv("serve", "--listen", "127.0.0.1:0", "--data", str(data)),
        env=oss_env(), capture_output=True, text=True, timeout=60,
    )  # fmt: skip


def test_serve_refuses_a_directory_others_can_read(oss: OssProcess) -> None:
    oss.stop()
    oss.data.chmod(0o755)
    r = _serve_once(oss.data)
    assert r.returncode != 0 and "listening" not in r.stdout
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "0755" in lines[0] and "chmod 700" in lines[0], r.stderr
    # A private directory with a database others can read is refused too.
    oss.data.chmod(0o700)
    (oss.data / "oss.sqlite3").chmod(0o644)
    r = _serve_once(oss.data)
    assert r.returncode != 0 and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert "oss.sqlite3" in r.stderr and "chmod 600" in r.stderr
    # And one another user owns (they could swap the database under the OSS).
    (oss.data / "oss.sqlite3").chmod(0o600)
    os.chown(oss.data, NOBODY_UID, NOBODY_GID)
    r = _serve_once(oss.data)
    assert r.returncode != 0 and "owned by uid 65534" in r.stderr, r.stderr
    # The other commands that open the directory refuse it the same way.
    r = subprocess.run(
        oss_argv("instance-token", "--data", str(oss.data), "vm9"),
        env=oss_env(), capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert r.returncode != 0 and "owned by uid 65534" in r.stderr and "Traceback" not in r.stderr


def test_dcptrace_local_state_is_private(oss: OssProcess) -> None:
    state = oss.root / "local-state"
    env = dict(oss_env(), DCP_DATA=str(state))
    r = subprocess.run(
        [sys.executable, "-m", "tracer.cli", "--", "true"], env=env, capture_output=True,
        timeout=60,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    deadline = time.monotonic() + 30  # the recorder finishes after dcptrace returns
    while not (state / "local-account.token").exists() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert (state / "local-account.token").exists()
    assert stat.S_IMODE(state.stat().st_mode) == 0o700
    for f in state.iterdir():
        assert stat.S_IMODE(f.stat().st_mode) & 0o077 == 0, f"{f} is {f.stat().st_mode:o}"
    got = as_nobody(READ_EVERYTHING, str(state))
    assert "read " not in got.stdout and "list refused" in got.stdout, got.stdout
