"""dcpfs against a native directory: the same file operations, the same results.

A real storage server (`python -m oss.storage.server`) serves a volume; a real
dcpfs mounts it; one script of file operations runs in a native directory and
in the mount, and what it reports, and the files it leaves (read back from the
volume's real directory), must agree.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import REPO

pytestmark = pytest.mark.root

OPERATIONS = r"""
import json, os, sys
os.chdir(sys.argv[1])
out = {}
f = open("t1", "w"); f.write("one"); os.rename("t1", "r1"); f.write("two"); f.close()
out["renamed while open"] = open("r1").read()
f = open("t2", "w"); f.write("x"); os.unlink("t2"); f.write("y"); f.close()
out["unlinked while open"] = os.path.exists("t2")
os.symlink("/etc/hostname", "ln")
out["symlink"] = os.readlink("ln")
os.mkdir("d"); open("d/x", "w").write("1"); os.rename("d", "e")
out["dir renamed"] = open("e/x").read()
os.utime("r1", ns=(1_000_000_123, 2_000_000_456))
out["mtime_ns"] = os.stat("r1").st_mtime_ns
os.chmod("r1", 0o600)
out["mode"] = oct(os.stat("r1").st_mode)
for c in "ab":
    with open("ap", "a") as f:
        f.write(c)
out["append"] = open("ap").read()
os.truncate("ap", 1)
out["truncate"] = open("ap").read()
with open("rw", "wb") as f:
    f.write(b"0123456789")
with open("rw", "r+b") as f:
    f.seek(3); f.write(b"XY"); f.seek(0); out["r+ read"] = f.read().decode()
os.link("rw", "hl")
out["nlink"] = os.stat("hl").st_nlink
with open("sparse", "wb") as f:
    f.seek(1 << 20); f.write(b"end")
out["sparse size"] = os.path.getsize("sparse")
try:
    os.rmdir("e")
except OSError as exc:
    out["rmdir non-empty"] = exc.errno
try:
    open("missing")
except OSError as exc:
    out["open missing"] = exc.errno
out["listing"] = sorted(os.listdir("."))
print(json.dumps(out, sort_keys=True))
"""


@pytest.fixture
def mounted(tmp_path: Path) -> Iterator[tuple[Path, Path]]:
    """(the mount's volume directory, the volume's real directory)."""
    if os.geteuid() != 0 or not Path("/dev/fuse").exists():
        pytest.skip("dcpfs needs root and /dev/fuse")
    pytest.importorskip("mfusepy", reason="mfusepy is not installed (pip install '.[storage]')")
    volume, mnt = tmp_path / "vol", tmp_path / "mnt"
    volume.mkdir()
    env = dict(os.environ, PYTHONPATH=str(REPO))
    server = subprocess.Popen([sys.executable, "-m", "oss.storage.server"], env=env,
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE)  # fmt: skip
    assert server.stdin is not None and server.stdout is not None
    config = {"name": "sem", "volumes": [str(volume)], "state_dir": str(tmp_path / "state"),
              "key": "k" * 43, "address": f"unix:{tmp_path}/s.sock"}  # fmt: skip
    server.stdin.write(json.dumps(config).encode() + b"\n")
    server.stdin.flush()
    hello = json.loads(server.stdout.readline())
    fs_config = {
        "name": "sem", "instance": "t", "server": hello["address"], "key": "k" * 43,
        "host_key": hello["host_key"], "mountpoint": str(mnt), "volumes": 1,
        "memory_dir": str(tmp_path / "mem"), "disk_dir": str(tmp_path / "disk"),
        "memory_capacity": 1 << 20, "disk_capacity": None, "policy": {},
    }  # fmt: skip
    fs = subprocess.Popen([sys.executable, "-m", "vmagent.storage.dcpfs"], env=env,
                          stdin=subprocess.PIPE, stderr=subprocess.DEVNULL)  # fmt: skip
    assert fs.stdin is not None
    fs.stdin.write(json.dumps(fs_config).encode())
    fs.stdin.close()
    try:
        deadline = time.monotonic() + 30
        while not os.path.ismount(mnt):
            assert fs.poll() is None and time.monotonic() < deadline, "dcpfs did not mount"
            time.sleep(0.05)
        yield mnt / "v0", volume
    finally:
        subprocess.run(["fusermount", "-u", "-z", str(mnt)], check=False)
        for proc in (fs,):
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        server.stdin.close()
        server.wait(15)
        server.stdout.close()


def _files(root: Path) -> dict[str, object]:
    out: dict[str, object] = {}
    for p in sorted(root.rglob("*")):
        rel = str(p.relative_to(root))
        if p.is_symlink():
            out[rel] = ("link", os.readlink(p))
        elif p.is_file():
            out[rel] = (p.read_bytes(), oct(p.stat().st_mode))
    return out


def test_file_operations_through_dcpfs_match_a_native_directory(
    tmp_path: Path, mounted: tuple[Path, Path]
) -> None:
    through, volume = mounted
    native = tmp_path / "native"
    native.mkdir()
    run = [sys.executable, "-c", OPERATIONS]
    expected = subprocess.run([*run, str(native)], capture_output=True, text=True, check=True)
    got = subprocess.run([*run, str(through)], capture_output=True, text=True, timeout=120)
    assert got.returncode == 0, got.stderr
    assert json.loads(got.stdout) == json.loads(expected.stdout)
    assert _files(volume) == _files(native)  # what landed in the real directory
