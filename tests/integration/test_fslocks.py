"""Issue 14: flock and fcntl locks on files each instance opens itself hold across instances.

Four processes on three local instances (`--placement spread`) each open
`counter` in the `--volume .` namespace themselves (no inherited descriptor:
each instance has its own dcpfs mount, so its kernel alone cannot exclude the
others) and do a locked read-increment-write.  The locks are served by the
run's storage server (docs/LOCKS.md); without it the counter ends below 4.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from tests.conftest import dcptrace_argv, traced_env

pytestmark = [pytest.mark.usefixtures("has_ptrace"), pytest.mark.netns]

# dcptrace runs per lock kind (each about 10 s on an idle machine); the issue's
# "20 of 20": DCP_LOCK_ROUNDS=20 python -m pytest tests/integration/test_fslocks.py
ROUNDS = int(os.environ.get("DCP_LOCK_ROUNDS", "2"))

WORKER = """
import fcntl, os, sys, time
mode = sys.argv[1]
fd = os.open("counter", os.O_RDWR)
if mode == "flock":
    fcntl.flock(fd, fcntl.LOCK_EX)
else:
    fcntl.lockf(fd, fcntl.LOCK_EX)          # F_SETLKW on the whole file
n = int(os.pread(fd, 32, 0) or b"0")
time.sleep(0.5)                             # the others are waiting for the lock now
os.ftruncate(fd, 0)
os.pwrite(fd, str(n + 1).encode(), 0)
os.fsync(fd)
os.close(fd)                                # releases either kind of lock
"""


def _require_root() -> None:
    if os.geteuid() != 0:
        pytest.skip("local instances with storage need root (mount namespaces, FUSE, tmpfs)")
    if not Path("/dev/fuse").exists():
        pytest.skip("no /dev/fuse: dcpfs cannot mount")
    try:
        import mfusepy  # noqa: F401
    except ImportError:
        pytest.skip("mfusepy is not installed (pip install '.[storage]')")


@pytest.mark.parametrize("mode", ["flock", "fcntl"])
@pytest.mark.parametrize("round_", range(ROUNDS))
def test_a_four_way_counter_on_three_instances_ends_at_four(
    tmp_path: Path, mode: str, round_: int
) -> None:
    _require_root()
    (tmp_path / "counter").write_text("0")
    (tmp_path / "worker.py").write_text(WORKER)
    script = "for i in 1 2 3 4; do python3 worker.py $0 & done; wait"
    # Copies on the disk tier: each writer's copy is its own (two on one instance).
    config = tmp_path.parent / f"{tmp_path.name}.toml"
    config.write_text('[storage]\nprefer = "disk"\n')
    argv = [*dcptrace_argv("--instances", "3", "--placement", "spread", "--volume", ".",
                           "--config", str(config)),
            "--", "sh", "-c", script, mode]  # fmt: skip
    done = subprocess.run(argv, cwd=tmp_path, env=traced_env(), capture_output=True,
                          stdin=subprocess.DEVNULL, timeout=180)  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "counter").read_text() == "4", done.stderr


HOLDER = """
import fcntl, os, time
fd = os.open("data", os.O_RDWR)
fcntl.lockf(fd, fcntl.LOCK_EX, 10, 0)       # bytes 0-9
with open("held.tmp", "w") as f:            # its pid, as the program sees it
    f.write(str(os.getpid()))
os.rename("held.tmp", "held")
while not os.path.exists("done"):
    time.sleep(0.05)
"""
ASKER = """
import fcntl, os, signal, struct, time
while not os.path.exists("held"):
    time.sleep(0.05)
fd = os.open("data", os.O_RDWR)
want = struct.pack("hhqqi", fcntl.F_WRLCK, os.SEEK_SET, 5, 1, 0)
got = struct.unpack("hhqqi", fcntl.fcntl(fd, fcntl.F_GETLK, want))
print("getlk", {fcntl.F_WRLCK: "write", fcntl.F_UNLCK: "none"}.get(got[0]), got[2], got[3])
holder = int(open("held").read())
print("getlk names the holder", got[4] == holder or (got[4], holder))
print("getlk free", struct.unpack("hhqqi", fcntl.fcntl(
    fd, fcntl.F_GETLK, struct.pack("hhqqi", fcntl.F_WRLCK, os.SEEK_SET, 10, 5, 0)))[0]
    == fcntl.F_UNLCK)
try:
    fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB, 1, 5)
except OSError as exc:
    print("setlk", exc.errno in (11, 13))
class Alarm(Exception):
    pass
def ring(*_):
    raise Alarm
signal.signal(signal.SIGALRM, ring)
signal.setitimer(signal.ITIMER_REAL, 1.0)
try:
    fcntl.lockf(fd, fcntl.LOCK_EX, 1, 5)     # F_SETLKW: waits, then the signal ends it
    print("setlkw granted")
except Alarm:
    print("setlkw interrupted")
open("done", "w").close()
fcntl.lockf(fd, fcntl.LOCK_EX, 1, 5)         # granted once the holder exits
print("setlkw granted after the holder")
"""


def test_getlk_setlk_and_an_interrupted_wait_across_instances(tmp_path: Path) -> None:
    _require_root()
    (tmp_path / "data").write_text("x" * 20)
    (tmp_path / "holder.py").write_text(HOLDER)
    (tmp_path / "asker.py").write_text(ASKER)
    config = tmp_path.parent / f"{tmp_path.name}.toml"
    config.write_text('[storage]\nprefer = "disk"\n')
    argv = [*dcptrace_argv("--instances", "2", "--placement", "spread", "--volume", ".",
                           "--config", str(config)),
            "--", "sh", "-c", "python3 holder.py & python3 asker.py; wait"]  # fmt: skip
    done = subprocess.run(argv, cwd=tmp_path, env=traced_env(), capture_output=True,
                          stdin=subprocess.DEVNULL, timeout=120)  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert done.stdout.decode().splitlines() == [
        "getlk write 0 10",
        "getlk names the holder True",  # the holder's program pid, from another instance
        "getlk free True",
        "setlk True",
        "setlkw interrupted",
        "setlkw granted after the holder",
    ], done.stderr
