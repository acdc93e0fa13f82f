"""Benchmark the telemetry path: an agent's reporter + uplink against a real `dcp-oss serve`.

Feeds synthetic placed processes through the agent's real `Reporter` hooks (as the
exec service and the instance tracer call them: started, two output lines, exec
event, final usage, exit event, ended, settle) at a target rate, and the real
`Uplink` posts them to a real `dcp-oss serve` (subprocess, loopback) as
`POST /v1/agents/report` batches.  Reports:

- agent CPU per process (reporter + uplink + HTTP client, this process's CPU time
  over the processes fed);
- whether the OSS keeps up at the rate: batches, rows applied per second, the
  backlog at the end, the OSS process's CPU share;
- the hooks alone (no network): microseconds per process, best of 5.

    PYTHONPATH=. python3 bench/bench_telemetry.py --rate 1000 --seconds 10

No timed assertions; figures go in docs/BENCHMARKS.md with `cat /proc/loadavg`.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from vmagent.exec import protocol as P  # noqa: E402
from vmagent.telemetry import reporter as rep  # noqa: E402
from vmagent.telemetry.uplink import HttpPost, Uplink  # noqa: E402


@dataclass
class Req:
    argv: tuple[bytes, ...] = (b"cc", b"-c", b"a.c", b"-o", b"a.o")
    parent: bytes = b"home:1"


@dataclass
class Sess:
    sid: bytes
    pid: int
    program_id: str
    request: Req = field(default_factory=Req)
    finished: bool = True
    outs: dict[int, int] = field(default_factory=dict)


def one_process(r: rep.Reporter, program: str, n: int) -> None:
    """Everything the agent learns about one short placed process."""
    s: Any = Sess(n.to_bytes(8, "big"), 10_000 + n, program)
    pid = str(s.pid).encode()
    r.started(s)
    r.trace_message(
        s,
        {b"op": b"event", b"kind": b"exec", b"pid": pid, b"ts": b"1.0",
         b"argv": P.record(list(s.request.argv))},
    )  # fmt: skip
    r.output(s, 1, b"compiling a.c\n")
    r.output(s, 2, b"a.c:1: warning: unused\n")
    r.trace_message(
        s,
        {b"op": b"usage", b"pid": pid, b"final": b"1", b"cpu_us": b"12000",
         b"maxrss_kb": b"8000", b"rchar": b"40960", b"wchar": b"2048", b"rbytes": b"0",
         b"wbytes": b"4096", b"sys": b"storage=40,memory=12,compute=3"},
    )  # fmt: skip
    r.trace_message(s, {b"op": b"event", b"kind": b"exit", b"pid": pid, b"status": b"0"})
    r.ended(s, 0)
    r._settle(s)


def http(url: str, path: str, token: str, body: Any = None) -> Any:
    req = urllib.request.Request(
        url + path,
        data=None if body is None else json.dumps(body).encode(),
        headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"},
        method="GET" if body is None else "POST",
    )
    with urllib.request.urlopen(req, timeout=30) as resp:
        return json.loads(resp.read())


def cli(data: Path, *args: str) -> str:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    out = subprocess.run(
        [sys.executable, "-m", "oss", *args, "--data", str(data)],
        capture_output=True, text=True, env=env, check=True,
    )  # fmt: skip
    return out.stdout.strip()


def cpu_of(pid: int) -> float:
    f = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(f[11]) + int(f[12])) / os.sysconf("SC_CLK_TCK")


def hooks_alone(n: int) -> float:
    """Microseconds per process of the reporter hooks with the uplink only queueing."""

    async def go() -> float:
        async def never(raw: bytes) -> dict[str, Any]:
            return {}

        best = float("inf")
        for _ in range(5):
            up = Uplink("b", never, interval=3600, batch_items=10**9)
            r = rep.Reporter(up)
            t = time.perf_counter()
            for i in range(n):
                one_process(r, "prog_x", i)
            best = min(best, (time.perf_counter() - t) / n * 1e6)
        return best

    return asyncio.run(go())


async def run_at_rate(url: str, itoken: str, program: str, rate: int, seconds: float) -> dict:
    post = HttpPost(url, itoken, 30.0)
    up = Uplink("bench1", post)
    r = rep.Reporter(up)
    task = asyncio.create_task(up.run())
    cpu0 = time.process_time()
    t0 = time.monotonic()
    fed = 0
    try:
        while (elapsed := time.monotonic() - t0) < seconds:
            due = int(elapsed * rate)
            while fed < due:
                one_process(r, program, fed)
                fed += 1
            await asyncio.sleep(0.005)
        backlog = up.waiting
        drained = await up.drain(60)
        wall = time.monotonic() - t0
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await post.close()
    return dict(
        fed=fed, backlog_at_end=backlog, drained=drained, wall=wall,
        agent_cpu_us_per_process=(time.process_time() - cpu0) / fed * 1e6,
        batches=up.sent_batches, dropped=up.dropped, refused=up.refused,
    )  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rate", type=int, default=1000, help="processes per second")
    ap.add_argument("--seconds", type=float, default=10.0)
    args = ap.parse_args()
    print(f"hooks alone: {hooks_alone(5000):.1f} us per process (best of 5 x 5000)")
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "oss"
        token = cli(data, "account", "create", "bench")
        itoken = cli(data, "instance-token", "bench1")
        env = dict(os.environ, PYTHONPATH=str(ROOT))
        srv = subprocess.Popen(
            [sys.executable, "-m", "oss", "serve", "--listen", "127.0.0.1:0", "--data",
             str(data), "--tick", "1"],
            stdout=subprocess.PIPE, text=True, env=env,
        )  # fmt: skip
        try:
            assert srv.stdout is not None
            line = srv.stdout.readline()
            url = line.split("listening on ", 1)[1].strip()
            http(url, "/v1/agents/register", itoken, {
                "instance": "bench1", "address": "127.0.0.1:1", "hostname": "b", "cpus": 64,
                "memory_mb": 1024})  # fmt: skip
            prog = http(url, "/v1/programs", token, {"argv": ["make"]})
            oss_cpu0 = cpu_of(srv.pid)
            res = asyncio.run(run_at_rate(url, itoken, prog["id"], args.rate, args.seconds))
            res["oss_cpu_share"] = (cpu_of(srv.pid) - oss_cpu0) / res["wall"]
            got = http(url, f"/v1/programs/{prog['id']}/metrics", token)
            res["oss_cpu_seconds_recorded"] = round(got["cpu_seconds"], 3)
            res["oss_processes_recorded"] = len(got["by_process"])
        finally:
            srv.terminate()
            srv.wait(30)
    for k, v in res.items():
        print(f"{k}: {round(v, 3) if isinstance(v, float) else v}")
    print(f"loadavg: {Path('/proc/loadavg').read_text().strip()}")


if __name__ == "__main__":
    main()
