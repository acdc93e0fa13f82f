"""Benchmark: `make -j6` of a generated C project natively, under dcptrace, on 3 instances.

    PYTHONPATH=$PWD python bench/bench_cluster_make.py [--rounds 5] [--units 12]

Each round builds the same project (tests/integration/cproject.py: 12 units of
200 functions + main, `make clean` between builds) three ways, interleaved so
load from other work on the machine hits all three alike:

- native: `make -j6`;
- dcptrace: `dcptrace --no-state -- make -j6` (the embedded coordinator);
- cluster: `dcptrace --no-state --instances 3 --placement spread -- make -j6`
  (3 local instances: the run's OSS, agents, every compile placed; start-up of
  the instances included).

Also the default placement (`auto`, the cost model: compiles stay home), and
`dcptrace --no-state --instances 3 [--placement spread] -- true` alone (the
cluster's start-up: none under auto, which starts instances on first use),
and the cost of one exec placed from an instance (a placed sh running 20
`/bin/true`, each placed again, minus the placed sh alone, / 20).
Prints min / median / max wall seconds per way and the load average.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests" / "integration"))
sys.path.insert(0, str(ROOT / "bench"))

from cproject import generate  # noqa: E402
from rounds import interleaved, spread, timed  # noqa: E402

DCPTRACE = [sys.executable, "-m", "tracer.cli", "--no-state"]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--units", type=int, default=12)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="dcp-bench-make-") as tmp:
        proj = generate(Path(tmp) / "proj", units=args.units)
        ways = {
            "native": ["make", "-j6"],
            "dcptrace": [*DCPTRACE, "--", "make", "-j6"],
            "cluster": [*DCPTRACE, "--instances", "3", "--placement", "spread", "--",
                        "make", "-j6"],
            "cluster auto (default)": [*DCPTRACE, "--instances", "3", "--", "make", "-j6"],
            "cluster start-up (true)": [*DCPTRACE, "--instances", "3", "--", "true"],
            "spread start-up (true)": [*DCPTRACE, "--instances", "3", "--placement", "spread",
                                       "--", "true"],
            # A placed sh alone, and running 20 /bin/true each placed again from its
            # instance: the difference / 20 is one placement from an instance.
            "placed sh, no exec": [*DCPTRACE, "--instances", "3", "--placement", "spread",
                                   "--", "sh", "-c", "/bin/sh -c :"],
            "placed sh, 20 placed execs": [*DCPTRACE, "--instances", "3", "--placement",
                                           "spread", "--", "sh", "-c",
                                           "/bin/sh -c '" + "/bin/true; " * 20 + "'"],
        }  # fmt: skip
        print(f"load before: {open('/proc/loadavg').read().strip()}")
        timed(["make", "-j6"], proj)  # warm the page cache and the compiler
        clean = ["make", "clean"]
        times = interleaved({w: (argv, proj, clean) for w, argv in ways.items()}, args.rounds)
        print(f"load after:  {open('/proc/loadavg').read().strip()}")
        for way, t in times.items():
            print(f"{way:26s} {spread(t)}")
        base = statistics.median(times["placed sh, no exec"])
        per = (statistics.median(times["placed sh, 20 placed execs"]) - base) / 20
        print(f"one exec placed from an instance (deputy there + remote exec): {per * 1000:.0f} ms")


if __name__ == "__main__":
    main()
