"""A server that runs at home is reached at the program's address (issue 13).

`dcptrace --instances 2 --placement spread --record` inside a simulated host
with an outside namespace.  The program's root process (which stays home)
serves HTTP on `0.0.0.0:8010`, then runs `hostname -I` and `curl
localhost:8010` twice (placed on the instances).  The curls get 200 from the
server at home; the test reaches it from outside at `P:8010`; after the run
nothing of the program's set-up is left on the host.  Root only.
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

HOME_SERVER = r"""
import http.server, os, subprocess, sys, threading, time

class Quiet(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass

os.chdir(sys.argv[1])
srv = http.server.HTTPServer(("0.0.0.0", 8010), Quiet)  # its listen is steered home
threading.Thread(target=srv.serve_forever, daemon=True).start()
out = subprocess.run(["hostname", "-I"], capture_output=True, text=True).stdout
open("addresses", "w").write(out)
curl = ["curl", "-s", "-o", "/dev/null", "-w", "%{http_code}", "--max-time", "20",
        "http://localhost:8010/"]
codes = [subprocess.run(curl, capture_output=True, text=True).stdout for _ in range(2)]
open("codes", "w").write(" ".join(codes))
open("ready", "w").close()
while not os.path.exists("go"):
    time.sleep(0.05)
srv.server_close()
"""


def _curl(ns: str, url: str) -> str:
    done = subprocess.run(
        ["nsenter", f"--net=/run/netns/{ns}", "curl", "-s", "-o", "/dev/null", "-w",
         "%{http_code}", "--max-time", "10", url],
        capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    return done.stdout


def test_a_server_at_home_is_reached_at_the_program_address(tmp_path: Path) -> None:
    if os.geteuid() != 0:
        pytest.skip("namespaces, netlink and nft need root")
    if shutil.which("curl") is None:
        pytest.skip("curl is not installed")
    d = tmp_path
    (d / "home_server.py").write_text(HOME_SERVER)
    lab = NetLab()
    try:
        host = lab.add_bare_host("m")
        lab.add_outside("m")
        before = listing(host.ns)
        p = subprocess.Popen(
            ["nsenter", f"--net=/run/netns/{host.ns}", "--",
             *dcptrace_argv("--instances", "2", "--placement", "spread",
                            "--record", str(d / "run.json")),
             "--", "python3", str(d / "home_server.py"), str(d)],
            env=traced_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            stdin=subprocess.DEVNULL,
        )  # fmt: skip
        try:
            assert wait_for(lambda: (d / "ready").exists() or p.poll() is not None, 180)
            words = (d / "addresses").read_text().split() if (d / "addresses").exists() else []
            address = next((w for w in words if w.startswith("10.214.")), "")
            assert address, words
            outside = _curl(lab.outside, f"http://{address}:8010/")
            rules = listing(host.ns)
            (d / "go").touch()
            _o, err = p.communicate(timeout=120)
        finally:
            if p.poll() is None:
                p.kill()
                p.wait()
        assert p.returncode == 0, err.decode(errors="replace")
        assert (d / "codes").read_text() == "200 200"  # from the instances, at localhost
        assert outside == "200", (outside, rules)  # from outside, at P
        rows = json.loads((d / "run.json").read_text()).get("placed_processes", [])
        assert any("curl" in " ".join(r["argv"]) for r in rows), rows  # curl ran placed
        assert wait_for(lambda: listing(host.ns) == before, 20), listing(host.ns)
    finally:
        lab.close()
