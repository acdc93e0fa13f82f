"""Benchmark: migration of a running program between two local instances, beside CRIU alone.

    PYTHONPATH=$PWD python bench/bench_migrate.py [--sizes 16,64,256] [--text 64] [--runs 3]

For each size N (MB) of live data held by a Python process:

- CRIU alone: the same program started with `setsid` (stdio /dev/null),
  `criu dump -t PID -D DIR` (the process is killed), then `criu restore -d -D DIR`
  with the same PID; wall time of each command, and the size of the images,
  raw and zstd-compressed (level 1, as the migration sends them);
- DCP: the program started on instance node0 of a `LocalCluster(2)` through a
  real deputy, then moved to node1 with `POST /v1/sessions/{sid}/migrate`:
  total = the wall time of that call (check, freeze, dump, pack, transfer,
  restore, adoption, the source's copy killed, MOVED sent); freeze = from the
  tracer's detach until the target answered that the program runs; the
  agent's own split (dump; pack + transfer + unpack + restore + adopt, which
  overlap: the images are packed while they are sent and unpacked as they come).

Each column is the best of `--runs` runs (a fresh pair of instances per run);
images of both sides live in /dev/shm.  The data is `os.urandom`
(incompressible: zstd's worst case) and, in the `text` row, a 64 MB run of
text lines (compressible).  Target (issue 12): total migration under 3x
CRIU's own dump + restore.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import zstandard

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from vmagent.checkpoint import criu  # noqa: E402
from vmagent.checkpoint.migrate import mint_ticket, scratch  # noqa: E402
from vmagent.cluster.local import Instance, LocalCluster  # noqa: E402
from vmagent.exec.remote import TicketDrop, deputy_command, ticket_for_self  # noqa: E402

HOLD = r"""
import os, sys, time
mb, kind, flag = int(sys.argv[1]), sys.argv[2], sys.argv[3]
if kind == "text":
    data = bytearray(b"".join(b"line %09d of some text\n" % i for i in range((mb << 20) // 32)))
else:
    data = bytearray(os.urandom(mb << 20))
with open(flag + ".tmp", "w") as f:
    f.write(str(os.getpid()))
os.rename(flag + ".tmp", flag)
while not os.path.exists(flag + ".go"):
    time.sleep(0.01)
print(len(data))
"""

DROP = TicketDrop()


def wait_file(path: Path, seconds: float = 300) -> None:
    deadline = time.monotonic() + seconds
    while not path.exists():
        if time.monotonic() > deadline:
            raise SystemExit(f"{path} never appeared")
        time.sleep(0.01)


def zstd_size(directory: str) -> int:
    total = 0
    compressor = zstandard.ZstdCompressor(level=1, threads=-1)
    for name in os.listdir(directory):
        if name.endswith(".img"):
            with open(os.path.join(directory, name), "rb") as f:
                total += len(compressor.compress(f.read()))
    return total


def criu_alone(binary: str, mb: int, kind: str) -> dict[str, float]:
    """CRIU's own dump and restore of the holder (same host, same PID)."""
    work = Path(tempfile.mkdtemp(prefix="bench-criu-", dir=scratch()))  # where DCP's go too
    flag = work / "flag"
    images = work / "img"
    images.mkdir()
    null = os.open(os.devnull, os.O_RDWR)
    proc = subprocess.Popen(
        ["setsid", sys.executable, "-c", HOLD, str(mb), kind, str(flag)],
        stdin=null,
        stdout=null,
        stderr=null,
    )
    os.close(null)
    try:
        wait_file(flag)
        pid = int(flag.read_text())
        t = time.perf_counter()
        subprocess.run(
            [binary, "dump", "-t", str(pid), "-D", str(images), "-o", "d.log"], check=True
        )
        dump = time.perf_counter() - t
        proc.wait()
        raw = criu.image_bytes(str(images))
        packed = zstd_size(str(images))
        t = time.perf_counter()
        subprocess.run(
            [binary, "restore", "-d", "-D", str(images), "-o", "r.log"],
            check=True,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        restore = time.perf_counter() - t
        os.kill(pid, 9)
        return {"dump": dump * 1000, "restore": restore * 1000, "raw": raw, "zstd": packed}
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        shutil.rmtree(work, ignore_errors=True)


def call(inst: Instance, method: str, path: str, body: dict[str, Any] | None = None) -> Any:
    req = urllib.request.Request(
        f"http://{inst.address}{path}",
        data=json.dumps(body).encode() if body is not None else None,
        method=method,
        headers={"Authorization": f"Bearer {inst.token}", "Content-Type": "application/json"},
    )
    try:
        with urllib.request.urlopen(req, timeout=600) as resp:
            return json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        raise SystemExit(
            f"{path}: {exc.code} {exc.read().decode(errors='replace').strip()}"
        ) from None


def dcp_migration(a: Instance, b: Instance, mb: int, kind: str) -> dict[str, float]:
    work = Path(tempfile.mkdtemp(prefix="bench-mig-"))
    flag = work / "flag"
    argv = [sys.executable, "-c", HOLD, str(mb), kind, str(flag)]
    path = os.fsencode(argv[0])
    args = tuple(os.fsencode(x) for x in argv)
    ticket = ticket_for_self(a.token, a.name, path, args)
    proc = subprocess.Popen(
        deputy_command(DROP, a.address, a.name, ticket, path, args),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        wait_file(flag)
        pid = int(flag.read_text())
        sid = next(
            s["session"] for s in call(a, "GET", "/v1/sessions")["sessions"] if s["pid"] == pid
        )
        body = {"to": b.address, "instance": b.name, "ticket": mint_ticket(b.token, b.name, sid)}
        t = time.perf_counter()
        done = call(a, "POST", f"/v1/sessions/{sid}/migrate", body)
        total = (time.perf_counter() - t) * 1000
        Path(str(flag) + ".go").touch()
        out, err = proc.communicate(timeout=300)
        if proc.returncode != 0 or not out.strip().isdigit():
            raise SystemExit(f"the moved program failed: {proc.returncode} {err.decode()}")
        done["total_ms"] = total
        if os.environ.get("BENCH_VERBOSE"):
            print(done, file=sys.stderr)
        return dict(done)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        shutil.rmtree(work, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="16,64,256")
    parser.add_argument("--text", type=int, default=64, help="MB of the compressible row (0: none)")
    parser.add_argument("--runs", type=int, default=3, help="best of this many runs per row")
    opts = parser.parse_args()
    binary = criu.check().path
    rows = [(int(s), "random") for s in opts.sizes.split(",")]
    if opts.text:
        rows.append((opts.text, "text"))
    with open("/proc/loadavg") as f:
        print(f"# {os.cpu_count()} CPUs, criu {criu.check().version}, loadavg {f.read().strip()}")
    header = (
        f"{'data':>12} {'criu dump':>10} {'criu rest':>10} {'criu d+r':>9} "
        f"{'dcp freeze':>11} {'dcp total':>10} {'dump':>7} {'xfer+rest':>10} "
        f"{'total/(d+r)':>11} {'raw MB':>8} {'zstd MB':>8}"
    )
    print(header)
    for mb, kind in rows:
        alones, moves = [], []
        for _ in range(opts.runs):
            alones.append(criu_alone(binary, mb, kind))
            # A fresh pair per run: a moved program's pid must be free on the target,
            # and small pid numbers collide between young instances.
            with LocalCluster(2) as cluster:
                a, b = cluster.instances
                moves.append(dcp_migration(a, b, mb, kind))
        alone = {k: min(r[k] for r in alones) for k in alones[0]}
        moved = {
            k: min(r[k] for r in moves) for k in moves[0] if isinstance(moves[0][k], float | int)
        }
        both = alone["dump"] + alone["restore"]
        print(
            f"{f'{mb} MB {kind}':>12} {alone['dump']:>8.0f}ms {alone['restore']:>8.0f}ms "
            f"{both:>7.0f}ms {moved['freeze_ms']:>9.0f}ms {moved['total_ms']:>8.0f}ms "
            f"{moved['dump_ms']:>5.0f}ms "
            f"{moved['transfer_ms']:>8.0f}ms {moved['total_ms'] / both:>11.2f} "
            f"{moved['image_bytes'] / 1e6:>8.1f} {moved['zstd_bytes'] / 1e6:>8.1f}",
            flush=True,
        )
    DROP.close()
    with open("/proc/loadavg") as f:
        print(f"# loadavg after: {f.read().strip()}")


if __name__ == "__main__":
    main()
