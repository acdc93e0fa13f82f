"""Benchmark: migration between two TCG guests, with and without pre-copy, beside CRIU alone.

    flock /work/plans/vm.lock python bench/bench_vm_migrate.py [--sizes 16,64,256]

Root, the VM lab's tools (tests/integration/vmcheck.py says which).  One lab (the
guest image from the builder's cache, a private libvirtd, two guests of 1.5 GB
and 1 vCPU under TCG, their agents with Debian's criu 3.17).  For each size N
(MB of `os.urandom` data held by a Python process in vm1, a thread dirtying one
4 KiB page every 10 ms meanwhile):

- CRIU alone, in the same guest and the same run: the agent's same-instance
  checkpoint with restore (`POST /v1/sessions/{sid}/checkpoint {"restore": true}`):
  the wall time of `criu dump` and of `criu restore` as the agent runs them;
- DCP: `POST /v1/sessions/{sid}/migrate` vm1 -> vm2, once per mode (`--modes`):
  `packed` (one frozen dump, all images packed over HTTP: the path before the
  page server), `pages` (one frozen dump, its pages through the target's CRIU
  page server), `fast` (pre-copy rounds, then the final dump, pages through the
  page server: the agents' default).  total = that call's wall time; freeze =
  from the tracer's detach until the target said it runs; raw and zstd bytes
  of the final images; the bytes of each pre-copy round.  A second table
  splits each move's time by phase (`phases`).

Then the program is told to end and must report its data's checksum intact.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests" / "integration")]

from vmcheck import why_no_vm_lab  # noqa: E402

HOLD = r"""
import hashlib, os, sys, threading, time
data = bytearray(os.urandom(int(sys.argv[1]) << 20))
digest = hashlib.sha256(data).digest()
stop = threading.Event()
def dirty():
    i = 0
    while not stop.is_set():
        k = (i * 4096) % len(data)
        data[k] = data[k]
        i += 1
        time.sleep(0.01)
t = threading.Thread(target=dirty)
t.start()
print("ready", int(open("/proc/self/stat").read().split()[0]), flush=True)
sys.stdin.readline()
stop.set()
t.join()
print("ok" if hashlib.sha256(data).digest() == digest else "corrupt", flush=True)
"""


MODES = {  # name: (precopy, page_server) of the move
    "packed": (False, False),  # one frozen dump, its images packed (zstd) over HTTP
    "pages": (False, True),  # one frozen dump, its pages through the target's page server
    "fast": (True, True),  # pre-copy rounds, then the final dump; pages by the page server
}


def one(lab: Any, mb: int, mode: str) -> dict[str, Any]:
    from vmagents import Program, call, migrate, session_of

    prog = Program(lab, "vm1", HOLD, str(mb))
    try:
        prog.wait_lines(1, 600)
        pid = int(prog.lines[0].split()[1])
        sid = session_of(lab, "vm1", pid)
        alone = call(lab, "vm1", "POST", f"/v1/sessions/{sid}/checkpoint", {"restore": True})
        time.sleep(2)  # let it run (and dirty pages) again before the move
        t = time.perf_counter()
        precopy, pages = MODES[mode]
        moved = migrate(lab, "vm1", "vm2", sid, precopy=precopy, page_server=pages)
        moved["total_ms"] = (time.perf_counter() - t) * 1000
        code = prog.finish()
        if code != 0 or prog.lines[-1] != "ok":
            raise SystemExit(f"the moved program failed: {code} {prog.lines[-2:]} {prog.errors()}")
        moved["criu_dump_ms"] = alone["dump_ms"]
        moved["criu_restore_ms"] = alone["restore_ms"]
        return dict(moved)
    finally:
        prog.kill()


PHASES = ("precopy", "check+", "detach", "dump", "zstd", "send", "restore", "commit", "freeze")


def phases(r: dict[str, Any]) -> dict[str, float]:
    """The migration's wall time split by phase (ms): the freeze's parts, and before it.

    `send`: the transfer's part that is neither compressing (source) nor criu
    restore (target): reading the images, HTTP, unpacking, writing them out.
    `check+`: the call's remainder (the target's check, the HTTP calls around).
    """
    restore = float(r.get("restore_ms", 0))
    zstd = float(r.get("zstd_ms", 0))
    send = float(r["transfer_ms"]) - restore - zstd
    freeze = float(r["freeze_ms"])
    return {
        "precopy": float(r["precopy_ms"]),
        "check+": float(r["total_ms"]) - freeze - float(r["precopy_ms"]),
        "detach": float(r.get("detach_ms", 0)),
        "dump": float(r["dump_ms"]),
        "zstd": zstd,
        "send": send,
        "restore": restore,
        "commit": float(r.get("commit_ms", 0)),
        "freeze": freeze,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="16,64,256")
    parser.add_argument("--memory-mb", type=int, default=1536)
    parser.add_argument(
        "--modes",
        default="packed,pages,fast",
        help="comma-separated moves per size: packed (the old path), pages (page server), "
        "fast (pre-copy rounds and the page server: the default)",
    )
    opts = parser.parse_args()
    if not opts.modes or not set(opts.modes.split(",")) <= set(MODES):
        raise SystemExit(f"bench_vm_migrate: --modes takes a list of {', '.join(MODES)}")
    why = why_no_vm_lab()
    if why:
        raise SystemExit(f"bench_vm_migrate: {why}")
    from vmlab import InstanceType, LoopThread, make_lab, remove_tree

    from images.builder import default_cache_dir

    loop = LoopThread()
    lab = make_lab(loop, "b")
    try:
        lab.image = lab.build_image(default_cache_dir())
        loop.run(lab.start(), timeout=120)
        loop.run(lab.boot(["vm1", "vm2"], InstanceType(memory_mb=opts.memory_mb)), timeout=300)
        for n in ("vm1", "vm2"):
            loop.run(lab.registered(n), timeout=180)
        with open("/proc/loadavg") as f:
            print(f"# {os.cpu_count()} host CPUs, TCG guests 1 vCPU {opts.memory_mb} MB, "
                  f"loadavg {f.read().strip()}")  # fmt: skip
        print(
            f"{'data':>7} {'mode':>6} {'criu d':>7} {'criu r':>7} {'freeze':>7} {'total':>7} "
            f"{'tot/(d+r)':>9} {'raw MB':>7} {'zstd MB':>7}  rounds MB"
        )
        rows = []
        for mb in (int(s) for s in opts.sizes.split(",")):
            for mode in opts.modes.split(","):
                r = one(lab, mb, mode)
                rows.append((mb, mode, r))
                both = r["criu_dump_ms"] + r["criu_restore_ms"]
                rounds = ",".join(f"{b / 1e6:.1f}" for b in r["precopy_rounds"]) or "-"
                if r.get("precopy_error"):
                    rounds += f" ({r['precopy_error']})"
                print(
                    f"{mb:>4} MB {mode:>6} {r['criu_dump_ms']:>5.0f}ms "
                    f"{r['criu_restore_ms']:>5.0f}ms {r['freeze_ms']:>5.0f}ms "
                    f"{r['total_ms']:>5.0f}ms {r['total_ms'] / both:>9.2f} "
                    f"{r['image_bytes'] / 1e6:>7.1f} {r['zstd_bytes'] / 1e6:>7.1f}  {rounds}",
                    flush=True,
                )
                parts = phases(r)
                print("#   ms: " + " ".join(f"{p}={parts[p]:.0f}" for p in PHASES), flush=True)
        # Where the time goes: the freeze phase by phase (ms), and the rest of the total.
        print(f"\n{'data':>7} {'mode':>6} " + " ".join(f"{p:>8}" for p in PHASES) + "  (ms)")
        for mb, mode, r in rows:
            parts = phases(r)
            print(
                f"{mb:>4} MB {mode:>6} "
                + " ".join(f"{parts[p]:>8.0f}" for p in PHASES)
            )
        with open("/proc/loadavg") as f:
            print(f"# loadavg after: {f.read().strip()}")
    finally:
        if not lab.closed:
            loop.run(lab.aclose(), timeout=120)
        loop.stop()
        remove_tree(lab.work)


if __name__ == "__main__":
    main()
