"""dcpfs's attribute cache keeps close-to-open (issue 14, metadata speed).

One real storage server, two real dcpfs mounts of it (two instances' views of
one volume).  A stat may be served from the cache (ATTR_TTL), but an open always
revalidates: a file rewritten and closed through one mount is read whole and new
through the other at its next open, even right after the other cached its old
attributes; a new file is found at once (no negative cache); a stale stat
catches up within the bound.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import REPO, wait_for

pytestmark = pytest.mark.root


@contextlib.contextmanager
def _dcpfs(tmp: Path, name: str, hello: dict[str, str]) -> Iterator[Path]:
    mnt = tmp / f"mnt-{name}"
    config = {
        "name": "cache", "instance": name, "server": hello["address"], "key": "k" * 43,
        "host_key": hello["host_key"], "mountpoint": str(mnt), "volumes": 1,
        "memory_dir": str(tmp / f"mem-{name}"), "disk_dir": str(tmp / f"disk-{name}"),
        "memory_capacity": 1 << 20, "disk_capacity": None, "policy": {},
    }  # fmt: skip
    env = dict(os.environ, PYTHONPATH=str(REPO))
    fs = subprocess.Popen([sys.executable, "-m", "vmagent.storage.dcpfs"], env=env,
                          stdin=subprocess.PIPE, stderr=subprocess.DEVNULL)  # fmt: skip
    assert fs.stdin is not None
    fs.stdin.write(json.dumps(config).encode())
    fs.stdin.close()
    try:
        assert wait_for(lambda: os.path.ismount(mnt) or fs.poll() is not None, 30)
        assert os.path.ismount(mnt), "dcpfs did not mount"
        yield mnt / "v0"
    finally:
        subprocess.run(["fusermount", "-u", "-z", str(mnt)], check=False)
        try:
            fs.wait(15)
        except subprocess.TimeoutExpired:
            fs.kill()
            fs.wait()


@pytest.fixture(scope="module")
def two_mounts(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, Path, Path]]:
    """(mount A's volume, mount B's volume, the volume's real directory)."""
    tmp_path = tmp_path_factory.mktemp("dcpfs-cache")
    if os.geteuid() != 0 or not Path("/dev/fuse").exists():
        pytest.skip("dcpfs needs root and /dev/fuse")
    pytest.importorskip("mfusepy", reason="mfusepy is not installed (pip install '.[storage]')")
    volume = tmp_path / "vol"
    volume.mkdir()
    env = dict(os.environ, PYTHONPATH=str(REPO))
    server = subprocess.Popen([sys.executable, "-m", "oss.storage.server"], env=env,
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE)  # fmt: skip
    assert server.stdin is not None and server.stdout is not None
    config = {"name": "cache", "volumes": [str(volume)], "state_dir": str(tmp_path / "state"),
              "key": "k" * 43, "address": f"unix:{tmp_path}/s.sock"}  # fmt: skip
    server.stdin.write(json.dumps(config).encode() + b"\n")
    server.stdin.flush()
    try:
        hello = json.loads(server.stdout.readline())
        with _dcpfs(tmp_path, "a", hello) as a, _dcpfs(tmp_path, "b", hello) as b:
            yield a, b, volume
    finally:
        server.stdin.close()
        server.wait(15)
        server.stdout.close()


def test_an_open_sees_what_another_mount_closed_though_a_stat_was_cached(
    two_mounts: tuple[Path, Path, Path],
) -> None:
    a, b, volume = two_mounts
    (a / "f").write_bytes(b"old")
    assert (b / "f").read_bytes() == b"old"
    assert os.stat(b / "f").st_size == 3  # B caches f's attributes now
    new = bytes(range(256)) * 64  # larger: a stale size would cut the read short
    (a / "f").write_bytes(new)  # closed through A: published
    assert (b / "f").read_bytes() == new  # B's next open revalidates
    with open(b / "f", "rb") as f:
        assert os.fstat(f.fileno()).st_size == len(new)  # the open's attributes
    # A name created through A is found through B at once (no negative cache).
    assert not (b / "g").exists()
    (a / "g").write_text("made on A\n")
    assert (b / "g").read_text() == "made on A\n"
    # A stat through B catches up within the cache's bound.
    (a / "g").write_text("longer, made on A again\n")
    assert wait_for(lambda: os.stat(b / "g").st_size == 24, 10)
    # A change through B itself is seen by B's stat at once (its cache dropped it).
    (b / "g").write_text("x")
    assert os.stat(b / "g").st_size == 1
    assert (volume / "g").read_text() == "x"


def test_ls_l_and_deep_stats_use_one_listing(two_mounts: tuple[Path, Path, Path]) -> None:
    a, b, volume = two_mounts
    (volume / "d" / "e").mkdir(parents=True)
    for i in range(20):
        (volume / "d" / f"f{i}").write_text(str(i))
    names = sorted(os.listdir(b / "d"))
    assert names == sorted(["e", *(f"f{i}" for i in range(20))])
    sizes = {n: os.lstat(b / "d" / n).st_size for n in names if n != "e"}
    assert sizes == {f"f{i}": len(str(i)) for i in range(20)}
    assert os.path.isdir(b / "d" / "e")
