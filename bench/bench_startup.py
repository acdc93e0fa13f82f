"""dcptrace start-up and steady-state cost, as ratios to baselines timed in the same run.

Usage: python bench/bench_startup.py [--runs N] [--dd COUNT] [--no-dd]

Start-up: `true` natively, under `python -c pass` (the same interpreter: the
floor of any Python tool), `strace -f`, `strace -f --seccomp-bpf -e trace=execve`
and dcptrace plain, `--no-state` (the run not recorded in the local OSS state:
the tracer's own cost), `--trace -o /dev/null`, `--record FILE`, `--summary -o
/dev/null`.  Steady state: `dd if=/dev/zero of=/dev/null bs=1 count=COUNT`
natively, under plain dcptrace (no call intercepted: no seccomp filter) and
under `dcptrace --map` against `strace --seccomp-bpf` with the same
interception set (every path-taking call).

The commands of one round run one after the other, and each ratio is taken
within a round (A/B of the same round), so a machine whose speed drifts (a
shared 2-core machine) still gives comparable ratios; min and median over the
rounds are printed.  Each timed command is the whole process as a shell waits
for it; this process is a child subreaper and waits for every descendant
(dcptrace's tracer child records the run after dcptrace returned) before the
next command starts, so no run's leftovers slow the next.  Wall time is what
the targets are about; CPU time (user + system of every process of the run,
the tracer's recording after dcptrace returned included) is printed too, as it
moves less with the load of a shared machine.

dcptrace runs as its console script does (`from tracer.cli import main`) from
this checkout, with compiled bytecode cached as after `pip install`:
PYTHONDONTWRITEBYTECODE is removed from the environment.
"""

from __future__ import annotations

import argparse
import ctypes
import os
import resource
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PR_SET_CHILD_SUBREAPER = 36
DCPTRACE = [sys.executable, "-c", "from tracer.cli import main; main()"]


def path_calls() -> str:
    """The calls `dcptrace --map` intercepts (the embedded OSS's set), for strace -e
    (`?name`: strace skips the calls newer than it knows)."""
    sys.path.insert(0, str(REPO))
    from oss.embedded import EmbeddedCoordinator
    from oss.storage.pathmap import PathMap
    from tracer.arch import table_for

    table = table_for(os.uname().machine)
    calls = EmbeddedCoordinator(table, PathMap({"/x": "/tmp"})).interception()
    return ",".join(f"?{name}" for name in sorted(calls))


def cpu_of_children() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def timed(argv: list[str], env: dict[str, str]) -> tuple[float, float]:
    """Wall seconds until `argv` exits, and CPU seconds of all it ran, left-behinds too."""
    cpu = cpu_of_children()
    start = time.perf_counter()
    pid = os.fork()
    if pid == 0:
        try:
            null = os.open(os.devnull, os.O_RDWR)
            os.dup2(null, 0)
            os.dup2(null, 1)
            os.dup2(null, 2)
            os.execvpe(argv[0], argv, env)
        finally:
            os._exit(127)
    _, status = os.waitpid(pid, 0)
    elapsed = time.perf_counter() - start
    while True:  # orphans of this run were reparented to us (subreaper)
        try:
            os.wait()
        except ChildProcessError:
            break
    if os.waitstatus_to_exitcode(status) != 0:
        print(f"# note: exit {os.waitstatus_to_exitcode(status)}: {' '.join(argv)}", flush=True)
    return elapsed, cpu_of_children() - cpu


Times = dict[str, list[tuple[float, float]]]  # column -> (wall, cpu) per round


def rounds(columns: dict[str, list[str]], env: dict[str, str], n: int) -> Times:
    """Each column once per round, in turn, after one untimed warm-up round."""
    for argv in columns.values():
        timed(argv, env)
    out: Times = {c: [] for c in columns}
    for _ in range(n):
        for c, argv in columns.items():
            out[c].append(timed(argv, env))
    return out


def wall(times: Times, column: str) -> list[float]:
    return [w for w, _ in times[column]]


def show(times: Times, ratios: list[tuple[str, str, float | None]]) -> None:
    """Seconds per column, then each ratio A/B taken round by round (wall, then CPU)."""
    for c, v in times.items():
        w, cpu = [x for x, _ in v], [y for _, y in v]
        print(f"  {c:<30} wall min {1000 * min(w):7.1f} median {1000 * statistics.median(w):7.1f}"
              f" ms, cpu median {1000 * statistics.median(cpu):7.1f} ms")  # fmt: skip
    for a, b, target in ratios:
        r = [x[0] / y[0] for x, y in zip(times[a], times[b], strict=True)]
        rc = [x[1] / y[1] for x, y in zip(times[a], times[b], strict=True) if y[1] > 0]
        goal = f"   (target <= {target})" if target else ""
        shown = f", cpu median {statistics.median(rc):6.2f}" if rc else ""
        print(f"  {a + ' / ' + b:<48} wall min {min(r):6.2f} median {statistics.median(r):6.2f}"
              f"{shown}{goal}")  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=10, help="timed rounds (default 10)")
    parser.add_argument("--dd", type=int, default=8_000_000, help="dd count (default 8000000)")
    parser.add_argument("--dd-runs", type=int, default=3, help="rounds of the dd part")
    parser.add_argument("--no-dd", action="store_true", help="start-up only")
    args = parser.parse_args()
    if shutil.which("strace") is None:
        sys.exit("bench_startup: strace is not installed (apt-get install strace)")
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0:
        sys.exit("bench_startup: cannot become a child subreaper")
    data = tempfile.mkdtemp(prefix="dcp-bench-data-")  # the runs' local OSS state
    work = tempfile.mkdtemp(prefix="dcp-bench-out-")
    env = dict(os.environ, PYTHONPATH=str(REPO), DCP_DATA=data)
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    print(f"# {os.cpu_count()} CPUs, {args.runs} rounds, python {sys.version.split()[0]} "
          f"({sys.executable}), load average {os.getloadavg()[0]:.2f}")  # fmt: skip
    true = shutil.which("true") or "/bin/true"
    start = {
        "native true": [true],
        "python -c pass": [sys.executable, "-c", "pass"],
        "strace -f": ["strace", "-f", "-o", "/dev/null", true],
        "strace --seccomp-bpf execve": [
            "strace", "-f", "--seccomp-bpf", "-e", "trace=execve", "-o", "/dev/null", true
        ],
        "dcptrace": [*DCPTRACE, "--", true],
        "dcptrace --no-state": [*DCPTRACE, "--no-state", "--", true],
        "dcptrace --trace": [*DCPTRACE, "--trace", "-o", "/dev/null", "--", true],
        "dcptrace --record": [*DCPTRACE, "--record", f"{work}/run.json", "--", true],
        "dcptrace --summary": [*DCPTRACE, "--summary", "-o", "/dev/null", "--", true],
    }  # fmt: skip
    print("start-up (whole process, `true`):")
    times = rounds(start, env, args.runs)
    fixed = statistics.median(wall(times, "dcptrace")) - statistics.median(
        wall(times, "native true")
    )
    show(times, [
        ("dcptrace", "python -c pass", 2.0),
        ("dcptrace --no-state", "python -c pass", None),
        ("dcptrace --trace", "python -c pass", 2.5),
        ("dcptrace --record", "python -c pass", 2.5),
        ("dcptrace --summary", "python -c pass", 2.5),
        ("dcptrace", "strace -f", None),
        ("dcptrace", "native true", None),
    ])  # fmt: skip
    if not args.no_dd:
        dd = ["dd", "if=/dev/zero", "of=/dev/null", "bs=1", f"count={args.dd}"]
        calls = path_calls()
        steady = {
            "native dd": dd,
            "dcptrace dd": [*DCPTRACE, "--", *dd],
            "strace --seccomp-bpf paths dd": [
                "strace", "-f", "--seccomp-bpf", "-e", f"trace={calls}", "-o", "/dev/null", *dd
            ],
            "dcptrace --map dd": [*DCPTRACE, "--map", f"/mapped={work}", "--", *dd],
        }  # fmt: skip
        print(f"steady state (dd bs=1 count={args.dd}; --map intercepts {calls.count(',') + 1} "
              "path calls, strace the same set):")  # fmt: skip
        times = rounds(steady, env, args.dd_runs)
        show(times, [
            ("dcptrace dd", "native dd", 1.0),
            ("dcptrace --map dd", "strace --seccomp-bpf paths dd", 1.0),
            ("dcptrace --map dd", "native dd", None),
        ])  # fmt: skip
        native = statistics.median(wall(times, "native dd"))
        steady_state = (statistics.median(wall(times, "dcptrace dd")) - fixed) / native
        print(f"  dcptrace dd / native dd with dcptrace's start-up ({1000 * fixed:.1f} ms) "
              f"taken off, medians: {steady_state:.3f}")  # fmt: skip
    shutil.rmtree(work, ignore_errors=True)
    shutil.rmtree(data, ignore_errors=True)


if __name__ == "__main__":
    main()
