"""VM figures: image build (cold, cached), cold TCG boot to agent registered, warm exec.

Run as root from a checkout that has images/, oss/ and vmagent/:
    PYTHONPATH=. python3 bench/bench_vm.py [--boots 2] [--execs 10]
Prints one line per figure. The CPU is shared (2 cores, other sessions busy):
read the numbers as orders of magnitude, not as a regression gate.
"""

from __future__ import annotations

import argparse
import asyncio
import atexit
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests" / "integration"))

from vmlab import Credentials, InstanceType, Lab, LoopThread, make_lab, remove_tree  # noqa: E402

from images.builder import BuildConfig, Builder, source_checkout  # noqa: E402


def image_figures(cache: Path) -> tuple[float, float]:
    """Seconds for a cold build and for a rebuild with unchanged inputs."""
    cfg = BuildConfig(source_dir=source_checkout(), cache_dir=cache)
    t0 = time.monotonic()
    Builder(cfg).build()
    cold = time.monotonic() - t0
    t0 = time.monotonic()
    image = Builder(cfg).build()
    cached = time.monotonic() - t0
    assert image.cached
    return cold, cached


async def boot_to_registered(lab: Lab, name: str) -> tuple[float, float]:
    """(seconds to `dcp-init: ready`, seconds to registered) from the create request."""
    assert lab.provider is not None
    token = await lab.oss.token(name) if lab.oss else "bench"
    lab.tokens[name] = token
    t0 = time.monotonic()
    await lab.provider.create(name, InstanceType(), Credentials(name, token, lab.oss_url))
    await lab.provider.wait_serial(name, "dcp-init: ready", 180)
    ready = time.monotonic() - t0
    if lab.oss is None:
        return ready, float("nan")
    async with asyncio.timeout(180):
        while True:
            row = await lab.oss.instance(name)
            if row and row.get("state") == "ready":
                return ready, time.monotonic() - t0
            await asyncio.sleep(0.05)


def exec_times(lab: Lab, name: str, count: int) -> list[float]:
    """Wall seconds of `/bin/true` run on the instance through a deputy (host side)."""
    from vmagent.exec import remote

    DROP = remote.TicketDrop()  # noqa: N806 - removed by the process exit hook below
    atexit.register(DROP.close)

    assert lab.provider is not None
    out = []
    for _ in range(count):
        argv = remote.deputy_command(
            DROP,
            f"{lab.provider.address(name)}:7070",
            name,
            remote.ticket_for_self(lab.tokens[name], name, b"/bin/true", (b"true",)),
            b"/bin/true",
            (b"true",),
        )
        cmd = ["ip", "netns", "exec", lab.netns, *argv]
        t0 = time.monotonic()
        res = subprocess.run(cmd, capture_output=True, cwd="/", stdin=subprocess.DEVNULL)
        out.append(time.monotonic() - t0)
        if res.returncode != 0:
            raise RuntimeError(f"deputy failed: {res.stderr.decode()}")
    return out


def netns_exec_overhead(lab: Lab, count: int) -> float:
    """Median seconds of `ip netns exec NS true` (part of every figure above, not DCP's)."""
    times = []
    for _ in range(count):
        t0 = time.monotonic()
        subprocess.run(["ip", "netns", "exec", lab.netns, "true"], check=True)
        times.append(time.monotonic() - t0)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--boots", type=int, default=2, help="cold boots to time")
    ap.add_argument("--execs", type=int, default=10, help="warm execs to time")
    args = ap.parse_args()
    if os.geteuid() != 0:
        sys.exit("bench_vm needs root")
    print(f"host: {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.2f} (shared machine)")
    cache = Path(tempfile.mkdtemp(prefix="dcp-bench-images-"))
    try:
        cold, cached = image_figures(cache)
        print(f"image build cold: {cold:.1f} s")
        print(f"image build cached (inputs unchanged): {cached:.2f} s")
        loop = LoopThread()
        lab = make_lab(loop, "b")
        lab.image = Builder(BuildConfig(source_dir=source_checkout(), cache_dir=cache)).build()
        try:
            loop.run(lab.start(), timeout=120)
            assert lab.provider is not None
            dtype = lab.provider.domain_type
            print(f"domain type: {dtype.value if dtype else '?'}")
            if lab.oss is None:
                print(f"(no OSS/agent in this checkout: {lab.oss_missing})")
            for i in range(args.boots):
                ready, reg = loop.run(boot_to_registered(lab, f"bench{i}"), timeout=400)
                print(
                    f"cold boot {i}: request -> init ready {ready:.1f} s, "
                    f"-> agent registered {reg:.1f} s"
                )
            if lab.oss is not None:
                times = exec_times(lab, "bench0", args.execs)
                base = netns_exec_overhead(lab, args.execs)
                print(
                    f"warm instance exec of /bin/true: median {statistics.median(times):.3f} s, "
                    f"min {min(times):.3f} s, max {max(times):.3f} s over {len(times)} "
                    f"(includes `ip netns exec` {base:.3f} s)"
                )
        finally:
            loop.run(lab.aclose(), timeout=120)
            loop.stop()
            remove_tree(lab.work)
    finally:
        remove_tree(cache)


if __name__ == "__main__":
    main()
