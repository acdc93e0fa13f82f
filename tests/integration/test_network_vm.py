"""Issue 13 on VMs: one address per program, `dcptrace --oss` on TCG guests.

One lab (image, private libvirtd, bridge, OSS with a network prefix, two
guests) for the module.  The OSS applies the host's share (the lab namespace,
where the bridge is) itself and sends each guest its share as a `network`
command its agent applies.  A client namespace the test hangs on the bridge
plays the outside; the program's own processes check `localhost` across guests.

Run only under the machine's VM lock:
    flock /work/plans/vm.lock python -m pytest -q tests/integration/test_network_vm.py
"""

from __future__ import annotations

import errno
import ipaddress
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from typing import Any

import pytest
from vmcheck import why_no_vm_lab

pytestmark = [pytest.mark.vm, pytest.mark.libvirt, pytest.mark.root, pytest.mark.slow]

_reason = why_no_vm_lab()
if _reason:
    pytest.skip(_reason, allow_module_level=True)

from vmlab import Lab, LoopThread, make_lab, remove_tree  # noqa: E402

from images.builder import source_checkout  # noqa: E402
from net.redirector import listing  # noqa: E402

PREFIX = ipaddress.IPv4Network("10.232.9.0/24")
CLIENT_IP = "10.231.7.250"  # on the lab bridge (vmlab's subnet 10.231.7.0/24)

# A server of the program: answers `PORT HOSTNAME`; GET /quit ends it.
SERVER = """
import http.server, socket, sys
port = int(sys.argv[1])
class H(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        body = f"{port} {socket.gethostname()}\\n".encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
        if self.path == "/quit":
            self.server.stop = True
    def log_message(self, *a):
        pass
srv = http.server.HTTPServer(("", port), H)
srv.stop = False
while not srv.stop:
    srv.handle_request()
"""

# A client of the program: `localhost:PORT` for each port until it answers (bounded).
CLIENT = """
import socket, sys, time, urllib.request
got = {}
for port in sys.argv[1:]:
    for _ in range(180):
        try:
            with urllib.request.urlopen(f"http://localhost:{port}/", timeout=5) as r:
                got[port] = (r.status, r.read().decode().split()[1])
                break
        except OSError:
            time.sleep(1)
print("client", socket.gethostname(),
      " ".join(f"{p}={s}:{h}" for p, (s, h) in sorted(got.items())), flush=True)
"""

QUIT = """
import sys, urllib.request
for port in sys.argv[1:]:
    try:
        urllib.request.urlopen(f"http://localhost:{port}/quit", timeout=10).read()
    except OSError as exc:
        print("quit", port, exc, flush=True)
"""

# The home shell starts two servers and a client (placed on the guests: spread), then
# waits for the test (a line on stdin) before stopping the servers.  Each server is
# started once the one before listens (the test sends a line; `read` runs no exec):
# spread's choice depends on the order of the execs, and an `&` child's exec races the
# shell's next ones (tests/unit/test_network_spread_order.py).
PROGRAM = """
/usr/bin/python3 -c "$1" 8001 &
read first
/usr/bin/python3 -c "$1" 8002 &
read second
/usr/bin/python3 -c "$2" 8001 8002
read go
/usr/bin/python3 -c "$3" 8001 8002
wait
echo done
"""


@pytest.fixture(scope="module")
def loop() -> Iterator[LoopThread]:
    lt = LoopThread()
    yield lt
    lt.stop()


@pytest.fixture(scope="module")
def lab(request: pytest.FixtureRequest, loop: LoopThread) -> Iterator[Lab]:
    """Two guests registered with an OSS that gives programs addresses from PREFIX."""
    failed_before = request.session.testsfailed
    lab = make_lab(loop, "n")
    lab.network_prefix = PREFIX
    # Nothing here tests failure detection: a TCG guest starved for seconds on a loaded
    # host must not be declared lost (its programs fenced) mid-test.
    lab.heartbeat_timeout = 30.0
    try:
        lab.image = lab.build_cached_image()
        loop.run(lab.start(), timeout=120)
        if lab.oss is None:
            pytest.skip(f"no OSS/agent in this checkout: {lab.oss_missing}")
        loop.run(lab.boot(["vm1", "vm2"]), timeout=240)
        for n in ("vm1", "vm2"):
            loop.run(lab.registered(n), timeout=150)
        yield lab
    finally:
        if not lab.closed:
            loop.run(lab.aclose(), timeout=120)
        if request.session.testsfailed > failed_before:
            print(f"\nVM lab failed: serial logs kept in {lab.work}/state/serial", file=sys.stderr)
        else:
            remove_tree(lab.work)


@pytest.fixture(scope="module")
def client_ns(lab: Lab) -> Iterator[str]:
    """A namespace on the lab bridge (the host side's outside), routing PREFIX via the host."""
    n = os.getpid() % 10000
    ns, outer, inner = f"dcp-vmncli{n}", f"vnc{n}a", f"vnc{n}b"

    def ip(*args: str) -> None:
        subprocess.run(["ip", *args], check=True, capture_output=True, timeout=30)

    ip("netns", "add", ns)
    try:
        ip("link", "add", outer, "type", "veth", "peer", "name", inner)
        ip("link", "set", outer, "netns", lab.netns)
        ip("link", "set", inner, "netns", ns)
        ip("-n", lab.netns, "link", "set", outer, "master", lab.bridge_name, "up")
        ip("-n", ns, "addr", "add", f"{CLIENT_IP}/24", "dev", inner)
        ip("-n", ns, "link", "set", inner, "up")
        ip("-n", ns, "link", "set", "lo", "up")
        ip("-n", ns, "route", "add", str(PREFIX), "via", str(lab.gateway))
        yield ns
    finally:
        subprocess.run(["ip", "-n", lab.netns, "link", "del", outer], capture_output=True)
        subprocess.run(["ip", "netns", "del", ns], capture_output=True)


def _host_listing(lab: Lab) -> dict[str, list[str]]:
    got = listing(lab.netns)
    got.pop("qdiscs", None)  # the client's veth comes and goes with its default qdisc
    return {k: sorted(v) for k, v in got.items()}


def _fetch(ns: str, url: str, seconds: float) -> str:
    """GET `url` from namespace `ns` until it answers 200 (bounded); the body."""
    code = (
        "import sys, time, urllib.request\n"
        f"end = time.monotonic() + {seconds}\n"
        "while True:\n"
        "    try:\n"
        "        with urllib.request.urlopen(sys.argv[1], timeout=5) as r:\n"
        "            print(r.status, r.read().decode().strip()); break\n"
        "    except OSError as exc:\n"
        "        if time.monotonic() > end: print('failed', exc); break\n"
        "        time.sleep(1)\n"
    )
    res = subprocess.run(
        ["ip", "netns", "exec", ns, "/usr/bin/python3", "-I", "-c", code, url],
        capture_output=True, text=True, timeout=seconds + 60,
    )  # fmt: skip
    return res.stdout.strip()


def _program_address(lab: Lab, seconds: float) -> tuple[str, str]:
    """(program id, address) of the one program the OSS has given an address."""
    from oss.network import store as q

    assert lab.oss is not None and lab.oss.oss.network is not None
    network = lab.oss.oss.network
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        programs = lab.loop.run(network.store.read(q.programs))
        for p in programs:
            address = lab.loop.run(network.address_of(p))
            if address:
                return p, address
        time.sleep(0.5)
    raise AssertionError("no program got an address")


@pytest.mark.timeout(600)
def _listening(lab: Lab, program: str, port: int, seconds: float) -> bool:
    """Does the OSS know a listener of the program on `port` (within `seconds`)?"""
    assert lab.oss is not None and lab.oss.oss.network is not None
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        shown = lab.loop.run(lab.oss.oss.network.show(program))
        if shown and any(x["port"] == port for x in shown["listeners"]):
            return True
        time.sleep(1)
    return False


def test_program_address_across_guests(lab: Lab, client_ns: str, tmp_path: Any) -> None:
    assert lab.oss is not None and lab.oss.oss.network is not None
    before = _host_listing(lab)
    _acct, _user, token = lab.loop.run(
        lab.oss.oss.accounts.create_account("netvm", False, "sum", "u", allow_root=True)
    )
    record = tmp_path / "run.json"
    env = dict(os.environ, PYTHONPATH=str(source_checkout()), DCP_TOKEN=token)
    proc = subprocess.Popen(
        ["ip", "netns", "exec", lab.netns, sys.executable, "-m", "tracer.cli",
         "--oss", lab.oss_url, "--placement", "spread", "--record", str(record),
         "--", "/bin/sh", "-c", PROGRAM, "sh", SERVER, CLIENT, QUIT],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        cwd="/", env=env,
    )  # fmt: skip
    try:
        program, address = _program_address(lab, 240)
        assert ipaddress.IPv4Address(address) in PREFIX
        assert proc.stdin is not None
        for port in (8001, 8002):  # the next exec once this server listens
            listening = _listening(lab, program, port, 240)
            assert listening, lab.loop.run(lab.oss.oss.network.show(program))
            proc.stdin.write(b"next\n")
            proc.stdin.flush()
        # The outside reaches both servers at the program's one address.
        first = _fetch(client_ns, f"http://{address}:8001/", 240)
        second = _fetch(client_ns, f"http://{address}:8002/", 240)
        shown = lab.loop.run(lab.oss.oss.network.show(program))
    finally:
        try:
            out, err = proc.communicate(input=b"go\n", timeout=240)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, err = proc.communicate()
    text, errtext = out.decode(errors="replace"), err.decode(errors="replace")
    assert first.startswith("200 8001 "), (first, errtext[-2000:])
    assert second.startswith("200 8002 "), (second, errtext[-2000:])
    # The program sees one computer (its hostname is home's): where each server runs is
    # the OSS's listener table and the run's record.
    assert shown is not None and shown["address"] == address
    where = {x["port"]: x["instance"] for x in shown["listeners"]}
    assert set(where) == {8001, 8002} and set(where.values()) == {"vm1", "vm2"}, shown
    assert proc.returncode == 0, errtext[-3000:]
    # `localhost` from the program's client on one guest reached the server on the other.
    (line,) = [x for x in text.splitlines() if x.startswith("client ")]
    _, _host, *answers = line.split()
    assert [a.split("=")[1].split(":")[0] for a in sorted(answers)] == ["200", "200"], line
    rows = json.loads(record.read_text())["placed_processes"]
    clients = {r["instance"] for r in rows if r["argv"][2:3] == [CLIENT]}
    servers = {r["argv"][-1]: r["instance"] for r in rows if len(r["argv"]) == 4}
    assert servers == {"8001": where[8001], "8002": where[8002]}, rows
    assert len(clients) == 1 and clients <= {"vm1", "vm2"}, rows  # the other guest served too
    run = json.loads(record.read_text())
    assert run.get("program_address") in (address, None), run.get("program_address")
    # Nothing of the program's set-up stays on the host, and its address is free.
    deadline = time.monotonic() + 60
    after = _host_listing(lab)
    while after != before and time.monotonic() < deadline:
        time.sleep(1)
        after = _host_listing(lab)
    assert after == before
    assert lab.loop.run(lab.oss.oss.network.address_of(program)) is None


# AF_UNIX between kernels: a stream server on one guest, its client on the other.  The
# server also binds a datagram socket (PATH.d), which a datagram client cannot reach
# across kernels (EOPNOTSUPP); the stream bytes and the EOFs cross through the agents.
# Each side first tries to send a descriptor with its first bytes (SCM_RIGHTS): natively
# it goes; across kernels the sendmsg fails with EOPNOTSUPP and the bytes go without it.
UNIX_PEER = """
import errno, os, socket, sys
role, path = sys.argv[1], sys.argv[2]
def first(sock, data):
    try:
        socket.send_fds(sock, [data], [0])
        print(role, "fds sent", flush=True)
    except OSError as exc:
        print(role, "fds", exc.errno, flush=True)
        sock.sendall(data)
if role == "server":
    dg = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    dg.bind(path + ".d")
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.bind(path)
    s.listen(1)
    print("server listening", flush=True)
    c, _ = s.accept()
    got = b""
    while b := c.recv(65536):
        got += b
    first(c, got.upper())
    c.sendall(b"bye\\n")
    c.close()
    s.close()
    dg.close()
    os.unlink(path)
    os.unlink(path + ".d")
    print("server got", len(got), got[:14], flush=True)
else:
    g = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    try:
        g.connect(path + ".d")
        print("dgram connected", flush=True)
    except OSError as exc:
        print("dgram", exc.errno, flush=True)
    c = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    c.connect(path)
    first(c, b"ping 1\\n")
    c.sendall(b"ping 2\\n" + b"x" * 200000 + b"\\n")
    c.shutdown(socket.SHUT_WR)
    got = b""
    while b := c.recv(65536):
        got += b
    print("client got", len(got), got[:14], got[-8:], flush=True)
"""

UNIX_PROGRAM = """
/usr/bin/python3 -c "$1" server "$2" &
read first
/usr/bin/python3 -c "$1" client "$2"
wait
echo done
"""


def _unix_native(path: str) -> list[str]:
    """The server's and the client's stream lines when both run on this machine."""
    server = subprocess.Popen(
        [sys.executable, "-I", "-c", UNIX_PEER, "server", path],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert server.stdout is not None
        assert server.stdout.readline().strip() == "server listening"
        client = subprocess.run(
            [sys.executable, "-I", "-c", UNIX_PEER, "client", path],
            capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        out, _ = server.communicate(timeout=60)
    finally:
        if server.poll() is None:
            server.kill()
            server.wait()
    assert "dgram connected" in client.stdout
    assert "client fds sent" in client.stdout and "server fds sent" in out
    return sorted(x for x in (client.stdout + out).splitlines() if " got " in x)


def _unix_bound(lab: Lab, path: str, seconds: float) -> str | None:
    """The program the OSS knows `path` bound for (within `seconds`)."""
    assert lab.oss is not None
    paths = lab.oss.oss.unix_paths
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        for program in list(paths._paths):
            if paths.find(program, path) is not None:
                return program
        time.sleep(0.5)
    return None


def test_unix_stream_across_guests(lab: Lab, tmp_path: Any) -> None:
    assert lab.oss is not None
    path = f"/tmp/dcp-unixrelay-{os.getpid()}.sock"
    native = _unix_native(str(tmp_path / "native.sock"))
    _acct, _user, token = lab.loop.run(
        lab.oss.oss.accounts.create_account("unixvm", False, "sum", "u", allow_root=True)
    )
    record = tmp_path / "run.json"
    env = dict(os.environ, PYTHONPATH=str(source_checkout()), DCP_TOKEN=token)
    proc = subprocess.Popen(
        ["ip", "netns", "exec", lab.netns, sys.executable, "-m", "tracer.cli",
         "--oss", lab.oss_url, "--placement", "spread", "--record", str(record),
         "--", "/bin/sh", "-c", UNIX_PROGRAM, "sh", UNIX_PEER, path],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        cwd="/", env=env,
    )  # fmt: skip
    try:
        program = _unix_bound(lab, path, 240)
        assert proc.stdin is not None
        proc.stdin.write(b"next\n")
        proc.stdin.flush()
        out, err = proc.communicate(timeout=240)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    text, errtext = out.decode(errors="replace"), err.decode(errors="replace")
    assert program is not None, errtext[-3000:]
    assert proc.returncode == 0, errtext[-3000:]
    rows = json.loads(record.read_text())["placed_processes"]
    where = {r["argv"][3]: r["instance"] for r in rows if r["argv"][2:3] == [UNIX_PEER]}
    assert set(where) == {"server", "client"} and where["server"] != where["client"], rows
    # The same bytes both ways and both EOFs, as on one machine; datagrams refused.
    assert sorted(x for x in text.splitlines() if " got " in x) == native, text
    lines = text.splitlines()
    assert f"dgram {errno.EOPNOTSUPP}" in lines, text
    assert f"client fds {errno.EOPNOTSUPP}" in lines, text
    assert f"server fds {errno.EOPNOTSUPP}" in lines, text
    assert lab.oss.oss.unix_paths.find(program, path) is None  # the server unbound it
