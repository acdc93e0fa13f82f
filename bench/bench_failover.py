"""Benchmark: a periodic (failover) checkpoint's freeze and the size of what is stored.

    PYTHONPATH=$PWD python bench/bench_failover.py [--sizes 16,64] [--text 64] [--runs 5]

For each size N (MB) of live data held by a Python process placed on a local
instance (`LocalCluster(1)`, a real deputy and instance tracer), `--runs`
checkpoints of the running process through the agent's
`POST /v1/sessions/{sid}/checkpoint {"restore": false}`, the same
`Checkpointer.checkpoint` a periodic checkpoint runs (vmagent.checkpoint.periodic):

- freeze: from the tracer's detach until the tree runs again (what the program
  feels), and CRIU's dump inside it;
- raw: the CRIU images; stored: what goes to the OSS and is kept there, the
  images packed as `vmagent.checkpoint.migrate.pack` packs them (1 MiB blocks,
  zstd level 1 where a block shrinks by a tenth, raw otherwise); zstd: the
  images compressed whole (level 1), for comparison.

The data is `os.urandom` (incompressible: zstd's worst case) and, in the
`text` row, text lines (compressible).  Median and best of the runs; the
process keeps running between checkpoints, as under `--checkpoint-every`.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
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
from vmagent.checkpoint.migrate import pack, scratch  # noqa: E402
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
i = 0
while not os.path.exists(flag + ".go"):
    data[i % len(data)] ^= 1  # it runs (and dirties a page) between checkpoints
    i += 4096
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


def stored_size(directory: str) -> int:
    """Bytes of the images packed as a periodic checkpoint sends (and the OSS keeps) them."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the packer writes into the pipe; we count what comes out
        os.close(r)
        try:
            pack(directory, w)
        finally:
            os._exit(0)
    os.close(w)
    total = 0
    while chunk := os.read(r, 1 << 20):
        total += len(chunk)
    os.close(r)
    os.waitpid(pid, 0)
    return total


def zstd_size(directory: str) -> int:
    total = 0
    compressor = zstandard.ZstdCompressor(level=1)
    for name in os.listdir(directory):
        if name.endswith(".img"):
            with open(os.path.join(directory, name), "rb") as f:
                total += len(compressor.compress(f.read()))
    return total


def checkpoints(inst: Instance, mb: int, kind: str, runs: int) -> list[dict[str, float]]:
    work = Path(tempfile.mkdtemp(prefix="bench-failover-", dir=scratch()))
    flag = work / "flag"
    argv = [sys.executable, "-c", HOLD, str(mb), kind, str(flag)]
    path = os.fsencode(argv[0])
    args = tuple(os.fsencode(x) for x in argv)
    ticket = ticket_for_self(inst.token, inst.name, path, args)
    proc = subprocess.Popen(
        deputy_command(DROP, inst.address, inst.name, ticket, path, args),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        wait_file(flag)
        (sid,) = [  # the only program on the instance
            s["session"]
            for s in call(inst, "GET", "/v1/sessions")["sessions"]
            if s.get("running", True)
        ]
        out = []
        for k in range(runs):
            images = work / f"ckpt{k}"
            done = call(
                inst, "POST", f"/v1/sessions/{sid}/checkpoint",
                {"restore": False, "images": str(images)},
            )  # fmt: skip
            done["stored"] = stored_size(str(images))
            done["zstd"] = zstd_size(str(images))
            shutil.rmtree(images, ignore_errors=True)
            out.append(done)
            time.sleep(0.5)
        Path(str(flag) + ".go").touch()
        got, err = proc.communicate(timeout=300)
        if proc.returncode != 0 or not got.strip().isdigit():
            raise SystemExit(f"the checkpointed program failed: {proc.returncode} {err.decode()}")
        return out
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        shutil.rmtree(work, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--sizes", default="16,64")
    parser.add_argument("--text", type=int, default=64, help="MB of the compressible row (0: none)")
    parser.add_argument("--runs", type=int, default=5, help="checkpoints per row")
    opts = parser.parse_args()
    found = criu.check()
    rows = [(int(s), "random") for s in opts.sizes.split(",")]
    if opts.text:
        rows.append((opts.text, "text"))
    with open("/proc/loadavg") as f:
        print(f"# {os.cpu_count()} CPUs, criu {found.version}, loadavg {f.read().strip()}")
    print(
        f"{'data':>12} {'freeze med':>10} {'freeze min':>10} {'dump med':>9} "
        f"{'raw MB':>8} {'stored MB':>9} {'zstd MB':>8} {'stored/raw':>10}"
    )
    with LocalCluster(1) as cluster:
        (inst,) = cluster.instances
        for mb, kind in rows:
            done = checkpoints(inst, mb, kind, opts.runs)
            freeze = [d["freeze_ms"] for d in done]
            raw = statistics.median(d["image_bytes"] for d in done)
            stored = statistics.median(d["stored"] for d in done)
            packed = statistics.median(d["zstd"] for d in done)
            print(
                f"{f'{mb} MB {kind}':>12} {statistics.median(freeze):>8.0f}ms "
                f"{min(freeze):>8.0f}ms {statistics.median(d['dump_ms'] for d in done):>7.0f}ms "
                f"{raw / 1e6:>8.1f} {stored / 1e6:>9.1f} {packed / 1e6:>8.1f} "
                f"{stored / raw:>10.2f}",
                flush=True,
            )
    DROP.close()
    with open("/proc/loadavg") as f:
        print(f"# loadavg after: {f.read().strip()}")


if __name__ == "__main__":
    main()
