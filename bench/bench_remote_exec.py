"""Benchmark: extra latency of a remote exec, and forwarded stdio throughput.

    PYTHONPATH=$PWD python bench/bench_remote_exec.py [--runs 200] [--megabytes 1024]

- local: fork+exec+wait of /bin/true (posix_spawn from this process);
- remote: the same, but the process exec'd is the home deputy, which has the
  agent of a local instance run /bin/true and mirrors its exit (what a placed
  execve costs: deputy start, ticket check, remote fork+exec, exit status);
- throughput: a remote `head -c N /dev/zero` streamed through agent and deputy
  into a pipe this process drains (output direction), and N bytes written into
  the deputy's stdin and consumed remotely by `cat > /dev/null` (input
  direction); a native pipe is measured as reference.

Targets (issue 4): extra latency < 20 ms on local instances; >= 500 MB/s.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from vmagent.cluster.local import Instance, LocalCluster  # noqa: E402
from vmagent.exec.remote import TicketDrop, deputy_command, interpreter, ticket_for_self  # noqa: E402

PY = os.fsdecode(interpreter())


def spawn_wait(path: str, argv: list[str], **kw: object) -> int:
    pid = os.posix_spawn(path, argv, os.environ, **kw)  # type: ignore[arg-type]
    return os.waitpid(pid, 0)[1]


DROP = TicketDrop()


def deputy(inst: Instance, *argv: str) -> list[str]:
    path = os.fsencode(argv[0])
    args = tuple(os.fsencode(a) for a in argv)
    ticket = ticket_for_self(inst.token, inst.name, path, args)
    return deputy_command(DROP, inst.address, inst.name, ticket, path, args)


def latency(runs: int, inst: Instance) -> tuple[list[float], list[float]]:
    local, remote = [], []
    for _ in range(10):  # warm caches
        spawn_wait("/bin/true", ["true"])
        spawn_wait(PY, deputy(inst, "/bin/true"))
    for _ in range(runs):
        t = time.perf_counter()
        assert spawn_wait("/bin/true", ["true"]) == 0
        local.append(time.perf_counter() - t)
        cmd = deputy(inst, "/bin/true")
        t = time.perf_counter()
        assert spawn_wait(PY, cmd) == 0
        remote.append(time.perf_counter() - t)
    return local, remote


def drain(cmd: list[str], nbytes: int) -> float:
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stdin=subprocess.DEVNULL)
    assert proc.stdout is not None
    fd = proc.stdout.fileno()
    got = 0
    t = time.perf_counter()
    while chunk := os.read(fd, 1 << 20):
        got += len(chunk)
    proc.wait()
    elapsed = time.perf_counter() - t
    assert got == nbytes, (got, nbytes)
    return nbytes / elapsed / 1e6


def feed(cmd: list[str], nbytes: int) -> float:
    proc = subprocess.Popen(cmd, stdin=subprocess.PIPE)
    assert proc.stdin is not None
    block = bytes(1 << 20)
    t = time.perf_counter()
    for _ in range(nbytes >> 20):
        proc.stdin.write(block)
    proc.stdin.close()
    assert proc.wait() == 0
    return nbytes / (time.perf_counter() - t) / 1e6


def under_dcptrace(runs: int) -> tuple[float, float]:
    """Seconds per exec of /bin/true in a bash loop: dcptrace alone vs --instances 2."""
    root = str(Path(__file__).resolve().parents[1])
    env = dict(os.environ, PYTHONPATH=root)
    loop = f"for i in $(seq {runs}); do /bin/true; done"
    out = []
    for extra in ([], ["--instances", "2"]):
        cmd = [sys.executable, "-m", "tracer.cli", *extra, "--", "bash", "-c", loop]
        base = [sys.executable, "-m", "tracer.cli", *extra, "--", "bash", "-c", "true"]
        t = time.perf_counter()
        subprocess.run(base, check=True, env=env, stderr=subprocess.DEVNULL)
        fixed = time.perf_counter() - t
        t = time.perf_counter()
        subprocess.run(cmd, check=True, env=env, stderr=subprocess.DEVNULL)
        out.append((time.perf_counter() - t - fixed) / runs)
    return out[0], out[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=200)
    parser.add_argument("--megabytes", type=int, default=1024)
    args = parser.parse_args()
    nbytes = args.megabytes << 20
    with LocalCluster(1) as cluster:
        inst = cluster.instances[0]
        where = "namespaced" if inst.isolated else "plain (not root)"
        print(f"instance {inst.name} at {inst.address} ({where}); {os.cpu_count()} CPUs")
        local, remote = latency(args.runs, inst)
        lm, rm = statistics.median(local) * 1e3, statistics.median(remote) * 1e3
        r95 = sorted(remote)[int(len(remote) * 0.95)] * 1e3
        print(f"fork+exec /bin/true, local : median {lm:6.2f} ms  (n={args.runs})")
        print(f"fork+exec /bin/true, remote: median {rm:6.2f} ms  p95 {r95:6.2f} ms")
        print(
            f"extra latency of a remote exec: {rm - lm:6.2f} ms (target < 20 ms) "
            f"-> {'OK' if rm - lm < 20 else 'MISSED'}"
        )
        native = drain(["head", "-c", str(nbytes), "/dev/zero"], nbytes)
        out = drain(deputy(inst, "/usr/bin/head", "-c", str(nbytes), "/dev/zero"), nbytes)
        inp = feed(deputy(inst, "/bin/sh", "-c", "cat > /dev/null"), nbytes)
        print(f"stdout, native pipe         : {native:8.0f} MB/s")
        print(
            f"stdout, remote -> deputy    : {out:8.0f} MB/s  ({out / native:.2f}x native) "
            f"-> {'OK' if out >= 500 else 'MISSED'} (target >= 500)"
        )
        print(
            f"stdin,  deputy -> remote    : {inp:8.0f} MB/s  ({inp / native:.2f}x native) "
            f"-> {'OK' if inp >= 500 else 'MISSED'} (target >= 500)"
        )
        cluster.remove_logs()
    DROP.close()
    if (Path(__file__).resolve().parents[1] / "tracer" / "cli.py").exists():
        alone, placed = under_dcptrace(min(args.runs, 100))
        print(
            f"per exec in a traced bash loop: dcptrace {alone * 1e3:6.2f} ms, "
            f"dcptrace --instances 2 {placed * 1e3:6.2f} ms "
            f"(+{(placed - alone) * 1e3:.2f} ms per remote exec)"
        )


if __name__ == "__main__":
    main()
