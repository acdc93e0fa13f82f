"""Benchmark: extra latency of a remote exec, and forwarded stdio throughput.

    PYTHONPATH=$PWD python bench/bench_remote_exec.py [--runs 200] [--megabytes 1024]
                                                      [--tracer-only]

- local: fork+exec+wait of /bin/true (posix_spawn from this process);
- remote: the same, but the process exec'd is the home deputy, which has the
  agent of a local instance run /bin/true and mirrors its exit (what a placed
  execve costs: deputy start, ticket check, remote fork+exec, exit status);
- throughput: a remote `head -c N /dev/zero` streamed through agent and deputy
  into a pipe this process drains (output direction), and N bytes written into
  the deputy's stdin and consumed remotely by `cat > /dev/null` (input
  direction); a native pipe is measured as reference;
- instance tracer: remote /bin/true on two plain agents on loopback, one as
  `dcp-agent` runs (every program under its instance tracer) and one built
  untraced (the agent's internal switch, for this baseline only), interleaved.

Targets (issue 4): extra latency < 20 ms on local instances; >= 500 MB/s.
Target (issue 10): a traced remote exec within 5 ms of an untraced one.
"""

from __future__ import annotations

import argparse
import os
import signal
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from vmagent.cluster.local import Instance, LocalCluster  # noqa: E402
from vmagent.exec.remote import TicketDrop, deputy_command, interpreter, ticket_for_self  # noqa: E402

PY = os.fsdecode(interpreter())


def spawn_wait(path: str, argv: list[str], **kw: object) -> int:
    pid = os.posix_spawn(path, argv, os.environ, **kw)  # type: ignore[arg-type]
    return os.waitpid(pid, 0)[1]


DROP = TicketDrop()


@dataclass(frozen=True)
class Plain:
    """An agent this benchmark started itself (name, token, address as `Instance`)."""

    name: str
    token: str
    address: str
    proc: subprocess.Popen[bytes]


# An agent as `dcp-agent` builds it (zygote forked before the loop), or untraced.
AGENT_BOOT = """
import asyncio, signal, sys
sys.path.insert(0, sys.argv[4])
from vmagent.agent import Agent
from vmagent.config import AgentConfig, read_token
from vmagent.trace.zygote import Tracing
name, fd, traced = sys.argv[1], int(sys.argv[2]), sys.argv[3] == "1"
config = AgentConfig(
    instance=name, token=read_token(None, fd), listen_host="127.0.0.1", listen_port=0
)
tracing = Tracing.fork(name) if traced else None
async def serve():
    agent = Agent(config, tracing, untraced=not traced)
    print("listening", await agent.start(), flush=True)
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    await stop.wait()
    await agent.close()
asyncio.run(serve())
"""


def plain_agent(name: str, traced: bool) -> Plain:
    token = os.urandom(18).hex()
    r, w = os.pipe()
    os.write(w, token.encode())
    os.close(w)
    root = str(Path(__file__).resolve().parents[1])
    proc = subprocess.Popen(
        [PY, "-c", AGENT_BOOT, name, str(r), "1" if traced else "0", root],
        stdout=subprocess.PIPE,
        pass_fds=(r,),
    )
    os.close(r)
    assert proc.stdout is not None
    line = proc.stdout.readline().decode().split()
    assert line[:1] == ["listening"], line
    return Plain(name, token, line[1], proc)


def figures(samples: list[float]) -> tuple[float, float, float]:
    """(min, p10, median) in ms."""
    ordered = sorted(samples)
    return ordered[0] * 1e3, ordered[len(ordered) // 10] * 1e3, statistics.median(ordered) * 1e3


def traced_vs_untraced(runs: int) -> None:
    """Remote /bin/true under the instance tracer vs untraced, interleaved."""
    with open("/proc/loadavg") as f:
        print(f"load before: {f.read().strip()}")
    traced, untraced = plain_agent("traced", True), plain_agent("untraced", False)
    times: dict[str, list[float]] = {"traced": [], "untraced": []}
    try:
        for i in range(runs + 10):
            for agent in (traced, untraced) if i % 2 else (untraced, traced):
                cmd = deputy(agent, "/bin/true")
                t = time.perf_counter()
                assert spawn_wait(PY, cmd) == 0
                if i >= 10:  # the first rounds warm caches
                    times[agent.name].append(time.perf_counter() - t)
    finally:
        for agent in (traced, untraced):
            agent.proc.send_signal(signal.SIGTERM)
            agent.proc.wait()
    with open("/proc/loadavg") as f:
        print(f"load after : {f.read().strip()}")
    t_fig, u_fig = figures(times["traced"]), figures(times["untraced"])
    for name, fig in (("untraced", u_fig), ("traced", t_fig)):
        print(
            f"remote /bin/true, {name:8s}: min {fig[0]:6.2f}  p10 {fig[1]:6.2f}  "
            f"median {fig[2]:6.2f} ms  (n={runs}, interleaved)"
        )
    diff = [t - u for t, u in zip(t_fig, u_fig, strict=True)]
    print(
        f"traced - untraced: min {diff[0]:+.2f}  p10 {diff[1]:+.2f}  median {diff[2]:+.2f} ms; "
        f"ratio of medians {t_fig[2] / u_fig[2]:.2f}x -> "
        f"{'OK' if diff[2] <= 5 else 'MISSED'} (target <= 5 ms apart)"
    )


def deputy(inst: Instance | Plain, *argv: str) -> list[str]:
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
    parser.add_argument(
        "--tracer-only", action="store_true", help="only the traced vs untraced comparison"
    )
    args = parser.parse_args()
    traced_vs_untraced(args.runs)
    if args.tracer_only:
        DROP.close()
        return
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
