"""Spend against budget (issue 16: `GET /v1/spend`, the web view's chart) and billing
filtered by time and user (`dcp-oss bill --since --user`), through the real metering
path of an OSS on loopback with a driven clock."""

from __future__ import annotations

from conftest_oss import Clock, OssServer

pytest_plugins = ["conftest_oss"]


def test_spend_per_account_user_and_program_and_billing_filters(oss_factory: object) -> None:
    clock = Clock()
    srv: OssServer = oss_factory(clock=clock)  # type: ignore[operator]
    admin = srv.account("root", admin=True)
    srv.http("PUT", "/v1/instance-types", admin.token,
             {"name": "t", "cpus": 1, "memory_mb": 1, "price_micros_per_s": 1000})  # fmt: skip
    srv.http("PUT", "/v1/pools", admin.token, {"name": "p", "instance_type": "t"})
    srv.instance("vm1", cpus=1, pool="p")  # 4 slots
    acme = srv.account("acme")
    bob = srv.http("POST", "/v1/users", acme.token, {"name": "bob"}).body
    bob_token = srv.http("POST", "/v1/tokens", acme.token, {"user_id": bob["id"]}).body["token"]
    srv.http("PUT", "/v1/limits", acme.token, {"budget_micros": 10_000})
    srv.http("PUT", f"/v1/users/{bob['id']}/limits", acme.token, {"hard_budget_micros": 9_000})
    first = srv.http("POST", "/v1/programs", acme.token, {"argv": ["a"]}).body
    clock.advance(4)
    srv.call(srv.oss.meter())  # 4 s x 1000 x 1/4 slot = 1000 for the first
    since = clock.now
    second = srv.http("POST", "/v1/programs", bob_token, {"argv": ["b", "--fast"]}).body
    clock.advance(8)
    srv.call(srv.oss.meter())  # 8 s x 250 each: first 3000 in all, second 2000
    got = srv.http("GET", "/v1/spend", acme.token).body
    assert got["account"] == {
        "level": "account", "id": acme.id, "name": "acme", "spent_micros": 5000,
        "budget_micros": 10_000, "hard_budget_micros": None,
    }  # fmt: skip
    users = {u["name"]: u for u in got["users"]}
    assert users["u"]["spent_micros"] == 3000 and users["bob"]["spent_micros"] == 2000
    assert users["bob"]["hard_budget_micros"] == 9_000
    assert [(p["id"], p["name"], p["spent_micros"]) for p in got["programs"]] == [
        (second["id"], "b --fast", 2000),
        (first["id"], "a", 3000),
    ]
    assert (
        srv.http("GET", "/v1/spend?limit=1", acme.token).body["programs"][0]["id"] == (second["id"])
    )
    # billing from a time on, and of one user
    late = srv.http("GET", f"/v1/billing?since={since + 0.5}", acme.token).body
    assert late["total_micros"] == 4000 and len(late["records"]) == 2
    mine = srv.http("GET", f"/v1/billing?user_id={bob['id']}", acme.token).body
    assert mine["total_micros"] == 2000
    assert {r["program_id"] for r in mine["records"]} == {second["id"]}
    # another tenant's user: not found; another tenant's spend: only its own
    other = srv.account("other")
    assert srv.http("GET", f"/v1/billing?user_id={bob['id']}", other.token).status == 404
    theirs = srv.http("GET", "/v1/spend", other.token).body
    assert theirs["account"]["spent_micros"] == 0 and theirs["programs"] == []
