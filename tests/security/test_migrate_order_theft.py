"""Attack: move another tenant's program, or take over a migrate order meant for another
instance (issue 12).

A migrate order rides on the source instance's heartbeat reply; the source asks the
OSS for the ticket of that order (minted with the target's exec key) and reports
its outcome.  While the victim's program is being moved off n0, an attacker
holding another tenant's token and the token of a second instance (n1) tries, as
`nobody`:

1. to migrate the victim's program with the other tenant's token: 404;
2. to read n0's migrate order in n1's own heartbeat reply: none there;
3. to get the ticket of any order id as n1 (a ticket would let it push images of
   its making into the target): 404 for every id;
4. to post an outcome for any order id as n1 (a fake `ok` would rewrite the
   victim's record, a fake failure would end the owner's request): 404 for every id.

n0 then still gets its order, gets a ticket the target's key verifies, and its own
outcome is the one the owner hears.
"""

from __future__ import annotations

import json
import threading
from typing import Any

import pytest
from attack import as_nobody, require_attacker
from conftest_oss import OssServer

from tests.conftest import wait_for
from vmagent.checkpoint.migrate import MigrationTickets

pytestmark = pytest.mark.security
pytest_plugins = ["conftest_oss"]

ATTACK = r"""
import json, os, sys, urllib.error, urllib.request
url, program = sys.argv[1], sys.argv[2]

def post(path, token, body):
    req = urllib.request.Request(url + path, data=json.dumps(body).encode(),
                                 headers={"Authorization": "Bearer " + token,
                                          "Content-Type": "application/json"}, method="POST")
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, None

n1, tenant = os.environ["N1_TOKEN"], os.environ["TENANT_TOKEN"]
out = {"tenant": post(f"/v1/programs/{program}/migrate", tenant, {"to": "n1"})[0]}
load = {"cpu_percent": 1, "memory_used_mb": 1, "runqueue": 0, "processes": 1}
status, body = post("/v1/agents/heartbeat", n1, {"instance": "n1", "seq": 9, "load": load})
out["n1_commands"] = body["commands"] if body else status
out["tickets"] = sorted({post("/v1/agents/migrations/ticket", n1,
                              {"command": i, "session": "ab" * 16})[0] for i in range(1, 65)})
out["outcomes"] = sorted({post("/v1/agents/migrations/outcome", n1,
                               {"command": i, "ok": True, "freeze_ms": 1})[0]
                          for i in range(1, 65)})
print(json.dumps(out))
"""

N1_KEY = "cd" * 32


def _register(srv: OssServer, name: str, token: str, address: str, key: str) -> None:
    body = {"instance": name, "address": address, "hostname": name, "cpus": 2,
            "memory_mb": 64, "exec_key": key}  # fmt: skip
    assert srv.http("POST", "/v1/agents/register", token, body).status == 200


def _beat(srv: OssServer, name: str, token: str) -> list[dict[str, Any]]:
    load = {"cpu_percent": 1, "memory_used_mb": 1, "runqueue": 0, "processes": 1}
    r = srv.http("POST", "/v1/agents/heartbeat", token, {"instance": name, "seq": 2, "load": load})
    assert r.status == 200, r.body
    return r.body["commands"]  # type: ignore[no-any-return]


def test_migrate_orders_reach_only_their_instance_and_owner(oss_factory: Any) -> None:
    require_attacker()
    srv: OssServer = oss_factory()
    n0 = srv.instance("n0")
    n1 = srv.instance("n1")
    _register(srv, "n0", n0, "127.0.0.1:1", "ab" * 32)
    _register(srv, "n1", n1, "127.0.0.1:2", N1_KEY)
    victim = srv.account("victim")
    other = srv.account("other")
    prog = srv.http("POST", "/v1/programs", victim.token, {"argv": ["count"]}).body
    r = srv.http("POST", f"/v1/programs/{prog['id']}/placements", victim.token,
                 {"processes": 1, "avoid": ["n1"]})  # fmt: skip
    assert r.status == 200 and r.body["assignments"][0]["instance"] == "n0", r.body
    row = {"program_id": prog["id"], "pid": 4242, "started": 1.5, "session": 4242,
           "argv": ["count"]}  # fmt: skip
    r = srv.http("POST", "/v1/agents/report", n0, {"instance": "n0", "seq": 1, "usage": [row]})
    assert r.status == 200 and r.body["refused"] == 0, r.body

    answer: list[Any] = []
    owner = threading.Thread(
        target=lambda: answer.append(
            srv.http("POST", f"/v1/programs/{prog['id']}/migrate", victim.token, {"to": "n1"})
        )
    )
    owner.start()
    try:
        assert wait_for(lambda: bool(srv.oss.commands.for_instance("n0", [])), 10)
        res = as_nobody(
            ATTACK, srv.url, prog["id"],
            env={"PATH": "/usr/bin:/bin", "N1_TOKEN": n1, "TENANT_TOKEN": other.token},
        )  # fmt: skip
        assert res.returncode == 0, res.stderr
        seen = json.loads(res.stdout)
        assert seen == {"tenant": 404, "n1_commands": [], "tickets": [404], "outcomes": [404]}

        # n0 still gets its order, and a ticket n1's key verifies, for the session it names.
        (cmd,) = _beat(srv, "n0", n0)
        assert (cmd["action"], cmd["pid"], cmd["to"], cmd["address"]) == (
            "migrate", 4242, "n1", "127.0.0.1:2",
        )  # fmt: skip
        r = srv.http("POST", "/v1/agents/migrations/ticket", n0,
                     {"command": cmd["id"], "session": "ef" * 16})  # fmt: skip
        assert r.status == 200, r.body
        check = MigrationTickets("no-instance-token", "n1", exec_key=N1_KEY)
        assert check.check(r.body["ticket"], burn=True) == "ef" * 16
        # n0's outcome is the one the owner hears: one line, the program runs on at n0.
        r = srv.http("POST", "/v1/agents/migrations/outcome", n0,
                     {"command": cmd["id"], "ok": False, "error": "target said no"})  # fmt: skip
        assert r.status == 200, r.body
    finally:
        owner.join(70)
    (got,) = answer
    assert got.status == 409, got.body
    assert got.body["message"] == (
        "Migration failed (the program runs on where it was): pid 4242 on n0: target said no"
    )
    rows = srv.http("GET", f"/v1/programs/{prog['id']}/processes", victim.token).body
    assert [(p["instance"], p["state"]) for p in rows["processes"]] == [("n0", "running")]
