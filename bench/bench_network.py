"""Benchmark the program network (issue 13): redirector vs direct, listen, re-point.

Root only; everything in network namespaces this script makes (and removes).

1. RTT and throughput on a simulated host (one bridge, instances a and b),
   client in a, server in b: directly to b's own address, vs through the
   redirector: the program address P (policy rule + route) and `127.0.0.1`
   (nft DNAT to P, then the rule, SNAT back), and from an outside namespace
   through the host to P vs to b's address.  RTT: p50/p99 of N 64-byte
   ping-pongs on one TCP connection; throughput: MB/s of one connection.
2. listen -> first redirected connection, under `dcptrace --instances 2
   --placement spread`: a server records the time before `listen`, after it
   returns (the tracer waited for the OSS to steer the port) and a client on
   the other instance the time its first `connect` to localhost succeeded.
1b. UDP RTT the same ways (`--skip udp` leaves it out): p50/p99 of N 64-byte
   datagram ping-pongs to a UDP echo server in b bound to 0.0.0.0 (steered
   by protocol and port; the reply comes from P:port through the redirector).
2b. What the instance tracer's watch costs a placed process (`--skip
   connects`): the mean time of a TCP connect+close to a listener of the same
   process, and of a UDP socket+bind(port 0)+close, placed on an instance by
   `dcptrace --instances 1 --placement spread` vs natively (each connect and
   bind now stops once in the instance tracer, as close already did).
3. Re-point after a migration: a TCP server on a local instance migrated with
   CRIU (as tests/integration/test_network_migrate.py); the manager's `moved`
   time and the time to the first connection reaching the moved process.

    PYTHONPATH=. python3 bench/bench_network.py --pings 5000 --mb 200

Prints a table; figures go in docs/BENCHMARKS.md.  No timed assertions.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests" / "integration")]

from net.redirector import Redirector  # noqa: E402
from oss.network.plan import Listener, ProgramNet, plan  # noqa: E402

PORT = 9300
PEER = r"""
import socket, sys, time
mode, host, port, n = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
if mode == "serve":
    s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(("0.0.0.0", port)); s.listen(8)
    print("up", flush=True)
    while True:
        c, _ = s.accept()
        c.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        kind = c.recv(1)
        if kind == b"p":
            while (d := c.recv(64)):
                c.sendall(d)
        else:
            while c.recv(1 << 20):
                pass
            c.sendall(b"k")
        c.close()
c = socket.create_connection((host, port))
c.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
if mode == "ping":
    c.sendall(b"p"); msg = b"x" * 64; rtts = []
    for _ in range(n):
        t = time.perf_counter(); c.sendall(msg); got = 0
        while got < 64:
            got += len(c.recv(64 - got))
        rtts.append(time.perf_counter() - t)
    rtts.sort()
    print(rtts[len(rtts) // 2] * 1e6, rtts[int(len(rtts) * 0.99)] * 1e6)
else:
    c.sendall(b"t"); block = b"x" * (1 << 20); t = time.perf_counter()
    for _ in range(n):
        c.sendall(block)
    c.shutdown(socket.SHUT_WR); c.recv(1)
    print(n / (time.perf_counter() - t))
"""


def _in(ns: str, *argv: str) -> list[str]:
    return ["nsenter", f"--net=/run/netns/{ns}", "--", *argv]


def paths(pings: int, mb: int) -> None:
    from netlab import NetLab

    lab = NetLab()
    try:
        lab.add_host("h1", ["a", "b"])
        lab.add_outside("h1")
        red = Redirector(lab.nodes())
        address = "10.214.251.2"
        net = ProgramNet("bench", address, ("a", "b"), (Listener("b", PORT),))
        t = time.perf_counter()
        for key, state in plan(net, lab.spots, lab.host_spots()).items():
            red.apply(key, "bench", state)
        print(
            "first apply of 3 nodes (2 instances, 1 host):",
            f"{(time.perf_counter() - t) * 1e3:.1f} ms",
        )
        server = subprocess.Popen(
            _in(lab.ns_of("b"), sys.executable, "-c", PEER, "serve", "", str(PORT), "0"),
            stdout=subprocess.PIPE,
        )
        assert server.stdout is not None and server.stdout.readline().strip() == b"up"
        b_addr = lab.spots["b"].address
        cases = [
            ("instance a -> b's address (direct)", "a", b_addr),
            ("instance a -> P (redirector: rule)", "a", address),
            ("instance a -> 127.0.0.1 (redirector: DNAT+rule)", "a", "127.0.0.1"),
            ("outside -> b's address via host (direct)", lab.outside, b_addr),
            ("outside -> P via host (redirector)", lab.outside, address),
        ]
        if lab.outside:  # the outside needs a route to the bridge for the direct case
            subprocess.run(
                [
                    "ip",
                    "-n",
                    lab.outside,
                    "route",
                    "add",
                    f"{lab.hosts['h1'].subnet}.0/24",
                    "via",
                    "10.99.1.1",
                ],
                check=True,
            )
        print(f"{'path':50} {'p50 us':>8} {'p99 us':>8} {'MB/s':>8}")
        for label, where, host in cases:
            ns = where if where == lab.outside else lab.ns_of(where)
            med, p99 = [], []
            for _ in range(3):
                out = subprocess.run(
                    _in(ns, sys.executable, "-c", PEER, "ping", host, str(PORT), str(pings)),
                    capture_output=True,
                    text=True,
                    check=True,
                ).stdout.split()
                med.append(float(out[0]))
                p99.append(float(out[1]))
            rates = [
                float(
                    subprocess.run(
                        _in(ns, sys.executable, "-c", PEER, "put", host, str(PORT), str(mb)),
                        capture_output=True,
                        text=True,
                        check=True,
                    ).stdout
                )
                for _ in range(3)
            ]
            print(
                f"{label:50} {statistics.median(med):8.1f} {statistics.median(p99):8.1f} "
                f"{statistics.median(rates):8.0f}"
            )
        server.kill()
        server.wait()
        red.close()
    finally:
        lab.close()


UDP_PEER = r"""
import socket, sys, time
mode, host, port, n = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
if mode == "serve":
    s.bind(("0.0.0.0", port))
    print("up", flush=True)
    while True:
        d, peer = s.recvfrom(2048)
        s.sendto(d, peer)
s.settimeout(5)
msg = b"x" * 64; rtts = []
for _ in range(n):
    t = time.perf_counter(); s.sendto(msg, (host, port)); s.recvfrom(2048)
    rtts.append(time.perf_counter() - t)
rtts.sort()
print(rtts[len(rtts) // 2] * 1e6, rtts[int(len(rtts) * 0.99)] * 1e6)
"""


def udp_paths(pings: int) -> None:
    """UDP ping-pong RTT: directly to b's address vs through the redirector."""
    from netlab import NetLab

    lab = NetLab()
    try:
        lab.add_host("h1", ["a", "b"])
        lab.add_outside("h1")
        red = Redirector(lab.nodes())
        address, port = "10.214.252.2", PORT + 1
        net = ProgramNet("bench", address, ("a", "b"), (Listener("b", port, proto=17),))
        for key, state in plan(net, lab.spots, lab.host_spots()).items():
            red.apply(key, "bench", state)
        server = subprocess.Popen(
            _in(lab.ns_of("b"), sys.executable, "-c", UDP_PEER, "serve", "", str(port), "0"),
            stdout=subprocess.PIPE,
        )
        assert server.stdout is not None and server.stdout.readline().strip() == b"up"
        b_addr = lab.spots["b"].address
        subnet = f"{lab.hosts['h1'].subnet}.0/24"
        subprocess.run(["ip", "-n", lab.outside, "route", "add", subnet, "via", "10.99.1.1"],
                       check=True)  # fmt: skip
        cases = [
            ("UDP instance a -> b's address (direct)", lab.ns_of("a"), b_addr),
            ("UDP instance a -> P (redirector: rule)", lab.ns_of("a"), address),
            ("UDP instance a -> 127.0.0.1 (DNAT+rule)", lab.ns_of("a"), "127.0.0.1"),
            ("UDP outside -> b's address via host (direct)", lab.outside, b_addr),
            ("UDP outside -> P via host (redirector)", lab.outside, address),
        ]
        print(f"{'path':50} {'p50 us':>8} {'p99 us':>8}")
        for label, ns, host in cases:
            med, p99 = [], []
            for _ in range(3):
                out = subprocess.run(
                    _in(ns, sys.executable, "-c", UDP_PEER, "ping", host, str(port), str(pings)),
                    capture_output=True, text=True, check=True,
                ).stdout.split()  # fmt: skip
                med.append(float(out[0]))
                p99.append(float(out[1]))
            print(f"{label:50} {statistics.median(med):8.1f} {statistics.median(p99):8.1f}")
        server.kill()
        server.wait()
        red.close()
    finally:
        lab.close()


LISTENER = r"""
import socket, sys, time
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("0.0.0.0", int(sys.argv[1])))
t0 = time.monotonic(); s.listen(8); t1 = time.monotonic()
open(sys.argv[2], "w").write(f"{t0} {t1}")
c, _ = s.accept(); c.close()
"""
CLIENT = r"""
import os, socket, sys, time
while not os.path.exists(sys.argv[2]):
    time.sleep(0.001)
while True:
    try:
        socket.create_connection(("127.0.0.1", int(sys.argv[1])), timeout=1).close(); break
    except OSError:
        time.sleep(0.001)
open(sys.argv[3], "w").write(str(time.monotonic()))
"""


CONNECTS = r"""
import socket, sys, time
n = int(sys.argv[1])
srv = socket.socket(); srv.bind(("127.0.0.1", 0)); srv.listen(128)
port = srv.getsockname()[1]
t = time.perf_counter()
for _ in range(n):
    c = socket.create_connection(("127.0.0.1", port)); srv.accept()[0].close(); c.close()
tcp = (time.perf_counter() - t) / n * 1e6
t = time.perf_counter()
for _ in range(n):
    u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); u.bind(("127.0.0.1", 0)); u.close()
udp = (time.perf_counter() - t) / n * 1e6
print(f"{tcp:.1f} {udp:.1f}")
"""


def connect_cost(n: int, runs: int) -> None:
    """Per-connect and per-bind cost in a placed process vs natively (medians of runs)."""
    got: dict[str, list[tuple[float, float]]] = {"native": [], "placed": []}
    for _ in range(runs):
        for kind in ("native", "placed"):
            argv = [sys.executable, "-c", CONNECTS, str(n)]
            if kind == "placed":
                argv = [sys.executable, "-m", "tracer.cli", "--instances", "1", "--placement",
                        "spread", "--", *argv]  # fmt: skip
            out = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, check=True,
                                 timeout=300).stdout.split()  # fmt: skip
            got[kind].append((float(out[0]), float(out[1])))
    for kind, rows in got.items():
        tcp = statistics.median(r[0] for r in rows)
        udp = statistics.median(r[1] for r in rows)
        print(f"{kind:7} TCP connect+accept+close {tcp:7.1f} us, UDP socket+bind+close "
              f"{udp:6.1f} us (median of {runs}, {n} each)")  # fmt: skip


def listen_to_first(runs: int) -> None:
    got = []
    for i in range(runs):
        with tempfile.TemporaryDirectory() as d:
            (Path(d) / "l.py").write_text(LISTENER)
            (Path(d) / "c.py").write_text(CLIENT)
            port = str(9400 + i)
            script = f"cd {d}; python3 l.py {port} t & python3 c.py {port} t c; wait"
            subprocess.run(
                [
                    sys.executable,
                    "-m",
                    "tracer.cli",
                    "--instances",
                    "2",
                    "--placement",
                    "spread",
                    "--",
                    "sh",
                    "-c",
                    script,
                ],
                cwd=ROOT,
                check=True,
                timeout=120,
                capture_output=True,
            )
            t0, t1 = (float(x) for x in (Path(d) / "t").read_text().split())
            t2 = float((Path(d) / "c").read_text())
            got.append(((t1 - t0) * 1e3, (t2 - t0) * 1e3))
    listens = sorted(a for a, _ in got)
    firsts = sorted(b for _, b in got)
    print(
        f"listen() under --instances (tracer -> agent -> OSS -> redirectors): "
        f"p50 {listens[len(listens) // 2]:.1f} ms, max {listens[-1]:.1f} ms over {runs}"
    )
    print(
        f"listen -> first redirected connection from the other instance: "
        f"p50 {firsts[len(firsts) // 2]:.1f} ms, max {firsts[-1]:.1f} ms"
    )


def repoint(runs: int) -> None:
    from test_network_migrate import PORT as MPORT
    from test_network_migrate import SERVER

    from oss.db.store import Store
    from oss.network.manager import NetworkManager
    from oss.schema import VERSIONS
    from tests.integration.test_migrate_local import deputy, migrate, session_of
    from vmagent.checkpoint import criu
    from vmagent.cluster.local import LocalCluster
    from vmagent.network.local import lab_config

    try:
        criu.check()
    except criu.CriuUnavailable as exc:
        print(f"re-point after migration: skipped ({exc})")
        return
    with LocalCluster(2) as cluster, tempfile.TemporaryDirectory() as d:
        assert cluster.lab is not None
        config, nodes = lab_config(cluster.lab)
        loop = asyncio.new_event_loop()
        store = Store(Path(d) / "oss", VERSIONS)
        loop.run_until_complete(store.open())
        m = NetworkManager(store, config, Redirector(nodes))
        times = []
        try:
            for i in range(runs):
                a, b = cluster.instances if i % 2 == 0 else cluster.instances[::-1]
                flag = Path(d) / f"flag{i}"
                port = MPORT + i  # the last run's server may still hold its port a moment

                def ask(address: str, port: int = port) -> str:
                    try:
                        with socket.create_connection((address, port), timeout=2) as c:
                            return c.recv(64).decode()
                    except OSError:
                        return ""

                proc = subprocess.Popen(
                    deputy(a, "/usr/bin/python3", "-c", SERVER, str(flag), str(port)),
                    stdout=subprocess.DEVNULL,
                )
                address = loop.run_until_complete(m.join("prog", a.name))
                deadline = time.monotonic() + 60
                while not flag.exists():
                    if time.monotonic() > deadline:
                        raise SystemExit("bench_network: the server never started")
                    time.sleep(0.01)
                pid = int(flag.read_text())
                loop.run_until_complete(m.listen("prog", a.name, pid, port, "0.0.0.0"))
                assert ask(address).startswith(a.name)
                migrate(a, b, session_of(a, pid))
                t = time.perf_counter()
                took = loop.run_until_complete(m.moved("prog", pid, a.name, b.name))
                deadline = time.monotonic() + 30
                while not ask(address).startswith(b.name):
                    if time.monotonic() > deadline:
                        raise SystemExit("bench_network: the moved server was never reached")
                times.append((took * 1e3, (time.perf_counter() - t) * 1e3))
                proc.kill()
                proc.wait()
                loop.run_until_complete(m.unlisten("prog", b.name, port))
        finally:
            loop.run_until_complete(m.release("prog"))
            loop.run_until_complete(store.close())
            loop.close()
    took = sorted(t for t, _ in times)
    first = sorted(f for _, f in times)
    print(
        f"re-point after a CRIU migration: moved() p50 {took[len(took) // 2]:.1f} ms, "
        f"first connection to the moved process p50 {first[len(first) // 2]:.1f} ms "
        f"(max {first[-1]:.1f}) over {runs}"
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pings", type=int, default=5000)
    ap.add_argument("--mb", type=int, default=200)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--skip", default="", help="comma list of: paths,udp,connects,listen,repoint")
    args = ap.parse_args()
    if os.geteuid() != 0:
        sys.exit("bench_network: needs root (namespaces, netlink, nft)")
    skip = set(args.skip.split(","))
    if "paths" not in skip:
        paths(args.pings, args.mb)
    if "udp" not in skip:
        udp_paths(args.pings)
    if "connects" not in skip:
        connect_cost(2000, args.runs)
    if "listen" not in skip:
        listen_to_first(args.runs)
    if "repoint" not in skip:
        repoint(args.runs)


if __name__ == "__main__":
    main()
