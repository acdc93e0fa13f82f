"""One address per program on local instances (issue 13), end to end.

One `dcptrace --instances 3 --placement spread --record` run inside a simulated
host (a network namespace of its own, so the host's redirect rules and the
final leftover check see only this run) with an "outside" namespace on an
uplink of that host.  The program starts two HTTP servers (ports 8001, 8002)
and an AF_UNIX server, each placed on an instance (each server is waited for
before the next exec: spread's choice depends on the order of the execs, and
an `&` child's exec races the shell's next ones; tests/unit/
test_network_spread_order.py replays the order that put both servers on one
instance under CPU stress); it curls `localhost` for
both ports and connects to the unix socket from other instances, and curls an
HTTP server the test runs in the outside namespace twice.  The test reaches
both servers from outside at the program's address, checks the redirect of
8001 goes when that server is killed, and that nothing of the program's set-up
is left on the host afterwards.  Root only (namespaces, netlink, nft).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from net.bridge import listening_socket
from net.redirector import listing
from tests.conftest import dcptrace_argv, traced_env, wait_for
from tests.integration.netlab import OUTSIDE_NET, NetLab

pytestmark = [pytest.mark.root, pytest.mark.netns, pytest.mark.slow]

OUTSIDE = f"{OUTSIDE_NET}.2"

UNIX_SERVER = r"""
import array, os, socket, sys
s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
s.bind(sys.argv[1]); s.listen(1)
open(sys.argv[1] + ".up", "w").close()
for _ in range(2):
    c, _ = s.accept()
    msg, anc, _f, _a = c.recvmsg(64, socket.CMSG_SPACE(4))
    fds = array.array("i"); [fds.frombytes(d) for lvl, t, d in anc if t == socket.SCM_RIGHTS]
    print(msg.decode(), os.read(fds[0], 64).decode() if fds else "no fd", flush=True)
"""

UNIX_CLIENT = r"""
import array, os, socket, sys, time
while not os.path.exists(sys.argv[1] + ".up"):
    time.sleep(0.05)
c = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
c.connect(sys.argv[1])
fd = os.open(sys.argv[2], os.O_RDONLY)
c.sendmsg([b"hello"], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [fd]))])
print("sent", flush=True)
"""

WAIT = r"""
import os, socket, sys, time
for arg in sys.argv[1:]:
    if arg.isdigit():  # a port: until something answers on 127.0.0.1 (from this instance)
        while True:
            try:
                socket.create_connection(("127.0.0.1", int(arg)), timeout=1).close()
                break
            except OSError:
                time.sleep(0.1)
    else:  # a file the test creates
        while not os.path.exists(arg):
            time.sleep(0.05)
"""

PROGRAM = r"""
cd "$1"
python3 -m http.server 8001 --bind 0.0.0.0 > s1.log 2>&1 &
S1=$!
python3 wait.py 8001
python3 -m http.server 8002 --bind 0.0.0.0 > s2.log 2>&1 &
S2=$!
python3 wait.py 8002
python3 unix_server.py sock > unix_server.out 2>&1 &
U=$!
hostname -I > addresses
for i in 1 2 3; do
    for port in 8001 8002; do
        curl -s -o /dev/null -w '%{http_code}' "http://localhost:$port/?$i" >> curl$port
    done
done
python3 unix_client.py sock secret.txt > unix_client.out 2>&1
python3 unix_client.py sock secret.txt >> unix_client.out 2>&1
curl -s http://OUTSIDE:9000/1 > out1 &
C1=$!
curl -s http://OUTSIDE:9000/2 > out2 &
C2=$!
curl -s http://OUTSIDE:9000/3 > out3
wait $C1 $C2
wait $U
touch ready
python3 wait.py go
kill $S1
wait $S1
touch closed
python3 wait.py go2
kill $S2
wait $S2
exit 0
"""


@dataclass
class Outcome:
    """What the run and the test saw."""

    dir: Path
    status: int = -1
    stderr: str = ""
    address: str = ""
    record: dict[str, Any] = field(default_factory=dict)
    outside_codes: dict[int, str] = field(default_factory=dict)
    peers: list[str] = field(default_factory=list)
    rules_listening: list[str] = field(default_factory=list)
    rules_closed: list[str] = field(default_factory=list)
    before: dict[str, list[str]] = field(default_factory=dict)
    after: dict[str, list[str]] = field(default_factory=dict)


def _outside_server(ns: str, peers: list[str]) -> tuple[socket.socket, threading.Thread]:
    sock = listening_socket(ns, "0.0.0.0", 9000)

    def serve() -> None:
        while True:
            try:
                conn, peer = sock.accept()
            except OSError:
                return
            peers.append(peer[0])
            threading.Thread(target=answer, args=(conn,), daemon=True).start()

    def answer(conn: socket.socket) -> None:
        with conn:
            conn.recv(4096)
            time.sleep(0.5)  # the program's three clients overlap: spread puts them apart
            conn.sendall(b"HTTP/1.0 200 OK\r\nContent-Length: 2\r\n\r\nok")

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    return sock, t


def _curl(ns: str, url: str) -> str:
    done = subprocess.run(
        ["nsenter", f"--net=/run/netns/{ns}", "curl", "-s", "-o", "/dev/null", "-w",
         "%{http_code}", "--max-time", "5", url],
        capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    return done.stdout


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Outcome]:
    if os.geteuid() != 0:
        pytest.skip("namespaces, netlink and nft need root")
    if shutil.which("curl") is None:
        pytest.skip("curl is not installed")
    d = tmp_path_factory.mktemp("net")
    for name, text in (
        ("unix_server.py", UNIX_SERVER),
        ("unix_client.py", UNIX_CLIENT),
        ("wait.py", WAIT),
        ("prog.sh", PROGRAM.replace("OUTSIDE", OUTSIDE)),
    ):
        (d / name).write_text(text)  # fmt: skip
    (d / "secret.txt").write_text("passed-fd")
    out = Outcome(d)
    lab = NetLab()
    try:
        host = lab.add_bare_host("h")
        lab.add_outside("h")
        out.before = listing(host.ns)
        sock, _t = _outside_server(lab.outside, out.peers)
        p = subprocess.Popen(
            ["nsenter", f"--net=/run/netns/{host.ns}", "--",
             *dcptrace_argv("--instances", "3", "--placement", "spread",
                            "--record", str(d / "run.json")),
             "--", "sh", str(d / "prog.sh"), str(d)],
            env=traced_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            stdin=subprocess.DEVNULL,
        )  # fmt: skip
        try:
            assert wait_for(lambda: (d / "ready").exists() or p.poll() is not None, 120)
            words = (d / "addresses").read_text().split() if (d / "addresses").exists() else []
            out.address = next((w for w in words if w.startswith("10.214.")), "")
            for port in (8001, 8002):
                out.outside_codes[port] = _curl(lab.outside, f"http://{out.address}:{port}/")
            out.rules_listening = listing(host.ns)["rules"]
            (d / "go").touch()
            assert wait_for(lambda: (d / "closed").exists() or p.poll() is not None, 60)
            wait_for(lambda: "dport 8001" not in " ".join(listing(host.ns)["rules"]), 60)
            out.rules_closed = listing(host.ns)["rules"]
            (d / "go2").touch()
            _o, err = p.communicate(timeout=120)
            out.status, out.stderr = p.returncode, err.decode(errors="replace")
        finally:
            if p.poll() is None:
                p.kill()
                p.wait()
            sock.close()
        # The run's OSS removes its set-up as it closes, after the program's end.
        wait_for(lambda: listing(host.ns) == out.before, 20)
        out.after = listing(host.ns)
        if (d / "run.json").exists():
            out.record = json.loads((d / "run.json").read_text())
        yield out
    finally:
        lab.close()


def _instance_of(out: Outcome, *words: str) -> list[str]:
    rows = out.record.get("placed_processes", [])
    return [r["instance"] for r in rows if all(w in " ".join(r["argv"]) for w in words)]


def test_the_run_ends_well(run: Outcome) -> None:
    assert run.status == 0, run.stderr
    assert "Traceback" not in run.stderr, run.stderr


def test_every_instance_shows_the_program_address(run: Outcome) -> None:
    assert run.address.startswith("10.214."), (run.dir / "addresses").read_text()
    assert run.record.get("program_address") == run.address  # --record shows it


def test_outside_reaches_two_servers_on_two_instances_at_the_program_address(run: Outcome) -> None:
    assert run.outside_codes == {8001: "200", 8002: "200"}, run.outside_codes
    (a,) = _instance_of(run, "http.server", "8001")
    (b,) = _instance_of(run, "http.server", "8002")
    assert a != b, (a, b)
    assert any("dport 8001" in r for r in run.rules_listening), run.rules_listening


def test_localhost_reaches_a_server_on_another_instance(run: Outcome) -> None:
    for port in (8001, 8002):
        assert (run.dir / f"curl{port}").read_text() == "200" * 3, port
        (server,) = _instance_of(run, "http.server", str(port))
        clients = set(_instance_of(run, "curl", f"localhost:{port}"))
        assert clients - {server}, (port, clients, server)  # from another instance too


def test_outside_server_sees_the_program_address_from_two_instances(run: Outcome) -> None:
    assert all((run.dir / f"out{i}").read_text() == "ok" for i in (1, 2, 3))
    assert run.peers == [run.address] * 3, run.peers
    clients = _instance_of(run, "curl", "9000")
    assert len(clients) == 3 and len(set(clients)) >= 2, clients


def test_af_unix_path_socket_with_scm_rights_across_instances(run: Outcome) -> None:
    assert (run.dir / "unix_server.out").read_text() == "hello passed-fd\n" * 2
    (server,) = _instance_of(run, "unix_server.py")
    clients = set(_instance_of(run, "unix_client.py"))
    assert clients - {server}, (clients, server)  # from another instance too


def test_redirect_goes_when_its_listener_closes(run: Outcome) -> None:
    rules = " ".join(run.rules_closed)
    assert "dport 8001" not in rules and "dport 8002" in rules, run.rules_closed


def test_nothing_of_the_program_network_remains_on_the_host(run: Outcome) -> None:
    assert run.after == run.before
    assert not any("10.214." in line for lines in run.after.values() for line in lines)


def test_sigkill_of_dcptrace_leaves_no_redirect_on_the_host(tmp_path: Path) -> None:
    """Front and tracer killed at once while a program listens: the lab's reaper removes
    the host's rules and routes into the run's prefix (`net.redirector.sweep_prefix`)."""
    if os.geteuid() != 0:
        pytest.skip("namespaces, netlink and nft need root")
    (tmp_path / "wait.py").write_text(WAIT)
    script = (
        f"cd {tmp_path}; python3 -m http.server 8003 --bind 0.0.0.0 >/dev/null 2>&1 & "
        "python3 wait.py 8003; echo ready; exec sleep 600"
    )
    lab = NetLab()
    try:
        host = lab.add_bare_host("k")
        before = listing(host.ns)
        proc = subprocess.Popen(
            ["nsenter", f"--net=/run/netns/{host.ns}", "--",
             *dcptrace_argv("--instances", "2", "--placement", "spread"), "--", "sh", "-c", script],
            env=traced_env(), stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
            start_new_session=True,
        )  # fmt: skip
        assert proc.stdout is not None
        try:
            assert proc.stdout.readline() == b"ready\n"
            during = listing(host.ns)
            assert any("dport 8003" in r for r in during["rules"]), during
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            assert wait_for(lambda: listing(host.ns) == before, 60), listing(host.ns)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    finally:
        lab.close()
