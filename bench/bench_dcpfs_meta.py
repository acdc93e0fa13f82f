"""dcpfs metadata cost alone (issue 14): stat, lookups, open+close, listdir on one mount.

Usage: unshare -m --propagation private python bench/bench_dcpfs_meta.py [N] [REPO]

Starts a storage server (`oss.storage.run.RunStorage`) over a temporary
directory and mounts dcpfs on it in this mount namespace (run it in a private
one, as above: a mount copied into another namespace would keep dcpfs alive
after the unmount), then times N rounds of each operation through the mount:
no tracer, no instance, only FUSE + SFTP.  REPO (default: this checkout)
selects the code measured, e.g. an export of an older commit, to compare.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path


def main() -> None:
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 200
    repo = sys.argv[2] if len(sys.argv) > 2 else str(Path(__file__).resolve().parent.parent)
    sys.path.insert(0, repo)
    from oss.storage.run import RunStorage, StorageOptions

    if os.geteuid() != 0:
        raise SystemExit("bench_dcpfs_meta: needs root (FUSE mount)")
    work = Path(tempfile.mkdtemp(prefix="dcp-bench-meta-"))
    volume, mnt = work / "vol", work / "mnt"
    (volume / "a" / "b" / "c").mkdir(parents=True)
    (volume / "small.txt").write_text("x" * 100)
    storage = RunStorage(StorageOptions(("/v",)), [str(volume)], work / "storage",
                         f"unix:{work}/s.sock")  # fmt: skip
    spec = storage.spec()
    config = dict(spec, instance="bench", mountpoint=str(mnt), memory_dir=str(work / "mem"),
                  disk_dir=str(work / "disk"))  # fmt: skip
    env = dict(os.environ, PYTHONPATH=repo)
    fs = subprocess.Popen([sys.executable, "-m", "vmagent.storage.dcpfs"], env=env, cwd="/",
                          stdin=subprocess.PIPE, stderr=subprocess.DEVNULL)  # fmt: skip
    assert fs.stdin is not None
    fs.stdin.write(json.dumps(config).encode())
    fs.stdin.close()
    try:
        deadline = time.monotonic() + 60
        while not os.path.ismount(mnt):
            if fs.poll() is not None or time.monotonic() > deadline:
                raise SystemExit("bench_dcpfs_meta: dcpfs did not mount")
            time.sleep(0.05)
        v = mnt / "v0"
        (v / "small.txt").read_bytes()

        def each(fn: Callable[[], object]) -> float:
            start = time.perf_counter()
            for _ in range(n):
                fn()
            return round((time.perf_counter() - start) / n * 1e6, 1)

        def create_write_close() -> None:
            fd = os.open(v / "w.txt", os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
            os.write(fd, b"y")
            os.close(fd)

        out = {
            "stat_us": each(lambda: os.stat(v / "small.txt")),
            "stat_depth4_us": each(lambda: os.stat(v / "a" / "b" / "c")),
            "stat_missing_us": each(lambda: os.path.exists(v / "nope")),
            "open_close_us": each(lambda: os.close(os.open(v / "small.txt", os.O_RDONLY))),
            "open_read_close_us": each(lambda: (v / "small.txt").read_bytes()),
            "create_write_close_us": each(create_write_close),
            "listdir_us": each(lambda: os.listdir(v)),
        }
        print(json.dumps({"load": round(os.getloadavg()[0], 1), **out}))
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)
        try:
            fs.wait(60)
        except subprocess.TimeoutExpired:
            fs.kill()
            fs.wait()
        storage.close()
        subprocess.run(["rm", "-rf", str(work)], check=False)


if __name__ == "__main__":
    main()
