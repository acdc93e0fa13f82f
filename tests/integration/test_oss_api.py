"""OSS API against a real aiohttp server on loopback with real SQLite."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest
from conftest_oss import OssServer

from oss import models as m
from oss.client import OssClient
from oss.errors import Conflict, NotFound

pytest_plugins = ["conftest_oss"]


def _submit(srv: OssServer, token: str, **kw: Any) -> Any:
    body = {"argv": ["/bin/echo", "hi"], **kw}
    return srv.http("POST", "/v1/programs", token, body)


def test_agent_contract_register_and_heartbeat(srv: OssServer) -> None:
    token = srv.call(srv.oss.mint_instance_token("vm1"))
    r = srv.http(
        "POST",
        "/v1/agents/register",
        token,
        {
            "instance": "vm1",
            "address": "10.0.0.2:7070",
            "hostname": "g1",
            "cpus": 2,
            "memory_mb": 2048,
        },
    )
    assert r.status == 200 and r.body == {"instance": "vm1", "heartbeat_interval": 1.0}
    hb = {
        "instance": "vm1",
        "seq": 1,
        "load": {"cpu_percent": 12.5, "memory_used_mb": 300, "runqueue": 0.5, "processes": 7},
    }
    r = srv.http("POST", "/v1/agents/heartbeat", token, hb)
    assert r.status == 200 and r.body == {"ok": True, "commands": []}  # no order for vm1
    # Bad token: 401; another instance's name with this token: 401.
    assert srv.http("POST", "/v1/agents/heartbeat", "dcpi_nope", hb).status == 401
    other = srv.call(srv.oss.mint_instance_token("vm2"))
    assert srv.http("POST", "/v1/agents/heartbeat", other, hb).status == 401
    # Account tokens are not instance tokens.
    acct = srv.account("a")
    assert srv.http("POST", "/v1/agents/heartbeat", acct.token, hb).status == 401
    admin = srv.account("root", admin=True)
    inst = srv.http("GET", "/v1/instances/vm1", admin.token).body
    assert inst["state"] == "ready" and inst["cpus"] == 2 and inst["slots"] == 8
    # The host is the peer's (the agent registered over loopback); the port is the body's.
    assert inst["address"] == "127.0.0.1:7070"


def test_submit_inspect_list_cancel(srv: OssServer) -> None:
    srv.instance("vm1")
    a = srv.account("a")
    r = _submit(srv, a.token, env={"X": "1"}, cwd="/tmp", image="img:1", processes=2)
    assert r.status == 200, r.body
    p = r.body
    assert p["state"] == "running" and p["processes"] == 2
    assert p["placements"] == [{"instance": "vm1", "processes": 2}]
    assert p["env"] == {"X": "1"} and p["cwd"] == "/tmp" and p["image"] == "img:1"
    got = srv.http("GET", f"/v1/programs/{p['id']}", a.token).body
    assert got["id"] == p["id"] and got["argv"] == ["/bin/echo", "hi"]
    ids = [x["id"] for x in srv.http("GET", "/v1/programs", a.token).body]
    assert ids == [p["id"]]
    c = srv.http("POST", f"/v1/programs/{p['id']}/cancel", a.token)
    assert c.status == 200 and c.body["state"] == "cancelled" and c.body["placements"] == []
    again = srv.http("POST", f"/v1/programs/{p['id']}/cancel", a.token)
    assert again.status == 409 and "already cancelled" in again.body["message"]
    inst = srv.http("GET", "/v1/instances", srv.account("root", admin=True).token).body
    assert inst[0]["used_slots"] == 0


def test_no_capacity_pending_then_placed_when_instance_registers(srv: OssServer) -> None:
    a = srv.account("a")
    p = _submit(srv, a.token).body
    assert p["state"] == "pending" and p["placements"] == []
    srv.instance("vm1")
    srv.call(srv.oss.retry_waiting())
    got = srv.http("GET", f"/v1/programs/{p['id']}", a.token).body
    assert got["state"] == "running" and got["placements"] == [{"instance": "vm1", "processes": 1}]


def test_placements_pack_then_spread_with_policy(srv: OssServer) -> None:
    admin = srv.account("root", admin=True)
    srv.http(
        "PUT",
        "/v1/instance-types",
        admin.token,
        {"name": "small", "cpus": 1, "memory_mb": 512, "price_micros_per_s": 10},
    )
    srv.http(
        "PUT",
        "/v1/instance-types",
        admin.token,
        {"name": "big", "cpus": 4, "memory_mb": 4096, "price_micros_per_s": 100},
    )
    for t in ("small", "big"):
        assert (
            srv.http(
                "PUT",
                "/v1/pools",
                admin.token,
                {"name": f"p{t}", "instance_type": t, "warm_target": 0},
            ).status
            == 200
        )
    srv.instance("s1", cpus=1, pool="psmall")
    srv.instance("s2", cpus=1, pool="psmall")
    srv.instance("b1", cpus=4, pool="pbig")
    a = srv.account("a")
    # Price ceiling excludes the big type; 1 cpu x 4 slots per instance.
    p = _submit(srv, a.token, processes=4, resource_policy={"max_price_micros": 50}).body
    assert p["placements"] == [{"instance": "s1", "processes": 4}]
    more = srv.http("POST", f"/v1/programs/{p['id']}/placements", a.token, {"processes": 2}).body
    assert more["assignments"] == [{"instance": "s2", "processes": 2}]
    # An instance-type requirement.
    q = _submit(srv, a.token, resource_policy={"instance_type": "big"}).body
    assert q["placements"] == [{"instance": "b1", "processes": 1}]
    # Release, then the slots are free again.
    assert (
        srv.http(
            "POST", f"/v1/programs/{p['id']}/release", a.token, {"instance": "s2", "processes": 2}
        ).status
        == 200
    )
    assert srv.http("GET", "/v1/instances/s2", admin.token).body["used_slots"] == 0


def test_dedicated_tenancy_excludes_other_programs(srv: OssServer) -> None:
    srv.instance("vm1")
    srv.instance("vm2")
    a, b = srv.account("a"), srv.account("b")
    d = _submit(srv, a.token, resource_policy={"tenancy": "dedicated"}).body
    (mine,) = d["placements"]
    s = _submit(srv, b.token, processes=8).body
    assert [pl["instance"] for pl in s["placements"]] != [mine["instance"]]
    assert all(pl["instance"] != mine["instance"] for pl in s["placements"])
    # The dedicated program still packs onto its own instance.
    more = srv.http("POST", f"/v1/programs/{d['id']}/placements", a.token, {"processes": 3}).body
    assert more["assignments"] == [{"instance": mine["instance"], "processes": 3}]


def test_logs_ordered_compressed_queryable_and_streamed(srv: OssServer) -> None:
    srv.instance("vm1")
    a = srv.account("a")
    p = _submit(srv, a.token).body
    lines = [
        {"ts": 10.0, "stream": "stdout", "text": "out-1", "instance": "vm1", "pid": 5},
        {"ts": 12.0, "stream": "stderr", "text": "err-1", "instance": "vm2", "pid": 6},
        {"ts": 11.0, "stream": "stdout", "text": "out-2", "instance": "vm2", "pid": 6},
    ]
    assert srv.http("POST", f"/v1/programs/{p['id']}/logs", a.token, {"lines": lines}).status == 200
    base = f"/v1/programs/{p['id']}"
    all_ = srv.http("GET", base + "/logs?stream=stdout", a.token).body["lines"]
    assert [ln["text"] for ln in all_] == ["out-1", "out-2"]
    cons = [ln["text"] for ln in srv.http("GET", base + "/logs", a.token).body["lines"]]
    assert cons.index("out-1") < cons.index("out-2") < cons.index("err-1")
    assert [ln["text"] for ln in srv.http("GET", base + "/stderr", a.token).body["lines"]] == [
        "err-1"
    ]
    by_inst = srv.http("GET", base + "/logs?instance=vm2", a.token).body["lines"]
    assert [ln["text"] for ln in by_inst] == ["out-2", "err-1"]
    window = srv.http("GET", base + "/logs?since=10.5&until=11.5", a.token).body["lines"]
    assert [ln["text"] for ln in window] == ["out-2"]
    # Stored compressed: the chunks in SQLite are zstd frames.
    blobs = srv.call(
        srv.oss.store.read(
            lambda c: [
                r[0]
                for r in c.execute("SELECT data FROM log_chunks WHERE program_id=?", (p["id"],))
            ]
        )
    )
    assert blobs and all(b[:4] == b"\x28\xb5\x2f\xfd" for b in blobs)

    async def follow() -> list[str]:
        async with OssClient(srv.url, a.token) as c:
            got = []
            async for ln in c.follow(p["id"], "stdout"):
                got.append(ln.text)
                if ln.text == "late":
                    await c.finish(p["id"], 0)
            return got

    async def writer() -> None:
        async with OssClient(srv.url, a.token) as c:
            await asyncio.sleep(0.3)
            await c.append_logs(p["id"], [m.LogLineIn(ts=20.0, stream="stdout", text="late")])

    async def both() -> list[str]:
        async with asyncio.timeout(30):
            got, _ = await asyncio.gather(follow(), writer())
        return got

    assert asyncio.run(both()) == ["out-1", "out-2", "late"]


def test_oss_log_records_decisions(srv: OssServer) -> None:
    srv.instance("vm1")
    admin = srv.account("root", admin=True)
    a = srv.account("a")
    p = _submit(srv, a.token, scaling_policy={"min_instances": 1, "max_instances": 2}).body
    srv.call(srv.oss.optimize())
    srv.call(srv.oss.tick())
    text = [ln["text"] for ln in srv.http("GET", "/v1/oss/logs", admin.token).body["lines"]]
    assert any("registered" in t for t in text)
    assert any(p["id"] in t and "optimizer" in t for t in text)
    plog = [
        ln["text"] for ln in srv.http("GET", f"/v1/programs/{p['id']}/logs", a.token).body["lines"]
    ]
    assert any(t.startswith("submitted by") for t in plog)
    assert any("optimizer: hold" in t and "within bounds" in t for t in plog)
    assert srv.http("GET", "/v1/oss/logs", a.token).status == 403


def test_metrics_prometheus_and_json(srv: OssServer) -> None:
    srv.instance("vm1")
    admin = srv.account("root", admin=True)
    a = srv.account("a")
    p = _submit(srv, a.token).body
    rep = {
        "instance": "vm1",
        "syscalls": {"storage": 5, "compute": 2},
        "latency_seconds": {"storage": 0.01},
        "cpu_seconds": 1.5,
        "memory_bytes": 1000,
        "io_read_bytes": 10,
        "io_write_bytes": 20,
        "net_rx_bytes": 30,
        "net_tx_bytes": 40,
    }
    assert srv.http("POST", f"/v1/programs/{p['id']}/metrics", a.token, rep).status == 200
    assert srv.http("POST", f"/v1/programs/{p['id']}/metrics", a.token, rep).status == 200
    c = srv.http("GET", f"/v1/programs/{p['id']}/metrics", a.token).body
    assert c["syscalls"] == {"storage": 10, "compute": 4} and c["cpu_seconds"] == 3.0
    assert c["net_rx_bytes"] == 60 and c["memory_bytes"] == 1000
    j = srv.http("GET", "/v1/metrics", a.token).body
    assert j["programs"][p["id"]]["io_write_bytes"] == 40
    assert j["instances"]["vm1"]["syscalls"] == 14
    prom = srv.http("GET", "/metrics", admin.token)
    text = prom.raw.decode()
    assert prom.status == 200
    assert (
        f'dcp_program_syscalls_total{{instance="vm1",program="{p["id"]}",service="storage"}} 10.0'
        in text
    )
    assert "dcp_api_request_seconds_bucket" in text
    assert srv.http("GET", "/metrics", a.token).status == 403


def test_client_maps_errors_to_types(srv: OssServer) -> None:
    a = srv.account("a")

    async def go() -> None:
        async with OssClient(srv.url, a.token) as c:
            with pytest.raises(NotFound):
                await c.program("prog_missing")
            p = await c.submit(m.ProgramSubmit(argv=["x"]))
            await c.cancel(p.id)
            with pytest.raises(Conflict) as ei:
                await c.cancel(p.id)
            assert "already cancelled" in str(ei.value)

    asyncio.run(go())


def test_openapi_served_and_complete(srv: OssServer) -> None:
    from oss.server import ROUTES

    doc = srv.http("GET", "/openapi.json").body
    assert doc["openapi"].startswith("3.")
    for r in ROUTES:
        assert r.method.lower() in doc["paths"][r.path]
    for name, schema in doc["components"]["schemas"].items():
        if schema.get("type") == "object":
            assert schema.get("additionalProperties") is False, name
    json.dumps(doc)


def test_follower_hanging_up_is_harmless(srv: OssServer, caplog: pytest.LogCaptureFixture) -> None:
    import aiohttp

    srv.instance("vm1")
    a = srv.account("a")
    p = _submit(srv, a.token).body
    line = {"lines": [{"text": "one", "stream": "stdout"}]}
    srv.http("POST", f"/v1/programs/{p['id']}/logs", a.token, line)

    async def hang_up() -> bytes:
        async with aiohttp.ClientSession() as s:
            async with s.get(
                f"{srv.url}/v1/programs/{p['id']}/stdout?follow=true",
                headers={"Authorization": f"Bearer {a.token}"},
            ) as r:
                assert r.status == 200
                return await r.content.readline()

    assert b'"one"' in asyncio.run(hang_up())
    srv.http("POST", f"/v1/programs/{p['id']}/logs", a.token, {"lines": [{"text": "two"}]})
    assert srv.http("GET", "/healthz").status == 200
    assert not [r for r in caplog.records if "unhandled" in r.getMessage()]


def test_no_capacity_for_more_processes_is_503_with_reason(srv: OssServer) -> None:
    srv.instance("vm1", cpus=1)  # 4 slots
    a = srv.account("a")
    p = _submit(srv, a.token, processes=3).body
    r = srv.http("POST", f"/v1/programs/{p['id']}/placements", a.token, {"processes": 2})
    assert r.status == 503 and r.body["error"] == "no_capacity"
    assert "only 1 of 2 processes fit" in r.body["message"]
    got = srv.http("GET", f"/v1/programs/{p['id']}", a.token).body
    assert got["processes"] == 3  # all-or-nothing: nothing was half-placed
