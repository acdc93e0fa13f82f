"""Benchmark one `dcp-oss serve` under abuse: /healthz latency and RSS while tenants misbehave.

The abuse of issue 8, replayed against a real server on loopback, each kind
from its own process so the server's loop is the only thing measured:

* metric-key flood: a tenant posting reports with 10,000 (and 2,000) new keys;
* log readers: four tenants reading `limit=1` of a large log, over and over,
  and one paging through it with a big page;
* connections: 300 idle connections (reopened when the server closes them)
  and 20 slowloris connections sending one header byte a second;
* an admin scraping `/metrics` in a loop.

A prober measures `/healthz` (p50/p99 over N probes, one keep-alive
connection) first without abuse (the baseline), then while the abuse runs; the
server's RSS is sampled before, during (peak) and after.

    PYTHONPATH=. python3 bench/bench_abuse.py --probes 1000 --log-mb 100

Prints a table; figures go in docs/BENCHMARKS.md.  No timed assertions.
"""

from __future__ import annotations

import argparse
import http.client
import json
import multiprocessing as mp
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
LINE = "x" * 80  # one log line's text
LINES_PER_APPEND = 4096
ATTACKER = "127.0.0.2"  # source address of the connection abuse


def pct(xs: list[float], q: float) -> float:
    """The q-quantile (0..1) of xs (seconds), in milliseconds."""
    s = sorted(xs)
    return 1000 * s[min(len(s) - 1, int(q * len(s)))] if s else float("nan")


def rss(pid: int) -> int:
    """Resident set size of `pid`, bytes."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def start_server(data: Path) -> tuple[subprocess.Popen[str], str]:
    """`dcp-oss serve` with its default limits; its URL."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    admin = subprocess.run(
        [sys.executable, "-m", "oss", "account", "create", "--admin", "--data", str(data), "root"],
        env=env, capture_output=True, text=True, check=True,
    ).stdout.strip()  # fmt: skip
    proc = subprocess.Popen(
        [sys.executable, "-m", "oss", "serve", "--listen", "127.0.0.1:0", "--data", str(data)],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
    )  # fmt: skip
    assert proc.stdout is not None
    line = proc.stdout.readline()
    if "listening on" not in line:
        proc.kill()
        raise SystemExit(f"dcp-oss did not start: {line!r}")
    return proc, line.split()[-1] + " " + admin


class Http:
    """A keep-alive JSON client (stdlib), reconnecting when the server closes."""

    def __init__(self, url: str, token: str | None = None) -> None:
        host, port = url.removeprefix("http://").rsplit(":", 1)
        self.host, self.port, self.token = host, int(port), token
        self.conn = http.client.HTTPConnection(self.host, self.port, timeout=120)

    def call(self, method: str, path: str, body: Any = None) -> tuple[int, bytes]:
        headers = {"Content-Type": "application/json"}
        if self.token:
            headers["Authorization"] = f"Bearer {self.token}"
        data = None if body is None else json.dumps(body).encode()
        for attempt in (0, 1):
            try:
                self.conn.request(method, path, body=data, headers=headers)
                resp = self.conn.getresponse()
                return resp.status, resp.read()
            except (OSError, http.client.HTTPException):
                self.conn.close()
                self.conn = http.client.HTTPConnection(self.host, self.port, timeout=120)
                if attempt:
                    raise
        raise AssertionError("unreachable")


# -- abuse (each in its own process) -----------------------------------------------


def metric_flood(url: str, token: str, prog: str, stop: Any, out: Any) -> None:
    c = Http(url, token)
    sent = refused = i = 0
    while not stop.is_set():
        n = 10_000 if i % 2 else 2_000
        keys = {f"k{i}_{j}": 1 for j in range(n)}
        try:
            status, _ = c.call("POST", f"/v1/programs/{prog}/metrics", {"syscalls": keys})
        except OSError:  # refused and closed while the body was still being sent
            status = 413
        sent += 1
        refused += status in (413, 422)
        i += 1
    out.put(("metric reports (new keys) sent / refused", f"{sent} / {refused}"))


def log_readers(url: str, token: str, prog: str, stop: Any, out: Any) -> None:
    counts = [0] * 5

    def small(k: int) -> None:
        c = Http(url, token)
        while not stop.is_set():
            c.call("GET", f"/v1/programs/{prog}/logs?limit=1")
            counts[k] += 1

    def pager() -> None:
        c = Http(url, token)
        cursor = 0
        while not stop.is_set():
            _, raw = c.call("GET", f"/v1/programs/{prog}/logs?limit=10000&cursor={cursor}")
            page = json.loads(raw)
            cursor = page["cursor"] if page["lines"] else 0
            counts[4] += 1

    ts = [threading.Thread(target=small, args=(k,)) for k in range(4)]
    ts.append(threading.Thread(target=pager))
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    out.put(("log reads limit=1 (4 readers) / pages of 10,000", f"{sum(counts[:4])} / {counts[4]}"))


def connections(url: str, idle: int, slow: int, stop: Any, out: Any) -> None:
    # From another loopback address than the tenants' (as an attacker's host would be):
    # the per-address connection cap is what keeps room for everyone else.
    host, port = url.removeprefix("http://").rsplit(":", 1)
    addr = (host, int(port))
    opened = closed = 0
    conns: list[socket.socket] = []
    slows: list[socket.socket] = []

    def connect() -> socket.socket | None:
        nonlocal opened
        try:
            s = socket.create_connection(addr, timeout=5, source_address=(ATTACKER, 0))
        except OSError:
            return None
        s.setblocking(False)
        opened += 1
        return s

    def dead(s: socket.socket) -> bool:
        try:
            return s.recv(1) == b""
        except BlockingIOError:
            return False
        except OSError:
            return True

    while not stop.is_set():
        for group, want, start in ((conns, idle, b""), (slows, slow, b"GET /healthz HTTP/1.1\r\n")):
            for s in list(group):
                if dead(s):
                    group.remove(s)
                    s.close()
                    closed += 1
                else:
                    try:
                        if group is slows:
                            s.send(b"a")  # one header byte a second
                    except OSError:
                        group.remove(s)
                        s.close()
                        closed += 1
            while len(group) < want and not stop.is_set():
                s = connect()
                if s is None:
                    break
                if start:
                    try:
                        s.send(start + b"X-Slow: ")
                    except OSError:
                        pass
                group.append(s)
        stop.wait(1.0)
    for s in conns + slows:
        s.close()
    out.put(("connections opened / closed by the server", f"{opened} / {closed}"))


def scraper(url: str, admin: str, stop: Any, out: Any) -> None:
    c = Http(url, admin)
    n = size = 0
    while not stop.is_set():
        _, raw = c.call("GET", "/metrics")
        n += 1
        size = max(size, len(raw))
        stop.wait(0.2)
    out.put(("admin /metrics scrapes / largest (KB)", f"{n} / {size // 1024}"))


def probe(url: str, n: int, interval: float, out: Any) -> None:
    c = Http(url)
    lat = []
    for _ in range(n):
        t0 = time.perf_counter()
        status, _ = c.call("GET", "/healthz")
        lat.append(time.perf_counter() - t0)
        assert status == 200
        time.sleep(interval)
    out.put(lat)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--probes", type=int, default=1000, help="/healthz probes per phase")
    ap.add_argument("--interval", type=float, default=0.01, help="seconds between probes")
    ap.add_argument("--log-mb", type=int, default=100, help="size of the big log (raw text MB)")
    ap.add_argument("--idle", type=int, default=300, help="idle connections held")
    ap.add_argument("--slow", type=int, default=20, help="slowloris connections held")
    args = ap.parse_args()

    mp.set_start_method("spawn")
    tmp = Path(tempfile.mkdtemp(prefix="dcp-bench-abuse-"))
    proc, both = start_server(tmp / "data")
    url, admin = both.split()
    try:
        ha = Http(url, admin)
        tenant = json.loads(ha.call("POST", "/v1/accounts", {"name": "tenant"})[1])["token"]
        tc = Http(url, tenant)
        prog = json.loads(tc.call("POST", "/v1/programs", {"argv": ["true"]})[1])["id"]
        lines = args.log_mb * 1_000_000 // (len(LINE) + 10)
        t0 = time.perf_counter()
        for a in range(0, lines, LINES_PER_APPEND):
            batch = [
                {"ts": 1000.0 + a + i, "text": f"{a + i} {LINE}"}
                for i in range(min(LINES_PER_APPEND, lines - a))
            ]
            status, raw = tc.call("POST", f"/v1/programs/{prog}/logs", {"lines": batch})
            assert status == 200, raw
        setup_s = time.perf_counter() - t0

        q: Any = mp.Queue()
        rss_idle = rss(proc.pid)
        p = mp.Process(target=probe, args=(url, args.probes, args.interval, q))
        p.start()
        baseline = q.get(timeout=600)
        p.join()
        rss_before = rss(proc.pid)

        stop = mp.Event()
        abusers = [
            mp.Process(target=metric_flood, args=(url, tenant, prog, stop, q)),
            mp.Process(target=log_readers, args=(url, tenant, prog, stop, q)),
            mp.Process(target=connections, args=(url, args.idle, args.slow, stop, q)),
            mp.Process(target=scraper, args=(url, admin, stop, q)),
        ]
        for a_ in abusers:
            a_.start()
        time.sleep(2.0)  # let the abuse build up
        peak = rss(proc.pid)
        p = mp.Process(target=probe, args=(url, args.probes, args.interval, q))
        p.start()
        while p.is_alive():
            peak = max(peak, rss(proc.pid))
            p.join(0.2)
        under = q.get(timeout=600)
        stop.set()
        results = [q.get(timeout=60) for _ in abusers]
        for a_ in abusers:
            a_.join()
        time.sleep(2.0)
        rss_after = rss(proc.pid)
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        subprocess.run(["rm", "-rf", str(tmp)], check=False)

    mb = 1 << 20
    print(f"big log: {lines} lines, {args.log_mb} MB raw, appended in {setup_s:.1f} s")
    print(f"{'':44} {'p50 ms':>8} {'p99 ms':>8} {'max ms':>8}")
    for name, lat in (("/healthz baseline (no abuse)", baseline), ("/healthz under abuse", under)):
        print(f"{name:44} {pct(lat, 0.5):8.2f} {pct(lat, 0.99):8.2f} {1000 * max(lat):8.2f}")
    print(f"RSS MB: after setup {rss_idle / mb:.0f}, before abuse {rss_before / mb:.0f},"
          f" peak during {peak / mb:.0f}, after {rss_after / mb:.0f}")  # fmt: skip
    for name, value in results:
        print(f"{name:52} {value}")


if __name__ == "__main__":
    main()
