"""Billing arithmetic for both pricing models, through the real metering path."""

from __future__ import annotations

from conftest_oss import Clock, OssServer

from oss.billing.pricing import Rates

pytest_plugins = ["conftest_oss"]


def _setup(srv: OssServer) -> dict[str, str]:
    admin = srv.account("root", admin=True)
    srv.http(
        "PUT",
        "/v1/instance-types",
        admin.token,
        {"name": "t2", "cpus": 2, "memory_mb": 1, "price_micros_per_s": 1000},
    )
    srv.http("PUT", "/v1/pools", admin.token, {"name": "p", "instance_type": "t2"})
    return {
        "vm1": srv.instance("vm1", cpus=2, pool="p"),  # 8 slots
        "vm2": srv.instance("vm2", cpus=2, pool="p"),
    }


def test_sum_and_premium_models(oss_factory: object) -> None:
    clock = Clock()
    rates = Rates(storage_micros_per_gb_s=1024, net_micros_per_gb=2048, premium_pct=25)
    srv = oss_factory(clock=clock, rates=rates)  # type: ignore[operator]
    itokens = _setup(srv)
    plain = srv.account("plain", pricing_model="sum")
    prem = srv.account("prem", pricing_model="premium")
    body = {"argv": ["x"], "processes": 2, "storage_mb": 512}
    p1 = srv.http("POST", "/v1/programs", plain.token, body).body
    p2 = srv.http(
        "POST", "/v1/programs", prem.token, {**body, "resource_policy": {"tenancy": "dedicated"}}
    ).body
    assert p2["state"] == "running"
    # 1 GiB of traffic for p1, measured by the instance it runs on (what a tenant
    # declares itself is not billed).
    srv.http(
        "POST",
        f"/v1/programs/{p1['id']}/metrics",
        plain.token,
        {"net_rx_bytes": 1 << 40, "net_tx_bytes": 1 << 40},
    )
    where = p1["placements"][0]["instance"]
    row = {"program_id": p1["id"], "pid": 7, "started": 1.0}
    report = {"instance": where, "seq": 1, "usage": [{**row, "net_rx": 1 << 29, "net_tx": 1 << 29}]}
    assert srv.http("POST", "/v1/agents/report", itokens[where], report).body["acked_seq"] == 1
    clock.advance(10.7)  # 10 whole seconds billed, 0.7 carried over
    srv.call(srv.oss.meter())
    # sum: shared, 2 of 8 slots: 10 s x 1000 x 2/8 = 2500; storage 0.5 GiB x 10 s x 1024 = 5120;
    # network 1 GiB x 2048 = 2048.  Total 9668.
    b1 = srv.http("GET", "/v1/billing", plain.token).body
    assert b1["total_micros"] == 9668
    (r1,) = b1["records"]
    assert (
        r1["seconds"],
        r1["model"],
        r1["instance_micros"],
        r1["storage_micros"],
        r1["net_micros"],
        r1["premium_micros"],
    ) == (10, "sum", 2500, 5120, 2048, 0)
    # premium: dedicated -> whole instance 10 x 1000 = 10000; storage 5120; no traffic;
    # premium 25% of 15120 = 3780.  Total 18900.
    b2 = srv.http("GET", "/v1/billing", prem.token).body
    assert b2["total_micros"] == 18900 and b2["records"][0]["premium_micros"] == 3780
    # The carried 0.7 s joins the next interval: 0.3 s more makes one whole second.
    clock.advance(0.3)
    srv.call(srv.oss.meter())
    b1 = srv.http("GET", "/v1/billing", plain.token).body
    assert [r["seconds"] for r in b1["records"]] == [10, 1]
    assert b1["records"][1]["amount_micros"] == 250 + 512
    assert b1["records"][1]["start"] == b1["records"][0]["end"]
    # Per-program billing and spent_micros agree with the records.
    pb = srv.http("GET", f"/v1/programs/{p1['id']}/billing", plain.token).body
    assert pb["total_micros"] == 9668 + 762
    assert srv.http("GET", f"/v1/programs/{p1['id']}", plain.token).body["spent_micros"] == 10430


def test_finished_programs_stop_accruing(oss_factory: object) -> None:
    clock = Clock()
    srv = oss_factory(clock=clock)  # type: ignore[operator]
    _setup(srv)
    a = srv.account("a")
    p = srv.http("POST", "/v1/programs", a.token, {"argv": ["x"], "processes": 8}).body
    clock.advance(3)
    srv.call(srv.oss.meter())
    srv.http("POST", f"/v1/programs/{p['id']}/finish", a.token, {"exit_status": 0})
    clock.advance(100)
    srv.call(srv.oss.meter())
    b = srv.http("GET", "/v1/billing", a.token).body
    assert b["total_micros"] == 3000 and len(b["records"]) == 1
    got = srv.http("GET", f"/v1/programs/{p['id']}", a.token).body
    assert got["state"] == "finished" and got["exit_status"] == 0
