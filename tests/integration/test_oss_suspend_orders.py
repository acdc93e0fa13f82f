"""What the OSS decides and orders at a hard budget (issue 12), on a real OSS with a
test clock: suspend where every instance can checkpoint, end where one cannot; a
cancelled suspended program gets a plain kill (its agents end it for good)."""

from __future__ import annotations

from typing import Any

from conftest_oss import Clock, OssServer

pytest_plugins = ["conftest_oss"]

LOAD = {"cpu_percent": 1, "memory_used_mb": 1, "runqueue": 0, "processes": 1}


def _lab(oss_factory: Any, checkpoint: bool) -> tuple[OssServer, Clock, str, Any, str]:
    clock = Clock()
    srv: OssServer = oss_factory(clock=clock)
    admin = srv.account("root", admin=True)
    srv.http("PUT", "/v1/instance-types", admin.token,
             {"name": "t", "cpus": 1, "memory_mb": 1, "price_micros_per_s": 1000})  # fmt: skip
    srv.http("PUT", "/v1/pools", admin.token, {"name": "p", "instance_type": "t"})
    n0 = srv.instance("n0", cpus=1, pool="p")
    r = srv.http("POST", "/v1/agents/register", n0,
                 {"instance": "n0", "address": "127.0.0.1:1", "hostname": "n0", "cpus": 1,
                  "memory_mb": 1024, "checkpoint": checkpoint})  # fmt: skip
    assert r.status == 200, r.body
    owner = srv.account("acme")
    prog = srv.http("POST", "/v1/programs", owner.token, {"argv": ["count"]}).body
    srv.http("PUT", f"/v1/programs/{prog['id']}/limits", owner.token, {"hard_budget_micros": 1})
    clock.advance(2)
    srv.call(srv.oss.meter())
    return srv, clock, n0, owner, prog["id"]


def _orders(srv: OssServer, n0: str) -> list[tuple[str, bool]]:
    r = srv.http("POST", "/v1/agents/heartbeat", n0, {"instance": "n0", "seq": 3, "load": LOAD})
    assert r.status == 200, r.body
    return [(c["action"], c.get("checkpoint") is True) for c in r.body["commands"]]


def test_without_criu_the_hard_budget_ends_the_program(oss_factory: Any) -> None:
    srv, _clock, n0, owner, pid = _lab(oss_factory, checkpoint=False)
    got = srv.http("GET", f"/v1/programs/{pid}", owner.token).body
    assert got["state"] == "stopped_budget" and got["placements"] == [], got
    assert _orders(srv, n0) == [("freeze", False), ("kill", False)]
    r = srv.http("POST", f"/v1/programs/{pid}/resume", owner.token)
    assert r.status == 409, r.body
    assert r.body["message"].endswith(f": program {pid} is stopped_budget, not suspended")


def test_a_cancelled_suspended_program_is_killed_for_good(oss_factory: Any) -> None:
    srv, clock, n0, owner, pid = _lab(oss_factory, checkpoint=True)
    got = srv.http("GET", f"/v1/programs/{pid}", owner.token).body
    assert got["state"] == "suspended" and got["placements"], got
    assert _orders(srv, n0) == [("freeze", False), ("kill", True)]
    spent = got["spent_micros"]
    clock.advance(10)
    srv.call(srv.oss.meter())  # suspended: not billed
    assert srv.http("GET", f"/v1/programs/{pid}", owner.token).body["spent_micros"] == spent
    r = srv.http("POST", f"/v1/programs/{pid}/cancel", owner.token)
    assert r.status == 200 and r.body["state"] == "cancelled" and r.body["placements"] == []
    # The earlier orders were not acknowledged: they come again, then the plain kill.
    assert _orders(srv, n0)[-2:] == [("freeze", False), ("kill", False)]
    slots = srv.http("GET", "/v1/instances/n0", srv.account("op", admin=True).token).body
    assert slots["used_slots"] == 0, slots
