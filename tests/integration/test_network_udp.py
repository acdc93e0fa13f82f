"""UDP at the program's address on local instances (issue 13), end to end.

One `dcptrace --instances 3 --placement spread --record` run inside a simulated
host (a namespace of its own) with an "outside" namespace on an uplink.  The
program runs two UDP echo servers, one bound to `0.0.0.0:5301`, one to
`127.0.0.1:5302`, then three clients one after the other (spread puts them on
different instances): each sends to `127.0.0.1:5301`, `P:5301` and
`127.0.0.1:5302` and prints what came back and from where; a fourth process
binds UDP 5301 itself (EADDRINUSE, as on one machine).  The test sends from
outside to `P:5301` (the reply comes from `P:5301`) and to `P:5302` (bound to
loopback: not reachable from outside), checks the redirect of 5301 goes when
its server is killed and that nothing of the program's set-up is left.
Root only (namespaces, netlink, nft).
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from net.redirector import in_netns, listing
from tests.conftest import dcptrace_argv, traced_env, wait_for
from tests.integration.netlab import OUTSIDE_NET, NetLab

pytestmark = [pytest.mark.root, pytest.mark.netns, pytest.mark.slow]

OUTSIDE = f"{OUTSIDE_NET}.2"
IP_RECVERR = 11  # <linux/in.h>; the socket module lacks it

ECHO = r"""
import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind((sys.argv[1], int(sys.argv[2])))  # returns once the OSS steers the port here
open(sys.argv[3], "w").close()
while True:
    data, peer = s.recvfrom(2048)
    s.sendto(b"echo " + data + b" from " + peer[0].encode(), peer)
"""

CLIENT = r"""
import os, socket, sys, time
for f in sys.argv[2:]:
    while not os.path.exists(f):
        time.sleep(0.05)
address = sys.argv[1]
for host, port in (("127.0.0.1", 5301), (address, 5301), ("127.0.0.1", 5302)):
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.settimeout(10)
    try:
        s.sendto(b"hi", (host, port))
        data, peer = s.recvfrom(2048)
        print(host, port, data.decode(), "reply-from", f"{peer[0]}:{peer[1]}", flush=True)
    except OSError as exc:
        print(host, port, "error", type(exc).__name__, flush=True)
    finally:
        s.close()
"""

BIND = r"""
import errno, socket
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
try:
    s.bind(("0.0.0.0", 5301))
    print("bound")
except OSError as exc:
    print(errno.errorcode.get(exc.errno, exc.errno))
"""

WAIT = r"""
import os, sys, time
while not os.path.exists(sys.argv[1]):
    time.sleep(0.05)
"""

PROGRAM = r"""
cd "$1"
python3 echo.py 0.0.0.0 5301 e1.up > e1.log 2>&1 &
E1=$!
python3 echo.py 127.0.0.1 5302 e2.up > e2.log 2>&1 &
E2=$!
P=$(hostname -I | tr ' ' '\n' | grep '^10\.214\.' | head -1)
echo "$P" > address
for i in 1 2 3; do
    python3 client.py "$P" e1.up e2.up > client$i.out 2>&1
done
python3 bind.py > bind.out 2>&1
touch ready
python3 wait.py go
kill $E1
wait $E1
touch closed
python3 wait.py go2
kill $E2
wait $E2
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
    outside_reply: tuple[bytes, tuple[str, int]] | None = None
    outside_loopback: str = ""
    rules_bound: list[str] = field(default_factory=list)
    rules_closed: list[str] = field(default_factory=list)
    before: dict[str, list[str]] = field(default_factory=dict)
    after: dict[str, list[str]] = field(default_factory=dict)


def _outside_udp(ns: str, address: str, port: int) -> tuple[bytes, tuple[str, int]] | str:
    """Send one datagram from namespace `ns` to address:port: (reply, its source), or the
    name of the error a connected socket got (ICMP unreachable, or a timeout)."""
    sock = in_netns(ns, lambda: socket.socket(socket.AF_INET, socket.SOCK_DGRAM))
    with sock:
        sock.settimeout(30)
        # An ICMP host unreachable is reported on a UDP socket only with IP_RECVERR.
        sock.setsockopt(socket.IPPROTO_IP, IP_RECVERR, 1)
        try:
            sock.connect((address, port))
            sock.send(b"out")
            data, peer = sock.recvfrom(2048)
            return data, peer
        except OSError as exc:
            return type(exc).__name__


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Outcome]:
    if os.geteuid() != 0:
        pytest.skip("namespaces, netlink and nft need root")
    if shutil.which("nft") is None:
        pytest.skip("nft is not installed (apt nftables)")
    d = tmp_path_factory.mktemp("udp")
    for name, text in (("echo.py", ECHO), ("client.py", CLIENT), ("bind.py", BIND),
                       ("wait.py", WAIT), ("prog.sh", PROGRAM)):  # fmt: skip
        (d / name).write_text(text)
    out = Outcome(d)
    lab = NetLab()
    try:
        host = lab.add_bare_host("u")
        lab.add_outside("u")
        out.before = listing(host.ns)
        p = subprocess.Popen(
            ["nsenter", f"--net=/run/netns/{host.ns}", "--",
             *dcptrace_argv("--instances", "3", "--placement", "spread",
                            "--record", str(d / "run.json")),
             "--", "sh", str(d / "prog.sh"), str(d)],
            env=traced_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            stdin=subprocess.DEVNULL,
        )  # fmt: skip
        try:
            assert wait_for(lambda: (d / "ready").exists() or p.poll() is not None, 180)
            out.address = (d / "address").read_text().strip() if (d / "address").exists() else ""
            reply = _outside_udp(lab.outside, out.address, 5301)
            out.outside_reply = reply if isinstance(reply, tuple) else None
            loop = _outside_udp(lab.outside, out.address, 5302)
            out.outside_loopback = loop if isinstance(loop, str) else "a reply"
            out.rules_bound = listing(host.ns)["rules"]
            (d / "go").touch()
            assert wait_for(lambda: (d / "closed").exists() or p.poll() is not None, 60)
            wait_for(lambda: "dport 5301" not in " ".join(listing(host.ns)["rules"]), 60)
            out.rules_closed = listing(host.ns)["rules"]
            (d / "go2").touch()
            _o, err = p.communicate(timeout=120)
            out.status, out.stderr = p.returncode, err.decode(errors="replace")
        finally:
            if p.poll() is None:
                p.kill()
                p.wait()
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
    assert run.address.startswith("10.214."), run.address


def test_udp_servers_are_reached_from_the_programs_other_instances(run: Outcome) -> None:
    p = run.address
    for i in (1, 2, 3):
        lines = (run.dir / f"client{i}.out").read_text().splitlines()
        assert lines[0].startswith("127.0.0.1 5301 echo hi from "), lines
        assert lines[0].endswith("reply-from 127.0.0.1:5301"), lines
        assert lines[1].startswith(f"{p} 5301 echo hi from "), lines
        assert lines[1].endswith(f"reply-from {p}:5301"), lines
        assert lines[2].endswith("reply-from 127.0.0.1:5302"), lines
    (e1,) = _instance_of(run, "echo.py", "5301")
    (e2,) = _instance_of(run, "echo.py", "5302")
    clients = set(_instance_of(run, "client.py"))
    assert clients - {e1} and clients - {e2}, (clients, e1, e2)  # across instances too


def test_outside_reaches_a_udp_server_at_the_program_address(run: Outcome) -> None:
    assert run.outside_reply is not None
    data, peer = run.outside_reply
    assert data == f"echo out from {OUTSIDE}".encode()
    assert peer == (run.address, 5301)  # the reply comes from P:5301
    assert any("ipproto udp dport 5301" in r for r in run.rules_bound), run.rules_bound


def test_a_loopback_bound_udp_server_is_not_reached_from_outside(run: Outcome) -> None:
    # The host has no rule for it: its `unreachable P` answers with ICMP.
    assert run.outside_loopback == "OSError", run.outside_loopback


def test_a_second_udp_bind_of_the_port_is_eaddrinuse(run: Outcome) -> None:
    assert (run.dir / "bind.out").read_text().strip() == "EADDRINUSE"


def test_udp_redirect_goes_when_its_socket_closes(run: Outcome) -> None:
    rules = " ".join(run.rules_closed)
    assert "dport 5301" not in rules, run.rules_closed


def test_nothing_of_the_program_network_remains_on_the_host(run: Outcome) -> None:
    assert run.after == run.before
    assert not any("10.214." in line for lines in run.after.values() for line in lines)
