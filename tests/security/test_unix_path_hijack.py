"""Attack: take over another program's AF_UNIX path between instances (issue 13).

Between VMs the OSS keeps, per program, which instance holds a path socket
and mints relay tickets to reach it.  An attacker holding the token of an
instance where only its own program runs tries, as `nobody`:

1. to register the victim program's path on its instance (the victim's next
   connect from another instance would be relayed to the attacker): 404;
2. to get a relay ticket for the victim's socket: 404 (no ticket);
3. the same for a program id that does not exist: 404 alike.

The victim's connect still leads to the victim's own instance, with a ticket.
"""

from __future__ import annotations

import json

import pytest
from attack import as_nobody, require_attacker
from conftest_oss import OssServer

pytestmark = pytest.mark.security
pytest_plugins = ["conftest_oss"]

PATH = "/srv/app/db.sock"

ATTACK = r"""
import json, os, sys, urllib.error, urllib.request
url, program, path = sys.argv[1], sys.argv[2], sys.argv[3]
token = os.environ["INSTANCE_TOKEN"]

def call(route, body):
    req = urllib.request.Request(url + route, data=json.dumps(body).encode(),
                                 headers={"Authorization": "Bearer " + token,
                                          "Content-Type": "application/json"}, method="POST")
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, ""

base = f"/v1/agents/programs/{program}/network/unix"
out = {
    "plant": call(base, {"path": path, "pid": 1, "open": True})[0],
    "ticket": call(base + "/connect", {"path": path}),
    "unknown": call("/v1/agents/programs/p-nothing/network/unix/connect", {"path": path})[0],
}
print(json.dumps(out))
"""


def _register(srv: OssServer, name: str, token: str, key: str) -> None:
    r = srv.http("POST", "/v1/agents/register", token,
                 {"instance": name, "address": f"10.9.9.{name[-1]}:7000", "hostname": name,
                  "cpus": 2, "memory_mb": 1024, "exec_key": key})  # fmt: skip
    assert r.status == 200, r.body


def _place(srv: OssServer, token: str, program: str) -> str:
    r = srv.http("POST", f"/v1/programs/{program}/placements", token, {"processes": 1})
    assert r.status == 200, r.body
    return str(r.body["assignments"][0]["instance"])


def test_an_instance_cannot_plant_or_reach_another_programs_unix_path(oss_factory: object) -> None:
    require_attacker()
    srv: OssServer = oss_factory()  # type: ignore[operator]
    victim, attacker = srv.account("victim"), srv.account("attacker")
    tokens = {"n0": srv.instance("n0", cpus=1)}
    prog = srv.http("POST", "/v1/programs", victim.token,
                    {"argv": ["db"], "processes": 4}).body  # fmt: skip
    assert prog["placements"] == [{"instance": "n0", "processes": 4}], prog  # n0 full
    tokens["n1"] = srv.instance("n1", cpus=1)
    assert _place(srv, victim.token, prog["id"]) == "n1"  # the victim's client
    tokens["n2"] = srv.instance("n2", cpus=1)
    theirs = srv.http("POST", "/v1/programs", attacker.token,
                      {"argv": ["evil"], "processes": 1}).body  # fmt: skip
    assert theirs["placements"] == [{"instance": "n2", "processes": 1}], theirs
    for name, token in tokens.items():
        _register(srv, name, token, name.encode().hex() * 16)
    base = f"/v1/agents/programs/{prog['id']}/network/unix"
    r = srv.http("POST", base, tokens["n0"], {"path": PATH, "pid": 40, "open": True})
    assert r.status == 200, r.body

    res = as_nobody(
        ATTACK, srv.url, prog["id"], PATH,
        env={"PATH": "/usr/bin:/bin", "INSTANCE_TOKEN": tokens["n2"]},
    )  # fmt: skip
    assert res.returncode == 0, res.stderr
    got = json.loads(res.stdout)
    assert got == {"plant": 404, "ticket": [404, ""], "unknown": 404}, got

    # The victim's connect from n1 still leads to n0, with a ticket for n0's agent.
    r = srv.http("POST", base + "/connect", tokens["n1"], {"path": PATH})
    assert r.status == 200 and r.body["instance"] == "n0", r.body
    assert r.body["address"].endswith(":7000") and r.body["ticket"].startswith("u1."), r.body
