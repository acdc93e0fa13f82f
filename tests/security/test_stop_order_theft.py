"""Attack: one instance's token reads or cancels the stop orders meant for another instance.

Limits act through heartbeat replies: when metering stops a program, each instance
running it gets `freeze` then `kill` (with the nonces of the tickets its sessions
came with) until its agent acknowledges them in a later heartbeat (`done`).  An
attacker holding the token of a second instance (n1) tries, as `nobody`:

1. to heartbeat as n0 with n1's token (reading n0's orders): 401;
2. to acknowledge every command id as n1, hoping to cancel n0's orders so the
   victim's program keeps running: n0 still gets both orders;
3. to read n0's orders in n1's own reply: n1 gets none.
"""

from __future__ import annotations

import json

import pytest
from attack import as_nobody, require_attacker
from conftest_oss import Clock, OssServer

pytestmark = pytest.mark.security
pytest_plugins = ["conftest_oss"]

ATTACK = r"""
import json, os, sys, urllib.error, urllib.request
url = sys.argv[1]
token = os.environ["N1_TOKEN"]

def beat(name, done):
    body = {"instance": name, "seq": 1, "done": done,
            "load": {"cpu_percent": 1, "memory_used_mb": 1, "runqueue": 0, "processes": 1}}
    req = urllib.request.Request(url + "/v1/agents/heartbeat", data=json.dumps(body).encode(),
                                 headers={"Authorization": "Bearer " + token,
                                          "Content-Type": "application/json"}, method="POST")
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, None

out = {"as_n0": beat("n0", list(range(1, 101)))[0]}
status, body = beat("n1", list(range(1, 101)))
out["as_n1"] = status
out["n1_commands"] = body["commands"] if body else None
print(json.dumps(out))
"""


def _beat(srv: OssServer, name: str, token: str) -> dict[str, object]:
    load = {"cpu_percent": 1, "memory_used_mb": 1, "runqueue": 0, "processes": 1}
    r = srv.http("POST", "/v1/agents/heartbeat", token, {"instance": name, "seq": 2, "load": load})
    assert r.status == 200, r.body
    return r.body  # type: ignore[no-any-return]


def test_stop_orders_reach_only_their_instance(oss_factory: object) -> None:
    require_attacker()
    clock = Clock()
    srv: OssServer = oss_factory(clock=clock)  # type: ignore[operator]
    admin = srv.account("root", admin=True)
    srv.http("PUT", "/v1/instance-types", admin.token,
             {"name": "t", "cpus": 1, "memory_mb": 1, "price_micros_per_s": 1000})  # fmt: skip
    srv.http("PUT", "/v1/pools", admin.token, {"name": "p", "instance_type": "t"})
    n0 = srv.instance("n0", cpus=1, pool="p")
    n1 = srv.instance("n1", cpus=1, pool="p")
    srv.call(srv.oss.instances.register_instance("n0", "127.0.0.1:1", "n0", 1, 1, 4, "ab" * 32))
    victim = srv.account("victim")
    prog = srv.http("POST", "/v1/programs", victim.token, {"argv": ["spin"]}).body
    ident = {"uid": 1000, "gid": 1000, "digest": "cd" * 32}
    r = srv.http("POST", f"/v1/programs/{prog['id']}/placements", victim.token,
                 {"exec_as": ident, "avoid": ["n1"]})  # fmt: skip
    assert r.status == 200, r.body
    (grant,) = r.body["exec_grants"]
    assert grant["instance"] == "n0"
    nonce = grant["tickets"][0].split(".")[2]
    srv.http("PUT", f"/v1/programs/{prog['id']}/limits", victim.token, {"hard_budget_micros": 1})
    clock.advance(2)
    srv.call(srv.oss.meter())
    assert srv.http("GET", f"/v1/programs/{prog['id']}", victim.token).body["state"] == (
        "stopped_budget"
    )

    res = as_nobody(ATTACK, srv.url, env={"PATH": "/usr/bin:/bin", "N1_TOKEN": n1})
    assert res.returncode == 0, res.stderr
    seen = json.loads(res.stdout)
    assert seen["as_n0"] == 401, seen  # n1's token cannot beat as n0
    assert seen["as_n1"] == 200 and seen["n1_commands"] == [], seen  # nothing of n0's

    # n0's orders survived n1's acknowledgements: freeze, then kill, with the nonce.
    cmds = _beat(srv, "n0", n0)["commands"]
    assert [(c["program"], c["action"]) for c in cmds] == [  # type: ignore[index,union-attr]
        (prog["id"], "freeze"),
        (prog["id"], "kill"),
    ]
    assert all(c["tickets"] == [nonce] for c in cmds)  # type: ignore[index,union-attr]
