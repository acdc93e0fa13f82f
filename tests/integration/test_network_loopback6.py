"""IPv6 loopback between a program's instances (issue 13).

One `dcptrace --instances 2 --placement spread --record` run inside a simulated
host: an HTTP server bound to `::` (dual stack) on one instance, and `curl
[::1]:PORT` four times one after the other (spread alternates the instances),
plus a client that prints the peer and the local address its connection got.
Every curl gets 200, from both instances, as on one machine.  Root only.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from net.redirector import listing
from tests.conftest import dcptrace_argv, traced_env, wait_for
from tests.integration.netlab import NetLab

pytestmark = [pytest.mark.root, pytest.mark.netns, pytest.mark.slow]

WAIT6 = r"""
import socket, sys, time
while True:
    try:
        socket.create_connection(("::1", int(sys.argv[1])), timeout=1).close()
        break
    except OSError:
        time.sleep(0.1)
"""

PEER6 = r"""
import socket, sys
s = socket.create_connection(("::1", int(sys.argv[1])), timeout=10)
print(s.family == socket.AF_INET6, s.getpeername()[1] == int(sys.argv[1]))
"""

PROGRAM = r"""
cd "$1"
python3 -m http.server 8006 --bind :: > s.log 2>&1 &
S=$!
python3 wait6.py 8006
for i in 1 2 3 4; do
    curl -g -s -o /dev/null -w '%{http_code}' "http://[::1]:8006/?$i" >> curl6
done
python3 peer6.py 8006 > peer6.out 2>&1
kill $S
wait $S
exit 0
"""


def test_ipv6_loopback_reaches_a_server_on_another_instance(tmp_path: Path) -> None:
    if os.geteuid() != 0:
        pytest.skip("namespaces, netlink and nft need root")
    if shutil.which("curl") is None:
        pytest.skip("curl is not installed")
    if not os.path.exists("/proc/net/if_inet6"):
        pytest.skip("this kernel has no IPv6")
    d = tmp_path
    for name, text in (("wait6.py", WAIT6), ("peer6.py", PEER6), ("prog.sh", PROGRAM)):
        (d / name).write_text(text)
    lab = NetLab()
    try:
        host = lab.add_bare_host("s")
        before = listing(host.ns)
        done = subprocess.run(
            ["nsenter", f"--net=/run/netns/{host.ns}", "--",
             *dcptrace_argv("--instances", "2", "--placement", "spread",
                            "--record", str(d / "run.json")),
             "--", "sh", str(d / "prog.sh"), str(d)],
            env=traced_env(), capture_output=True, stdin=subprocess.DEVNULL, timeout=240,
        )  # fmt: skip
        assert done.returncode == 0, done.stderr.decode(errors="replace")
        assert (d / "curl6").read_text() == "200" * 4
        assert (d / "peer6.out").read_text() == "True True\n"
        rows = json.loads((d / "run.json").read_text()).get("placed_processes", [])
        (server,) = [r["instance"] for r in rows if "http.server" in " ".join(r["argv"])]
        clients = {r["instance"] for r in rows if "[::1]" in " ".join(r["argv"])}
        assert clients - {server}, (clients, server)  # from the other instance too
        assert wait_for(lambda: listing(host.ns) == before, 20), listing(host.ns)
    finally:
        lab.close()
