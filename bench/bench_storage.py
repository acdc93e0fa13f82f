"""Storage tiers (issue 14): throughput, open latency and moves, from a process on an instance.

Usage: python bench/bench_storage.py [--mb N] [--quick]   (root: local instances)

For each tier (memory, disk, net: `[storage] prefer = ...`) a process placed on
a local instance (`dcptrace --instances 1 --volume DIR`, the python process
exec'd by `sh` is placed) writes and reads a file sequentially (1 MiB blocks),
then does 4 KiB random reads and writes, then opens and closes a small file
many times, and stats it and a directory three levels down as often.  The
reference is the same script run natively on the instance's local disk
(this machine's /var/tmp: local instances share its disk).  Then: the tracer's
cost per intercepted open (`dcptrace --map`, no instances, vs
native), and the time to move a 100 MB file from the networked volume into
memory and onto disk (the open that promotes it, less a plain open).
Page caches are not dropped: every column reads what it just wrote, as the
program would.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
DATA = Path("/nonexistent")  # set by main() under its work directory
PLACED = 'python3 -c "$0" "$@"'  # sh runs home; the python it execs is placed

IO = r"""
import json, os, random, sys, time
mb, opens = int(sys.argv[1]), int(sys.argv[2])
out = {}
block = os.urandom(1 << 20)
t = time.perf_counter()
with open("seq.bin", "wb") as f:
    for _ in range(mb):
        f.write(block)
    f.flush()
    os.fsync(f.fileno())
out["seq_write_MBps"] = mb / (time.perf_counter() - t)
for _ in range(3):  # reads that let the policy promote it (memory / disk runs)
    open("seq.bin", "rb").close()
t = time.perf_counter()
with open("seq.bin", "rb") as f:
    while f.read(1 << 20):
        pass
out["seq_read_MBps"] = mb / (time.perf_counter() - t)
rnd = random.Random(1)
size = mb << 20
fd = os.open("seq.bin", os.O_RDONLY)
t = time.perf_counter()
for _ in range(2000):
    os.pread(fd, 4096, rnd.randrange(0, size - 4096) & ~4095)
out["rand_read_4k_iops"] = 2000 / (time.perf_counter() - t)
os.close(fd)
fd = os.open("seq.bin", os.O_WRONLY)
t = time.perf_counter()
for _ in range(2000):
    os.pwrite(fd, block[:4096], rnd.randrange(0, size - 4096) & ~4095)
os.close(fd)
out["rand_write_4k_iops_incl_close"] = 2000 / (time.perf_counter() - t)
with open("small.txt", "w") as f:
    f.write("x" * 100)
t = time.perf_counter()
for _ in range(opens):
    os.close(os.open("small.txt", os.O_RDONLY))
out["open_close_us"] = (time.perf_counter() - t) / opens * 1e6
os.makedirs("a/b/c", exist_ok=True)
for name, path in (("stat_us", "small.txt"), ("stat_depth4_us", "a/b/c")):
    t = time.perf_counter()
    for _ in range(opens):
        os.stat(path)
    out[name] = (time.perf_counter() - t) / opens * 1e6
os.unlink("seq.bin")
print(json.dumps(out))
"""

MOVE = r"""
import json, os, sys, time
with open("big.bin", "wb") as f:  # streams to the networked volume (stream_mb = 1)
    for _ in range(100):
        f.write(os.urandom(1 << 20))
times = []
for _ in range(3):
    t = time.perf_counter()
    os.close(os.open("big.bin", os.O_RDONLY))
    times.append(time.perf_counter() - t)
print(json.dumps({"opens_s": times}))
"""

OPENS = r"""
import os, sys, time
path, n = sys.argv[1], int(sys.argv[2])
t = time.perf_counter()
for _ in range(n):
    os.close(os.open(path, os.O_RDONLY))
print((time.perf_counter() - t) / n * 1e6)
"""


def env() -> dict[str, str]:
    e = dict(os.environ)
    e["PYTHONPATH"] = str(REPO) + os.pathsep + e.get("PYTHONPATH", "")
    e.setdefault("DCP_DATA", str(DATA))  # the runs' storage state, removed at the end
    return e


def placed(script: str, args: list[str], cwd: Path, table: str) -> dict[str, object]:
    """Run `script` on one local instance with `cwd` as a volume; its JSON line."""
    config = cwd.parent / f"{cwd.name}.toml"
    config.write_text(f"[storage]\n{table}\n")
    dcp = [sys.executable, "-m", "tracer.cli", "--no-state", "--instances", "1",
           "--placement", "spread", "--volume", "."]  # fmt: skip
    argv = [*dcp, "--config", str(config), "--", "sh", "-c", PLACED, script, *args]
    res = subprocess.run(argv, cwd=cwd, env=env(), capture_output=True, text=True, timeout=900)
    if res.returncode != 0:
        raise SystemExit(f"bench_storage: placed run failed: {res.stderr.strip()[-500:]}")
    return dict(json.loads(res.stdout.strip().splitlines()[-1]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mb", type=int, default=64, help="size of the sequential file (MiB)")
    parser.add_argument("--opens", type=int, default=500)
    parser.add_argument("--quick", action="store_true", help="16 MiB, 100 opens, no 100 MB move")
    args = parser.parse_args()
    if args.quick:
        args.mb, args.opens = 16, 100
    if os.geteuid() != 0:
        raise SystemExit("bench_storage: needs root (local instances, FUSE)")
    print(f"# 2 CPUs, python {sys.version.split()[0]}, load average {os.getloadavg()[0]:.2f}")
    work = Path(tempfile.mkdtemp(prefix="dcp-bench-storage-", dir="/var/tmp"))
    global DATA
    DATA = work / "data"
    rows: dict[str, dict[str, object]] = {}
    try:
        native = work / "native"
        native.mkdir()
        res = subprocess.run([sys.executable, "-c", IO, str(args.mb), str(args.opens)],
                             cwd=native, capture_output=True, text=True, check=True)  # fmt: skip
        rows["local disk, no DCP"] = json.loads(res.stdout)
        for tier in ("memory", "disk", "net"):
            d = work / tier
            d.mkdir()
            table = f'prefer = "{tier}"\nmemory_mb = {max(256, 2 * args.mb)}\nstream_mb = 1'
            rows[f"tier {tier}"] = placed(IO, [str(args.mb), str(args.opens)], d, table)
        keys = list(rows["local disk, no DCP"])
        print(f"{'':22}" + "".join(f"{k:>32}" for k in keys))
        for name, row in rows.items():
            print(f"{name:22}" + "".join(f"{float(row[k]):>32.1f}" for k in keys))  # type: ignore[arg-type]

        (work / "o").mkdir()
        small = work / "o" / "f"
        small.write_text("x")
        n = str(args.opens * 10)
        plain = subprocess.run([sys.executable, "-c", OPENS, str(small), n],
                               capture_output=True, text=True, check=True)  # fmt: skip
        mapped = subprocess.run(
            [sys.executable, "-m", "tracer.cli", "--no-state", "--map",
             f"/dcpbench={work / 'o'}", "--", sys.executable, "-c", OPENS, "/dcpbench/f", n],
            capture_output=True, text=True, check=True, env=env(),
        )  # fmt: skip
        native_us, traced_us = float(plain.stdout), float(mapped.stdout.split()[-1])
        print(f"open+close: native {native_us:.1f} us, under --map {traced_us:.1f} us: "
              f"tracer cost per intercepted open {traced_us - native_us:.1f} us")  # fmt: skip

        if not args.quick:
            for target, table in (
                ("memory", "largest_in_memory_mb = 200\nmemory_mb = 256"),
                ("disk", "largest_in_memory_mb = 10"),
            ):
                d = work / f"move-{target}"
                d.mkdir()
                full = f"stream_mb = 1\npromote_after_reads = 3\n{table}"
                opens = placed(MOVE, [], d, full)["opens_s"]
                assert isinstance(opens, list)
                move = opens[2] - opens[0]
                each = ", ".join(f"{o:.3f}" for o in opens)
                print(f"move 100 MB net -> {target}: {move:.2f} s "
                      f"({100 / move:.0f} MB/s; opens {each} s)")  # fmt: skip
        print(f"# load average at the end {os.getloadavg()[0]:.2f}")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
