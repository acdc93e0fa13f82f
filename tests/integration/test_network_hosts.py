"""Redirectors across two simulated hosts, and re-pointing after a move (issue 13).

Two hosts (network namespaces h1, h2), each with a bridge and two instance
namespaces, joined by a veth "wire"; an "outside" namespace on an uplink of h1.
The OSS's networking manager (real SQLite store, real `net.redirector`)
steers one program's address; real HTTP servers run in the instances'
namespaces.  Root only.
"""

from __future__ import annotations

import asyncio
import ipaddress
import os
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from net.bridge import listening_socket
from net.redirector import Redirector, listing
from oss.db.store import Store
from oss.network.manager import NetworkConfig, NetworkManager
from oss.schema import VERSIONS
from tests.conftest import wait_for
from tests.integration.netlab import OUTSIDE_NET, NetLab

pytestmark = [pytest.mark.root, pytest.mark.netns, pytest.mark.slow]

PREFIX = ipaddress.IPv4Network("10.214.250.0/24")


class Hosts:
    """The lab, the manager, and what runs in it."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.lab = NetLab()
        self.servers: list[subprocess.Popen[bytes]] = []
        self.loop = asyncio.new_event_loop()
        self.manager: NetworkManager | None = None
        self.store: Store | None = None

    def build(self) -> None:
        self.lab.add_host("h1", ["a", "b"])
        self.lab.add_host("h2", ["c", "d"])
        self.lab.wire("h1", "h2")
        self.lab.add_outside("h1")
        self.before = {ns: listing(ns) for ns in self.lab.nodes().values() if ns}
        config = NetworkConfig(PREFIX, self.lab.spots, self.lab.host_spots())
        self.store = Store(self.tmp / "oss", VERSIONS)
        self.loop.run_until_complete(self.store.open())
        self.manager = NetworkManager(self.store, config, Redirector(self.lab.nodes()))

    def run(self, coro: object) -> object:
        return self.loop.run_until_complete(coro)  # type: ignore[arg-type]

    def serve(self, instance: str, port: int) -> subprocess.Popen[bytes]:
        """An HTTP server in `instance`'s namespace whose /where says `instance`."""
        root = self.tmp / f"www-{instance}-{port}"
        root.mkdir(exist_ok=True)
        (root / "where").write_text(instance)
        p = subprocess.Popen(
            ["nsenter", f"--net=/run/netns/{self.lab.ns_of(instance)}", "--",
             "python3", "-m", "http.server", str(port), "--bind", "0.0.0.0"],
            cwd=root, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        self.servers.append(p)
        assert wait_for(lambda: curl(self.lab.ns_of(instance), f"http://127.0.0.1:{port}/where")
                        == instance, 20)  # fmt: skip
        return p

    def close(self) -> None:
        for p in self.servers:
            if p.poll() is None:
                p.kill()
                p.wait()
        if self.manager is not None:
            self.run(self.manager.close())
        if self.store is not None:
            self.run(self.store.close())
        self.loop.close()
        self.lab.close()


def curl(ns: str, url: str) -> str:
    """The body curl gets from `url` inside namespace `ns` ("" on failure)."""
    done = subprocess.run(
        ["nsenter", f"--net=/run/netns/{ns}", "--", "curl", "-s", "--max-time", "3", url],
        capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    return done.stdout if done.returncode == 0 else ""


@pytest.fixture
def hosts(tmp_path: Path) -> Iterator[Hosts]:
    if os.geteuid() != 0:
        pytest.skip("namespaces, netlink and nft need root")
    if shutil.which("curl") is None:
        pytest.skip("curl is not installed")
    h = Hosts(tmp_path)
    try:
        h.build()
        yield h
    finally:
        h.close()


def test_two_hosts_outside_in_outbound_loopback_and_cleanup(hosts: Hosts) -> None:
    m, lab = hosts.manager, hosts.lab
    assert m is not None
    address = hosts.run(m.join("p1", "a"))
    assert hosts.run(m.join("p1", "c")) == address and isinstance(address, str)
    hosts.serve("a", 8001)  # on h1
    hosts.serve("c", 8002)  # on h2
    hosts.run(m.listen("p1", "a", 1, 8001, "0.0.0.0"))
    hosts.run(m.listen("p1", "c", 2, 8002, "0.0.0.0"))
    # In from outside (it is wired to h1 only): both servers at the one address.
    assert curl(lab.outside, f"http://{address}:8001/where") == "a"
    assert curl(lab.outside, f"http://{address}:8002/where") == "c"
    # Loopback between the program's instances on the two hosts, both ways.
    assert curl(lab.ns_of("a"), "http://127.0.0.1:8002/where") == "c"
    assert curl(lab.ns_of("c"), "http://localhost:8001/where") == "a"
    assert curl(lab.ns_of("a"), f"http://{address}:8002/where") == "c"
    # Out to an outside server: both instances arrive from the program address.
    peers: list[str] = []
    sock = listening_socket(lab.outside, "0.0.0.0", 9000)
    try:
        sock.settimeout(10)
        for inst in ("a", "c"):
            client = subprocess.Popen(
                ["nsenter", f"--net=/run/netns/{lab.ns_of(inst)}", "--", "curl", "-s",
                 "--max-time", "5", f"http://{OUTSIDE_NET}.2:9000/"],
                stdout=subprocess.DEVNULL,
            )  # fmt: skip
            conn, peer = sock.accept()
            peers.append(peer[0])
            conn.recv(1024)
            conn.sendall(b"HTTP/1.0 200 OK\r\nContent-Length: 0\r\n\r\n")
            conn.close()
            assert client.wait(10) == 0
    finally:
        sock.close()
    assert peers == [address, address]
    # A second listener of the port on another instance is refused (EADDRINUSE there).
    from oss.network.store import PortTaken

    with pytest.raises(PortTaken):
        hosts.run(m.listen("p1", "c", 3, 8001, "0.0.0.0"))
    # The end: nothing of it remains on any host or instance.
    hosts.run(m.release("p1"))
    after = {ns: listing(ns) for ns in lab.nodes().values() if ns}
    assert after == hosts.before
    assert hosts.run(m.address_of("p1")) is None


def test_redirect_follows_a_moved_process_across_hosts(hosts: Hosts) -> None:
    m, lab = hosts.manager, hosts.lab
    assert m is not None
    address = hosts.run(m.join("p2", "a"))
    old = hosts.serve("a", 8001)
    hosts.run(m.listen("p2", "a", 41, 8001, "0.0.0.0"))
    assert curl(lab.outside, f"http://{address}:8001/where") == "a"
    # The process moves to d (the other host): it listens there, not here any more,
    # as a restored process does; the OSS's migration hook re-points its redirects.
    hosts.serve("d", 8001)
    old.kill()
    old.wait()
    start = time.perf_counter()
    took = hosts.run(m.moved("p2", 41, "a", "d"))
    assert curl(lab.outside, f"http://{address}:8001/where") == "d"
    reached = time.perf_counter() - start
    assert isinstance(took, float) and 0 < took <= reached
    assert curl(lab.ns_of("b"), "http://127.0.0.1:8001/where") == ""  # b is no member
    hosts.run(m.join("p2", "b"))
    assert curl(lab.ns_of("b"), "http://127.0.0.1:8001/where") == "d"
    shown = hosts.run(m.show("p2"))
    assert isinstance(shown, dict)
    assert [x["instance"] for x in shown["listeners"]] == ["d"], shown


def test_bandwidth_cap_shapes_the_instances_egress(hosts: Hosts) -> None:
    """The tightest bandwidth limit (here 8 Mbit/s) becomes a token bucket on each
    member's uplink (its share: 4 Mbit/s each); a burst overruns it (overlimits)."""
    lab = hosts.lab
    assert hosts.manager is not None and hosts.store is not None
    config = hosts.manager.config
    m = NetworkManager(hosts.store, config, Redirector(lab.nodes()), rate_of=lambda c, p: 8000)
    try:
        hosts.run(m.join("p3", "a"))
        hosts.run(m.join("p3", "b"))
        ns = lab.ns_of("a")
        qdisc = subprocess.run(
            ["nsenter", f"--net=/run/netns/{ns}", "--", "tc", "-s", "qdisc", "show", "dev", "eth0"],
            capture_output=True, text=True, check=True,
        ).stdout  # fmt: skip
        assert "tbf" in qdisc and "rate 4Mbit" in qdisc, qdisc
        sink = listening_socket(lab.ns_of("b"), "0.0.0.0", 9100)
        try:
            sender = subprocess.Popen(
                ["nsenter", f"--net=/run/netns/{ns}", "--", "python3", "-c",
                 f"import socket; s = socket.create_connection(({lab.spots['b'].address!r}, 9100));"
                 " s.sendall(b'x' * (1 << 20)); s.close()"],
            )  # fmt: skip
            conn, _ = sink.accept()
            got = 0
            while chunk := conn.recv(65536):
                got += len(chunk)
            conn.close()
            assert sender.wait(60) == 0 and got == 1 << 20
        finally:
            sink.close()
        stats = subprocess.run(
            ["nsenter", f"--net=/run/netns/{ns}", "--", "tc", "-s", "qdisc", "show", "dev", "eth0"],
            capture_output=True, text=True, check=True,
        ).stdout  # fmt: skip
        overlimits = int(stats.split("overlimits ")[1].split()[0])
        sent = int(stats.split("Sent ")[1].split()[0])
        assert sent >= 1 << 20 and overlimits > 0, stats
        hosts.run(m.release("p3"))
        after = subprocess.run(
            ["nsenter", f"--net=/run/netns/{ns}", "--", "tc", "qdisc", "show", "dev", "eth0"],
            capture_output=True, text=True, check=True,
        ).stdout  # fmt: skip
        assert "tbf" not in after, after
    finally:
        hosts.run(m.close())


def test_the_reaper_sweep_removes_what_a_dead_oss_left(hosts: Hosts) -> None:
    """A run killed by SIGKILL leaves the host's rules and routes: `sweep_prefix` (what
    the lab's reaper runs) removes every one of them, and nothing else."""
    from net.redirector import sweep_prefix

    m, lab = hosts.manager, hosts.lab
    assert m is not None
    hosts.run(m.join("p4", "a"))
    hosts.run(m.listen("p4", "a", 5, 8080, "0.0.0.0"))
    host = lab.hosts["h1"].ns
    assert listing(host) != hosts.before[host]
    assert sweep_prefix(host, str(PREFIX)) >= 4  # block + listener rules, route, unreachable
    now = listing(host)
    assert now["rules"] == hosts.before[host]["rules"]
    assert now["routes"] == hosts.before[host]["routes"]
