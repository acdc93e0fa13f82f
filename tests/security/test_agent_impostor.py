"""Attack: an impostor stands where a deputy will connect, hoping for its HELLO.

1. An instance token re-registers its instance at another address (old OSS:
   handed out as given, and a victim's deputy sent its HELLO, environment and
   DCP_TOKEN there).  Now the OSS hands out the host the agent registered from.
2. A fake agent (run by `nobody`) listens where a deputy connects.  The deputy
   authenticates the agent first: the fake, not knowing the ticket's secret,
   gets nothing but the ticket's public part; no HELLO, environment or token.
"""

from __future__ import annotations

import json
import os
import secrets
import socket
import subprocess
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from attack import as_nobody, require_attacker
from conftest_oss import OssServer
from wire import CLIENT

from vmagent.exec.remote import TicketDrop, deputy_command, ticket_for_self

pytestmark = pytest.mark.security
pytest_plugins = ["conftest_oss"]

REREGISTER = r"""
import json, sys, urllib.request
url, token, name = sys.argv[1:4]
body = {"instance": name, "address": "10.66.66.66:4444", "hostname": "evil", "cpus": 1,
        "memory_mb": 64, "exec_key": "ab" * 32}
req = urllib.request.Request(url + "/v1/agents/register", data=json.dumps(body).encode(),
                             headers={"Authorization": "Bearer " + token,
                                      "Content-Type": "application/json"}, method="POST")
print(urllib.request.urlopen(req, timeout=10).status)
"""


def test_a_reregistered_instance_is_handed_out_at_the_peer_address(srv: OssServer) -> None:
    require_attacker()
    token = srv.call(srv.oss.mint_instance_token("x1"))
    res = as_nobody(REREGISTER, srv.url, token, "x1")
    assert res.returncode == 0 and res.stdout.strip() == "200", res.stderr
    acct = srv.account("victim", admin=False)
    r = srv.http("POST", "/v1/programs", acct.token, {"argv": ["/bin/sh"], "cwd": "/"})
    assert r.status == 200, r.body
    ident = {"uid": 1000, "gid": 1000, "digest": "ab" * 32}
    r = srv.http("POST", f"/v1/programs/{r.body['id']}/placements", acct.token, {"exec_as": ident})
    assert r.status == 200, r.body
    (grant,) = r.body["exec_grants"]
    # The attacker connected from loopback: that is the host clients are sent to.
    assert grant["address"] == "127.0.0.1:4444", grant


FAKE = (
    CLIENT
    + r"""
import select
port, ready, seconds = int(sys.argv[1]), sys.argv[2], float(sys.argv[3])
srv = socket.create_server(("127.0.0.1", port))
open(ready, "w").close()
got = b""
srv.settimeout(seconds)
conn, _ = srv.accept()
conn.settimeout(seconds)
deadline = time.monotonic() + seconds
replied = False
while time.monotonic() < deadline:
    try:
        data = conn.recv(65536)
    except OSError:
        break
    if not data:
        break
    got += data
    if not replied and len(got) >= 4 + HDR.size:
        # Answer AUTH as an agent would, without the secret: a random "proof".
        conn.sendall(frame(CHALLENGE, record([os.urandom(32), os.urandom(16)])))
        replied = True
print(json.dumps({"received": got.hex()}))
"""
)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_a_fake_agent_never_receives_the_hello_env_or_account_token() -> None:
    require_attacker()
    port = free_port()
    shared = Path(tempfile.mkdtemp(prefix="dcp-impostor-"))
    shared.chmod(0o777)
    ready = shared / "ready"
    result: dict[str, Any] = {}

    def run_fake() -> None:
        result["res"] = as_nobody(FAKE, str(port), str(ready), "20", timeout=60)

    fake = threading.Thread(target=run_fake)
    fake.start()
    drop = TicketDrop()
    try:
        deadline = time.monotonic() + 30
        while not ready.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert ready.exists(), "the fake agent did not start"
        account_token = "dcp_" + secrets.token_urlsafe(32)
        argv = (b"/bin/echo", b"argv-marker-7731")
        # A real ticket for the real instance "n0", whose address the attacker now holds.
        ticket = ticket_for_self(secrets.token_urlsafe(24), "n0", argv[0], argv)
        cmd = deputy_command(drop, f"127.0.0.1:{port}", "n0", ticket, argv[0], argv)
        env = dict(os.environ, DCP_TOKEN=account_token, ENV_MARKER="env-marker-4417")
        dep = subprocess.run(cmd, env=env, capture_output=True, timeout=60)
        fake.join(60)
        res = result["res"]
        assert res.returncode == 0, res.stderr
        received = bytes.fromhex(json.loads(res.stdout)["received"])
        assert received, "the deputy never connected"
        for secret in (account_token.encode(), b"env-marker-4417", b"argv-marker-7731"):
            assert secret not in received
        assert ticket.rpartition(".")[2].encode() not in received  # T never on the wire
        assert dep.returncode == 255, dep
        assert b"failed to prove" in dep.stderr, dep.stderr
    finally:
        fake.join(60)
        drop.close()
        for p in shared.iterdir():
            p.unlink()
        shared.rmdir()


def test_the_account_token_is_never_forwarded_to_a_real_instance() -> None:
    from wire import real_agent

    token = secrets.token_urlsafe(24)
    drop = TicketDrop()
    try:
        with real_agent(token, "n0") as agent:
            argv = (b"/usr/bin/env",)
            ticket = ticket_for_self(token, "n0", argv[0], argv)
            cmd = deputy_command(drop, agent.address, "n0", ticket, argv[0], argv)
            env = dict(os.environ, DCP_TOKEN="dcp_never-forwarded", ENV_MARKER="kept")
            dep = subprocess.run(cmd, env=env, capture_output=True, timeout=60)
        assert dep.returncode == 0, dep.stderr
        assert b"ENV_MARKER=kept" in dep.stdout  # the environment is forwarded...
        assert b"DCP_TOKEN" not in dep.stdout  # ...but not the account's token
        assert b"dcp_never-forwarded" not in agent.log.encode()
    finally:
        drop.close()
