"""The redirect follows a migrated server (issues 12 and 13) with real CRIU.

Two namespaced local instances (`LocalCluster`), the OSS's networking manager
in this process over the lab (`vmagent.network.local.lab_config`: the host is
this namespace), a TCP server placed on node0 by a real deputy.  A client here
reaches it at the program address; the agents migrate it to node1 (CRIU, the
listening socket with it); the manager's migration hook (`moved`, what the
OSS calls on a migration's outcome) re-points the redirect, and the client
reaches the same process on node1.  The re-point time is measured.  Root
and a working CRIU only.
"""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from pyroute2 import IPRoute

from net.redirector import Redirector, listing
from oss.db.store import Store
from oss.network.manager import NetworkManager
from oss.schema import VERSIONS
from tests.conftest import wait_for
from tests.integration.test_migrate_local import DROP, deputy, migrate, session_of
from vmagent.checkpoint import criu
from vmagent.cluster.local import LocalCluster
from vmagent.network.local import lab_config

pytestmark = [pytest.mark.root, pytest.mark.netns, pytest.mark.slow]

PORT = 7481
SERVER = r"""
import os, socket, sys
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("0.0.0.0", int(sys.argv[2])))
s.listen(16)
with open(sys.argv[1] + ".tmp", "w") as f:
    f.write(str(int(open("/proc/self/stat").read().split()[0])))
os.rename(sys.argv[1] + ".tmp", sys.argv[1])
while True:
    c, _ = s.accept()
    cmd = open("/proc/1/cmdline", "rb").read().split(b"\0")
    me = open("/proc/self/stat").read().split()[0].encode()
    c.sendall(cmd[cmd.index(b"--instance") + 1] + b" " + me)
    c.close()
"""


def _nothing_left(address: str | None) -> None:
    """No rule or route of this namespace names the program's address any more (this
    namespace is the machine's own: other runs' rules may come and go meanwhile)."""
    left = listing(None)
    assert address and not [x for k in ("rules", "routes") for x in left[k] if address in x]


def ask(address: str) -> str:
    """What the server at address:PORT says ("" if nobody answers)."""
    try:
        with socket.create_connection((address, PORT), timeout=2) as c:
            return c.recv(64).decode()
    except OSError:
        return ""


@pytest.fixture(scope="module")
def cluster() -> Iterator[LocalCluster]:
    if os.geteuid() != 0:
        pytest.skip("namespaced instances, netlink and CRIU need root")
    try:
        criu.check()
    except criu.CriuUnavailable as exc:
        pytest.skip(str(exc))
    with LocalCluster(2) as c:
        yield c
    DROP.close()


def test_redirect_follows_a_migrated_listener(cluster: LocalCluster, tmp_path: Path) -> None:
    assert cluster.lab is not None
    a, b = cluster.instances
    config, nodes = lab_config(cluster.lab)
    loop = asyncio.new_event_loop()
    store = Store(tmp_path / "oss", VERSIONS)
    loop.run_until_complete(store.open())
    manager = NetworkManager(store, config, Redirector(nodes))
    flag = tmp_path / "flag"
    proc = subprocess.Popen(
        deputy(a, "/usr/bin/python3", "-c", SERVER, str(flag), str(PORT)),
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )  # fmt: skip
    try:
        address = loop.run_until_complete(manager.join("prog", a.name))
        assert address is not None
        assert wait_for(flag.exists, 60), "the server never started"
        pid = int(flag.read_text())
        loop.run_until_complete(manager.listen("prog", a.name, pid, PORT, "0.0.0.0"))
        assert ask(address) == f"{a.name} {pid}"
        moved = migrate(a, b, session_of(a, pid))
        assert (moved["from"], moved["to"]) == (a.name, b.name)
        start = time.perf_counter()
        took = loop.run_until_complete(manager.moved("prog", pid, a.name, b.name))
        assert wait_for(lambda: ask(address) == f"{b.name} {pid}", 10)
        reached = time.perf_counter() - start
        print(f"re-point {took * 1000:.1f} ms, first connection after {reached * 1000:.1f} ms")
        assert 0 < took <= reached
    finally:
        proc.kill()
        proc.wait()
        loop.run_until_complete(manager.release("prog"))
        loop.run_until_complete(store.close())
        loop.close()
    _nothing_left(address)


PEER_PORT = 7482
PEER_ADDRESS = "10.99.2.1"  # on the lab's bridge for this test: beyond the instances' subnet
CLIENT = r"""
import os, socket, sys, time
flag, host, port = sys.argv[1], sys.argv[2], int(sys.argv[3])
with open(flag + ".tmp", "w") as f:
    f.write(str(int(open("/proc/self/stat").read().split()[0])))
os.rename(flag + ".tmp", flag)
while not os.path.exists(flag + ".go"):
    time.sleep(0.02)
c = socket.create_connection((host, port))
while True:
    line = c.recv(64)
    if not line:
        break
    cmd = open("/proc/1/cmdline", "rb").read().split(b"\0")
    c.sendall(cmd[cmd.index(b"--instance") + 1] + b" " + line)
"""


def _say(conn: socket.socket, word: bytes) -> bytes:
    """Send `word` to the program's process on `conn`; what it answered."""
    conn.sendall(word)
    return conn.recv(64)


def test_a_connection_to_an_outside_peer_survives_a_migration(
    cluster: LocalCluster, tmp_path: Path
) -> None:
    """A process of the program connected to a peer outside the instances (a server on an
    address of the lab host beyond the instances' subnet, so the connection leaves by
    the default route, from P): after CRIU moves it (`--tcp-established`) the peer's
    packets for P:port, a port of the source's block, reach the target."""
    assert cluster.lab is not None
    with IPRoute() as ipr:
        bridge = ipr.link_lookup(ifname=cluster.lab.bridge)[0]
        ipr.addr("add", index=bridge, address=PEER_ADDRESS, prefixlen=32)
    a, b = cluster.instances
    config, nodes = lab_config(cluster.lab)
    loop = asyncio.new_event_loop()
    store = Store(tmp_path / "oss", VERSIONS)
    loop.run_until_complete(store.open())
    manager = NetworkManager(store, config, Redirector(nodes))
    peer = socket.socket()
    peer.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    peer.bind((PEER_ADDRESS, PEER_PORT))
    peer.listen(1)
    peer.settimeout(60)
    flag = tmp_path / "flag"
    proc = subprocess.Popen(
        deputy(a, "/usr/bin/python3", "-c", CLIENT, str(flag), PEER_ADDRESS, str(PEER_PORT)),
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )  # fmt: skip
    try:
        address = loop.run_until_complete(manager.join("prog", a.name))
        assert address is not None
        assert wait_for(flag.exists, 60), "the client never started"
        pid = int(flag.read_text())
        Path(str(flag) + ".go").touch()
        conn, (source, _port) = peer.accept()
        conn.settimeout(60)
        with conn:
            assert source == address  # it left from P
            assert _say(conn, b"one") == f"{a.name} one".encode()
            loop.run_until_complete(manager.join("prog", b.name))  # CRIU binds P on b
            moved = migrate(a, b, session_of(a, pid))
            assert (moved["from"], moved["to"]) == (a.name, b.name)
            loop.run_until_complete(manager.moved("prog", pid, a.name, b.name))
            assert _say(conn, b"two") == f"{b.name} two".encode()
            shown = " ".join(listing(None)["rules"])
            assert f"dport {_port}" in shown, shown  # the port is pinned on the host
    finally:
        peer.close()
        proc.kill()
        proc.wait()
        loop.run_until_complete(manager.release("prog"))
        loop.run_until_complete(store.close())
        loop.close()
        with IPRoute() as ipr:
            ipr.addr("del", index=bridge, address=PEER_ADDRESS, prefixlen=32)
    _nothing_left(address)
