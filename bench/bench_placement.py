"""Benchmark: the placement cost model on a corpus of workloads (issue 15).

    PYTHONPATH=$PWD python bench/bench_placement.py [--rounds 3] [--only NAME ...]

Each workload runs four ways, interleaved round by round so that load from other
work on the machine hits all alike:

- native;
- dcptrace: `dcptrace --no-state -- ...` (the baseline the target is set against);
- auto: `dcptrace --no-state --instances 3 -- ...` (the default: the cost model);
- spread: `dcptrace --no-state --instances 3 --placement spread -- ...` (every
  placeable exec placed: what `--instances 3` did before the cost model).

Workloads: `--instances 3 -- true` (start-up), make -j6 of
tests/integration/cproject.py's project, a git script, 900 posix_spawn of
/bin/true, shell pipelines, python multiprocessing (spawn), a `#!/usr/bin/env`
script, and a parallel CPU-bound job (4 processes of ~0.5 s of CPU each).
Prints min / median wall seconds per way and, per workload, the ratio
auto / dcptrace and spread / dcptrace (median of the per-round ratios, and the
min), with the target (auto at most 1.2x dcptrace).
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests" / "integration"))
sys.path.insert(0, str(ROOT / "bench"))

from cproject import generate  # noqa: E402
from rounds import interleaved  # noqa: E402

PY = sys.executable
DCPTRACE = [PY, "-m", "tracer.cli", "--no-state"]
WAYS = {
    "native": [],
    "dcptrace": DCPTRACE,
    "auto": [*DCPTRACE, "--instances", "3"],
    "spread": [*DCPTRACE, "--instances", "3", "--placement", "spread"],
}

SPAWN = """
import os
for _ in range(900):
    pid = os.posix_spawn("/bin/true", ["true"], os.environ)
    os.waitpid(pid, 0)
"""
MULTI = """
import multiprocessing as mp
def f(n):
    return sum(i * i for i in range(n))
if __name__ == "__main__":
    with mp.get_context("spawn").Pool(4) as p:
        print(sum(p.map(f, [200000] * 16)))
"""
BUSY = "import sys; n = int(sys.argv[1]); print(sum(i * i for i in range(n)))"
GIT = """
set -e
rm -rf repo && git init -q repo && cd repo
git config user.email b@e.x && git config user.name bench
for i in $(seq 15); do
  echo "line $i" >> f.txt && git add f.txt && git commit -q -m "c$i"
done
git log --oneline | wc -l
git status --short
git diff HEAD~3 --stat | tail -1
"""
PIPES = "for i in $(seq 150); do echo $i | tr 0-9 a-j | sort | wc -c >/dev/null; done; echo ok"
ENV_SCRIPT = "#!/usr/bin/env python3\nprint('hello')\n"


def workloads(tmp: Path) -> dict[str, tuple[list[str], Path, list[str] | None]]:
    """name -> (argv, cwd, command run before each try or None)."""
    proj = generate(tmp / "proj", units=12)
    (tmp / "multi.py").write_text(MULTI)
    script = tmp / "hello.py"
    script.write_text(ENV_SCRIPT)
    script.chmod(0o755)
    many = " ".join([f"{script}"] * 20)
    busy = f"for i in 1 2 3 4; do {PY} -c '{BUSY}' 3000000 & done; wait"
    return {
        "true (start-up)": (["true"], tmp, None),
        "make -j6": (["make", "-j6"], proj, ["make", "clean"]),
        "git script": (["sh", "-c", GIT], tmp, None),
        "posix_spawn x900": ([PY, "-c", SPAWN], tmp, None),
        "shell pipelines": (["sh", "-c", PIPES], tmp, None),
        "multiprocessing": ([PY, str(tmp / "multi.py")], tmp, None),
        "env scripts x20": (["sh", "-c", f"for s in {many}; do $s; done"], tmp, None),
        "parallel cpu x4": (["sh", "-c", busy], tmp, None),
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--only", nargs="*", help="workload names (prefixes) to run")
    ap.add_argument("--spread", action="store_true", help="also --placement spread")
    args = ap.parse_args()
    if shutil.which("make") is None or shutil.which("git") is None:
        raise SystemExit("needs make, cc and git")
    ways = {k: v for k, v in WAYS.items() if k != "spread" or args.spread}
    with tempfile.TemporaryDirectory(prefix="dcp-bench-place-") as tmpname:
        tmp = Path(tmpname)
        loads = workloads(tmp)
        if args.only:
            loads = {k: v for k, v in loads.items() if any(k.startswith(o) for o in args.only)}
        print(f"load before: {open('/proc/loadavg').read().strip()}", flush=True)
        interleaved(loads, 1)  # warm the page cache
        cases = {
            (name, way): ([*prefix, "--", *argv] if prefix else argv, cwd, before)
            for name, (argv, cwd, before) in loads.items()
            for way, prefix in ways.items()
        }
        times = interleaved(cases, args.rounds, progress=True)
        print(f"load after:  {open('/proc/loadavg').read().strip()}")
        compared = [w for w in ways if w not in ("native", "dcptrace")]
        print(
            f"{'workload':20s}"
            + "".join(f"{w:>16s}" for w in ways)
            + "".join(f"{w + '/dcptrace':>24s}" for w in compared)
        )
        for name in loads:
            cells = []
            for way in ways:
                t = times[(name, way)]
                cells.append(f"{min(t):6.2f}/{statistics.median(t):6.2f} s")
            base = times[(name, "dcptrace")]
            ratios = []
            for way in compared:
                rs = [a / b for a, b in zip(times[(name, way)], base, strict=True)]
                ratios.append(f"{statistics.median(rs):5.2f}x (min {min(rs):4.2f})")
            print(
                f"{name:20s}"
                + "".join(f"{c:>16s}" for c in cells)
                + "".join(f"{r:>24s}" for r in ratios)
            )
        print(
            "cells: min/median wall seconds; ratios: median (min) of per-round ratios;"
            " target auto/dcptrace <= 1.20x"
        )


if __name__ == "__main__":
    main()
