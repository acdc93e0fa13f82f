"""Benchmark: what `dcptrace --oss` adds per remote exec.

    PYTHONPATH=$PWD python bench/bench_ossexec.py [--runs 200] [--execs 40]

Starts a real `dcp-oss serve` (loopback, temporary data directory) and two
loopback agents registered with it, then measures:
- placement: one `POST /v1/programs/{id}/placements {"processes": 1}` (the
  OSS scheduler, the SQLite group commit, one exec ticket) plus its release,
  through the same client and private loop dcptrace uses (`OssProgramLink`);
- per exec, end to end: the wall time of a `dcptrace` run whose shell runs
  `/bin/true` N times in sequence, minus the wall time of the same run with 0
  execs, divided by N; `--oss URL` against `--instances 2` (local instances,
  whose coordinator mints tickets itself).
Prints figures only; nothing is asserted.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from vmagent.cluster.coordinator import Ident  # noqa: E402
from vmagent.cluster.ossmode import OssModeConfig, OssProgramLink  # noqa: E402

ENV = dict(os.environ, PYTHONPATH=str(ROOT))


def cli(data: Path, *args: str) -> str:
    return subprocess.run(
        [sys.executable, "-m", "oss", *args, "--data", str(data)],
        capture_output=True, check=True, env=ENV,
    ).stdout.decode().strip()  # fmt: skip


def start(procs: list[subprocess.Popen[bytes]], *argv: str) -> str:
    p = subprocess.Popen(
        [sys.executable, "-m", *argv], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env=ENV
    )
    procs.append(p)
    assert p.stdout is not None
    return p.stdout.readline().decode()


def dcptrace_wall(options: list[str], execs: int, token: str) -> float:
    script = f"i=0; while [ $i -lt {execs} ]; do /bin/true; i=$((i+1)); done"
    env = dict(ENV, DCP_TOKEN=token)
    t = time.perf_counter()
    subprocess.run(
        [sys.executable, "-m", "tracer.cli", "--no-state", *options, "--", "sh", "-c", script],
        check=True, env=env, stdout=subprocess.DEVNULL,
    )  # fmt: skip
    return time.perf_counter() - t


def per_exec(options: list[str], execs: int, token: str) -> float:
    base = statistics.median(dcptrace_wall(options, 0, token) for _ in range(3))
    full = statistics.median(dcptrace_wall(options, execs, token) for _ in range(3))
    return (full - base) / execs


def token_file(directory: Path, token: str) -> str:
    """A 0600 file holding an instance token (agents never take one on argv)."""
    fd, path = tempfile.mkstemp(prefix="token-", dir=directory)
    with os.fdopen(fd, "w") as f:
        f.write(token)
    return path


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=200)
    ap.add_argument("--execs", type=int, default=40)
    args = ap.parse_args()
    procs: list[subprocess.Popen[bytes]] = []
    with tempfile.TemporaryDirectory(prefix="dcp-bench-ossexec-") as tmp:
        data = Path(tmp)
        try:
            # The bench runs as root: its placed execs run as uid 0, which the operator allows.
            token = cli(data, "account", "create", "--allow-root", "bench")
            line = start(procs, "oss", "serve", "--listen", "127.0.0.1:0", "--data", str(data))
            url = line.split("listening on ", 1)[1].strip()
            for n in ("b0", "b1"):
                itok = cli(data, "instance-token", n)
                start(procs, "vmagent", "--oss", url, "--instance", n,
                      "--token-file", token_file(data, itok),
                      "--listen", "127.0.0.1:0")  # fmt: skip
            time.sleep(1.0)  # registration
            link = OssProgramLink(OssModeConfig.load(url, "spread", {"DCP_TOKEN": token}))
            link.start(link.check())
            link.submit(["bench"], "/")
            ident = Ident(1000, 1000, (), "0" * 64)  # what a placed exec's ticket is bound to
            times = []
            for _ in range(args.runs):
                t = time.perf_counter()
                grant = link.place([], ident)
                assert grant is not None
                times.append(time.perf_counter() - t)
                link.release(grant.instance)
                link._bridge.drain(10)  # releases are background work: keep runs apart
            link.finish(0, None)
            link.close()
            times.sort()
            print(
                f"placement + ticket, {args.runs} runs: median {statistics.median(times) * 1e3:.2f}"
                f" ms, p95 {times[int(len(times) * 0.95)] * 1e3:.2f} ms"
            )
            oss = per_exec(["--oss", url], args.execs, token)
            local = per_exec(["--instances", "2"], args.execs, token)
            print(f"per remote exec, end to end ({args.execs} sequential /bin/true):")
            print(f"  --oss URL      {oss * 1e3:.1f} ms")
            print(f"  --instances 2  {local * 1e3:.1f} ms")
            print(f"  OSS mode adds  {(oss - local) * 1e3:.1f} ms per exec")
        finally:
            for p in procs:
                p.terminate()
            for p in procs:
                p.wait(10)


if __name__ == "__main__":
    main()
