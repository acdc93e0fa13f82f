"""dcptrace overhead against a native run and strace, measured in one process.

Usage: python bench/bench_tracer.py [--repeat N] [--quick]

Each workload runs natively, under `strace -f -o /dev/null`, under
`strace -f --seccomp-bpf -e trace=<DCP's interception set>`, under dcptrace
(default) and under `dcptrace --trace -o /dev/null`; each cell is the best of
N wall-clock runs, interleaved so machine noise spreads over every column.
Prints seconds and ratios (dcptrace/native, dcptrace --trace / strace, the
latter also round by round: min/median), the fixed start-up cost of each
column (the same run of /bin/true), dcptrace/native with that fixed cost
taken off (the steady-state overhead), and dcptrace --trace / strace with each
one's own start-up taken off (`trace steady`: the cost per traced syscall).
`cpu t/s` is dcptrace --trace / strace by CPU time (user + system of every
process of the run, dcptrace's tracer child included: this process is a child
subreaper and reaps what a run leaves), min/median over the rounds; it moves
less than wall time with the load of a shared machine.
`--long` adds a 5,000,000-syscall dd in the columns that finish in seconds.
"""

from __future__ import annotations

import argparse
import ctypes
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
# The cluster interception set (placement of new programs); the embedded
# single-instance default intercepts nothing, and strace needs a non-empty set.
INTERCEPTION = "execve,execveat"

PY_IMPORTS = (
    "import json, decimal, asyncio, email.parser, http.client, xml.dom.minidom, sqlite3, "
    "argparse, logging.handlers, unittest, csv, tarfile, zipfile, urllib.request, pathlib"
)
WORKLOADS = {
    "dd bs=1 count=500000": ["dd", "if=/dev/zero", "of=/dev/null", "bs=1", "count=500000"],
    "find /usr": ["sh", "-c", "find /usr > /dev/null"],
    "python many imports": [sys.executable, "-c", PY_IMPORTS],
    "cpu loop": [sys.executable, "-c", "s = 0\nfor i in range(3_000_000): s += i * i"],
}


def columns() -> dict[str, list[str]]:
    dcp = [sys.executable, "-m", "tracer.cli"]
    return {
        "native": [],
        "strace": ["strace", "-f", "-o", "/dev/null", "--"],
        "strace-seccomp": [
            "strace",
            "-f",
            "--seccomp-bpf",
            "-e",
            f"trace={INTERCEPTION}",
            "-o",
            "/dev/null",
            "--",
        ],  # fmt: skip
        "dcptrace": [*dcp, "--"],
        "dcptrace --trace": [*dcp, "--trace", "-o", "/dev/null", "--"],
    }


PR_SET_CHILD_SUBREAPER = 36
_cpu: dict[str, list[float]] = {}  # " ".join(argv) -> CPU seconds of each of its runs


def cpu_of_children() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def timed(argv: list[str], env: dict[str, str]) -> float:
    """Wall seconds of one run; its CPU seconds (left-behinds too) go to `_cpu`."""
    cpu = cpu_of_children()
    start = time.perf_counter()
    rc = subprocess.run(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    elapsed = time.perf_counter() - start
    while True:  # what the run left (dcptrace's tracer child) was reparented to us
        try:
            os.wait()
        except ChildProcessError:
            break
    _cpu.setdefault(" ".join(argv), []).append(cpu_of_children() - cpu)
    if rc.returncode != 0:
        # find /usr can fail while packages are being installed; say so, keep timing.
        print(f"# note: exit {rc.returncode}: {' '.join(argv[-6:])}", file=sys.stderr)
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="dd count=50000 (smoke run)")
    parser.add_argument("--long", action="store_true", help="also dd count=5000000")
    args = parser.parse_args()
    if shutil.which("strace") is None:
        sys.exit("bench_tracer: strace is not installed (apt-get install strace)")
    if ctypes.CDLL(None).prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0:
        sys.exit("bench_tracer: cannot become a child subreaper")
    # dcptrace records each run in the local OSS state: keep it out of $HOME.
    data = tempfile.mkdtemp(prefix="dcp-bench-data-")
    env = dict(os.environ, PYTHONPATH=str(REPO), DCP_DATA=data)
    env.pop("PYTHONDONTWRITEBYTECODE", None)  # bytecode cached, as after pip install
    cols = columns()
    work = dict(WORKLOADS)
    if args.quick:
        work["dd bs=1 count=50000"] = work.pop("dd bs=1 count=500000")
        work["dd bs=1 count=50000"][-1] = "count=50000"
    print(f"# {os.cpu_count()} CPUs, best of {args.repeat}, python {sys.version.split()[0]}, "
          f"load average {os.getloadavg()[0]:.2f}")  # fmt: skip
    start = {c: min(timed([*p, "/bin/true"], env) for _ in range(max(5, args.repeat)))
             for c, p in cols.items()}  # fmt: skip
    fixed = start["dcptrace"] - start["native"]
    shown = ", ".join(f"{c} {1000 * v:.1f} ms" for c, v in start.items())
    print(f"# start-up (/bin/true): {shown}")
    header = f"{'workload':<24}" + "".join(f"{c:>18}" for c in cols)
    print(
        header
        + f"{'dcp/native':>12}{'steady':>8}{'trace/strace':>14}{'min/median':>16}"
        + f"{'trace steady':>14}{'cpu t/s':>14}"
    )
    for name, argv in work.items():
        times: dict[str, list[float]] = {c: [] for c in cols}
        for _ in range(args.repeat):
            for c, prefix in cols.items():
                times[c].append(timed([*prefix, *argv], env))
        best = {c: min(v) for c, v in times.items()}
        row = f"{name:<24}" + "".join(f"{best[c]:>17.3f}s" for c in cols)
        row += f"{best['dcptrace'] / best['native']:>12.3f}"
        row += f"{(best['dcptrace'] - fixed) / best['native']:>8.3f}"
        row += f"{best['dcptrace --trace'] / best['strace']:>14.3f}"
        # The same ratio taken within each round (both ran back to back): min, median.
        traced, plain = times["dcptrace --trace"], times["strace"]
        pairs = sorted(t / s for t, s in zip(traced, plain, strict=True))
        row += f"{pairs[0]:>8.2f}/{pairs[len(pairs) // 2]:.2f}"
        trace_steady = (best["dcptrace --trace"] - start["dcptrace --trace"]) / max(
            best["strace"] - start["strace"], 1e-9
        )
        row += f"{trace_steady:>14.3f}"
        cpu_t = _cpu[" ".join([*cols["dcptrace --trace"], *argv])][-args.repeat :]
        cpu_s = _cpu[" ".join([*cols["strace"], *argv])][-args.repeat :]
        cpu_pairs = sorted(t / s for t, s in zip(cpu_t, cpu_s, strict=True) if s > 0)
        if cpu_pairs:
            row += f"{cpu_pairs[0]:>8.2f}/{statistics.median(cpu_pairs):.2f}"
        print(row, flush=True)
    if args.long:
        argv = ["dd", "if=/dev/zero", "of=/dev/null", "bs=1", "count=5000000"]
        best = {c: min(timed([*cols[c], *argv], env) for _ in range(args.repeat))
                for c in ("native", "strace-seccomp", "dcptrace")}  # fmt: skip
        print(
            f"{'dd bs=1 count=5000000':<24}"
            + "".join(f"{c} {v:.3f}s  " for c, v in best.items())
            + f"dcp/native {best['dcptrace'] / best['native']:.3f}"
        )


if __name__ == "__main__":
    main()
