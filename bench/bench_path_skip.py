"""What trapping path calls for /proc costs a placed process (issue 11), three ways.

Usage: python bench/bench_path_skip.py [--rounds N] [--pin CPU]

An instance tracer serves /proc/N of a sibling held elsewhere by trapping the path
calls and getdents64 (`vmagent.trace.procview`).  Each workload runs natively and
under a `tracer.runner.Runner` that traps, besides execve:
- nothing else (`base`: a view without maps before /proc was served there);
- the /proc calls, with the C loop letting go every call that cannot name a path
  under /proc (`skip`: `tracer.runner.PathSkip`, what a view without maps does now);
- the /proc calls, every one through Python (`python`: what a view without maps
  would pay where the C loop is not built).
A view with maps stops on every call that names a path (`maps`: the C loop lets go
those outside the maps' directories and the magic links; `maps, python`: every one
through Python, as before the loop judged them); `/tmp/dcp-bench-view` is mapped,
which these workloads never touch, so every call is the kernel's as it is.
The traced run is timed inside its driver process (the driver's own start-up is
not in the figure); cases run interleaved round by round, and the ratios to `base`
are taken within each round (min / median over the rounds).

`--pin CPU` runs everything on one CPU.  On a virtual machine whose idle vCPUs halt
(this workplace's), a ptrace stop that wakes the tracer on the other vCPU and the
resume that wakes the tracee back cost ~70 µs of wake-ups; on one CPU they are a
context switch (~4 µs), so both figures are worth a look.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

WORKLOADS = {
    "python3 imports": [
        "/usr/bin/python3", "-c",
        "import json, email.parser, http.client, xml.dom.minidom, decimal, asyncio, argparse",
    ],
    "ls -l /usr/bin": ["/bin/ls", "-l", "/usr/bin"],
    "sh: test -e each /usr/bin": [
        "/bin/sh", "-c", 'for f in /usr/bin/*; do test -e "$f"; done',
    ],
}  # fmt: skip

DRIVER = r"""
import json, os, subprocess, sys, time
mode, argv = sys.argv[1], sys.argv[2:]
if mode == "native":
    t = time.perf_counter()
    subprocess.run(argv, stdout=subprocess.DEVNULL, check=True)
    print(json.dumps({"wall": time.perf_counter() - t, "seen": 0}))
    raise SystemExit
from tracer.arch import table_for
from tracer.coordinator import Allow
from tracer.runner import PathSkip, Runner, single_path_calls
from vmagent.trace import procview

class Coordinator:
    def __init__(self, calls):
        self.calls, self.seen = calls, 0
    def interception(self):
        return self.calls
    def on_syscall(self, call):
        self.seen += 1
        return Allow()
    def on_result(self, call, result, output):
        return None
    def on_process(self, event):
        pass
    def instance_of(self, pid):
        return "here"

table = table_for("x86_64")
calls = frozenset({"execve", "execveat"})
skip = None
if mode in ("skip", "python"):
    calls |= procview.CALLS
    if mode == "skip":
        skip = PathSkip((b"/proc",), procview.PATH_CALLS, procview.LISTING_CALLS)
elif mode.startswith("maps"):
    from oss.embedded import EmbeddedCoordinator
    from oss.storage.pathmap import PathMap
    embedded = EmbeddedCoordinator(table, PathMap({"/tmp/dcp-bench-view": "/tmp"}))
    calls |= embedded.interception() | procview.CALLS
    if mode == "maps":
        skip = PathSkip((b"/proc", *embedded.acts_under()), single_path_calls(table),
                        procview.LISTING_CALLS)
coordinator = Coordinator(calls)
null = os.open(os.devnull, os.O_WRONLY)
os.dup2(null, 1)
runner = Runner(argv, dict(os.environ), argv[0], table, coordinator,
                trace_all=False, skip=skip)
t = time.perf_counter()
outcome = runner.run()
took = time.perf_counter() - t
assert outcome.exit_status == 0, outcome
os.write(2, json.dumps({"wall": took, "seen": coordinator.seen}).encode() + b"\n")
"""

MODES = ("native", "base", "skip", "python", "maps", "maps, python")


def run(mode: str, argv: list[str]) -> dict[str, float]:
    env = dict(os.environ, PYTHONPATH=str(REPO))
    done = subprocess.run(
        [sys.executable, "-c", DRIVER, mode, *argv],
        capture_output=True, text=True, env=env, timeout=600,
    )  # fmt: skip
    if done.returncode != 0:
        raise SystemExit(f"{mode} {argv} failed: {done.stderr[-2000:]}")
    out = done.stdout if mode == "native" else done.stderr
    result: dict[str, float] = json.loads(out.strip().splitlines()[-1])
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--pin", type=int, help="run every process on this CPU")
    args = ap.parse_args()
    if args.pin is not None:
        os.sched_setaffinity(0, {args.pin})
    try:
        from tracer import _fastpath  # noqa: F401
    except ImportError:
        msg = "bench_path_skip: tracer._fastpath is not built (pip install -e .)"
        raise SystemExit(msg) from None
    pinned = f", pinned to CPU {args.pin}" if args.pin is not None else ""
    print(f"# {os.cpu_count()} CPUs{pinned}, {args.rounds} rounds,"
          f" load average {os.getloadavg()[0]:.2f}")  # fmt: skip
    print(f"{'workload':28} {'mode':12} {'wall min':>9} {'median':>9} {'to python':>9}"
          f" {'x base min':>10} {'median':>7} {'x native':>8}")  # fmt: skip
    for name, argv in WORKLOADS.items():
        walls: dict[str, list[float]] = {m: [] for m in MODES}
        seen: dict[str, float] = {}
        for _ in range(args.rounds):
            for mode in MODES:
                got = run(mode, argv)
                walls[mode].append(got["wall"])
                seen[mode] = got["seen"]
        for mode in MODES:
            w = walls[mode]
            to_base = [a / b for a, b in zip(w, walls["base"], strict=True)]
            to_native = [a / b for a, b in zip(w, walls["native"], strict=True)]
            print(f"{name:28} {mode:12} {min(w) * 1e3:7.1f}ms {statistics.median(w) * 1e3:7.1f}ms"
                  f" {int(seen[mode]):9d} {min(to_base):10.2f} {statistics.median(to_base):7.2f}"
                  f" {statistics.median(to_native):8.2f}")  # fmt: skip


if __name__ == "__main__":
    main()
