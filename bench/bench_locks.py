"""Benchmark: the cost of one flock call of a placed process (issue 14).

    PYTHONPATH=$PWD python bench/bench_locks.py [--calls 300]

A Python program takes and releases an flock `--calls` times on (a) a
descriptor it inherited from the shell (`9>file`: the lock is its deputy's,
at home) and (b) a file it opened itself (the instance's kernel serves it; the
tracer still asks the agent).  Run natively and under
`dcptrace --instances 2 --placement spread`; prints microseconds per call.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PROGRAM = """
import fcntl, os, sys, time
arg, n = sys.argv[1], int(sys.argv[2])
fd = int(arg) if arg.isdigit() else os.open(arg, os.O_RDWR | os.O_CREAT)
t = time.perf_counter()
for _ in range(n):
    fcntl.flock(fd, fcntl.LOCK_EX)
    fcntl.flock(fd, fcntl.LOCK_UN)
print(f"{(time.perf_counter() - t) / (2 * n) * 1e6:.0f}")
"""


def main() -> int:
    """Run both cases natively and in a cluster; print a table."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--calls", type=int, default=300)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        prog = Path(tmp) / "locker.py"
        prog.write_text(PROGRAM)
        script = (
            f"python3 {prog} 9 {args.calls} 9>{tmp}/inherited.lock; "
            f"python3 {prog} {tmp}/own.lock {args.calls}"
        )
        env = dict(os.environ, PYTHONPATH=str(REPO))
        rows = {}
        for mode, prefix in (
            ("native", []),
            ("cluster", [sys.executable, "-m", "tracer.cli", "--instances", "2",
                         "--placement", "spread", "--"]),
        ):  # fmt: skip
            out = subprocess.run([*prefix, "sh", "-c", script], env=env, capture_output=True,
                                 text=True, check=True, timeout=600).stdout.split()  # fmt: skip
            rows[mode] = out
    print("| flock call (us) | native | placed (--instances 2) |")
    print("| --- | --- | --- |")
    print(f"| inherited descriptor (deputy) | {rows['native'][0]} | {rows['cluster'][0]} |")
    print(f"| file opened on the instance | {rows['native'][1]} | {rows['cluster'][1]} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
