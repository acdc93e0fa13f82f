"""Attack: resume another tenant's program suspended at its hard budget (issue 12).

A program whose instances can checkpoint is suspended, not ended, at its hard
budget: its placements stay and the agents keep its images.  Whoever may resume
it lets it spend again.  An attacker holding another tenant's token tries, as
`nobody`:

1. to resume the victim's suspended program: 404 (no sign it exists);
2. to raise the victim's program budget first, then resume: 404 both.

The program stays suspended, no `resume` order reaches its instance, and it is
billed nothing more; its owner, once the budget is raised, resumes it.
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
url, program = sys.argv[1], sys.argv[2]
token = os.environ["TENANT_TOKEN"]

def call(method, path, body=None):
    req = urllib.request.Request(url + path, data=json.dumps(body or {}).encode(),
                                 headers={"Authorization": "Bearer " + token,
                                          "Content-Type": "application/json"}, method=method)
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return r.status
    except urllib.error.HTTPError as e:
        return e.code

out = {"resume": call("POST", f"/v1/programs/{program}/resume")}
out["raise"] = call("PUT", f"/v1/programs/{program}/limits", {"hard_budget_micros": 10**12})
out["resume_after_raise"] = call("POST", f"/v1/programs/{program}/resume")
print(json.dumps(out))
"""


def _beat(srv: OssServer, name: str, token: str) -> list[dict[str, object]]:
    load = {"cpu_percent": 1, "memory_used_mb": 1, "runqueue": 0, "processes": 1}
    r = srv.http("POST", "/v1/agents/heartbeat", token, {"instance": name, "seq": 2, "load": load})
    assert r.status == 200, r.body
    return r.body["commands"]  # type: ignore[no-any-return]


def test_another_tenant_cannot_resume_a_suspended_program(oss_factory: object) -> None:
    require_attacker()
    clock = Clock()
    srv: OssServer = oss_factory(clock=clock)  # type: ignore[operator]
    admin = srv.account("root", admin=True)
    srv.http("PUT", "/v1/instance-types", admin.token,
             {"name": "t", "cpus": 1, "memory_mb": 1, "price_micros_per_s": 1000})  # fmt: skip
    srv.http("PUT", "/v1/pools", admin.token, {"name": "p", "instance_type": "t"})
    n0 = srv.instance("n0", cpus=1, pool="p")
    # n0's agent says its CRIU works: a hard budget suspends what runs there.
    r = srv.http("POST", "/v1/agents/register", n0,
                 {"instance": "n0", "address": "127.0.0.1:1", "hostname": "n0", "cpus": 1,
                  "memory_mb": 1024, "checkpoint": True})  # fmt: skip
    assert r.status == 200, r.body
    victim = srv.account("victim")
    other = srv.account("other")
    prog = srv.http("POST", "/v1/programs", victim.token, {"argv": ["count"]}).body
    r = srv.http("POST", f"/v1/programs/{prog['id']}/placements", victim.token, {"processes": 1})
    assert r.status == 200 and r.body["assignments"][0]["instance"] == "n0", r.body
    srv.http("PUT", f"/v1/programs/{prog['id']}/limits", victim.token, {"hard_budget_micros": 1})
    clock.advance(2)
    srv.call(srv.oss.meter())
    got = srv.http("GET", f"/v1/programs/{prog['id']}", victim.token).body
    assert got["state"] == "suspended", got
    assert [p["instance"] for p in got["placements"]] == ["n0"], got  # kept
    cmds = _beat(srv, "n0", n0)
    assert [(c["action"], c.get("checkpoint")) for c in cmds] == [
        ("freeze", None),
        ("kill", True),
    ], cmds
    spent = got["spent_micros"]

    res = as_nobody(
        ATTACK, srv.url, prog["id"], env={"PATH": "/usr/bin:/bin", "TENANT_TOKEN": other.token}
    )
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout) == {"resume": 404, "raise": 404, "resume_after_raise": 404}

    # Still suspended, still at its budget, billed nothing while suspended, no resume order.
    clock.advance(5)
    srv.call(srv.oss.meter())
    got = srv.http("GET", f"/v1/programs/{prog['id']}", victim.token).body
    assert got["state"] == "suspended" and got["spent_micros"] == spent, got
    assert all(c["action"] != "resume" for c in _beat(srv, "n0", n0))
    r = srv.http("POST", f"/v1/programs/{prog['id']}/resume", victim.token)
    assert r.status >= 400 and "raise it first" in r.body["message"], r.body

    # The owner raises the budget and resumes: n0 gets the order to restore it.
    srv.http("PUT", f"/v1/programs/{prog['id']}/limits", victim.token,
             {"hard_budget_micros": 10**12})  # fmt: skip
    r = srv.http("POST", f"/v1/programs/{prog['id']}/resume", victim.token)
    assert r.status == 200 and r.body["state"] == "running", r.body
    assert [c["action"] for c in _beat(srv, "n0", n0)][-1:] == ["resume"]
