"""Availability: silent instances fail, their programs recover, pools replace them."""

from __future__ import annotations

import asyncio
from typing import Any

from conftest_oss import Clock, OssServer

from oss import models as m
from oss.client import OssClient
from oss.compute.pool import Credentials, InstanceType

pytest_plugins = ["conftest_oss"]


class RegisteringProvider:
    """A provider whose 'instances' are agents-in-miniature: each registers over HTTP.

    It implements oss.compute.pool.Provider against the real server; what a VM's agent
    would do on boot is one POST /v1/agents/register with the minted token.
    """

    def __init__(self) -> None:
        self.url = ""
        self.created: list[tuple[str, str]] = []
        self.destroyed: list[str] = []

    async def create(
        self, name: str, instance_type: InstanceType, credentials: Credentials
    ) -> None:
        self.created.append((name, instance_type.name))
        async with OssClient(self.url, credentials.token) as c:
            await c.register(
                m.AgentRegister(
                    instance=name,
                    address="127.0.0.1:1",
                    hostname=name,
                    cpus=instance_type.cpus,
                    memory_mb=instance_type.memory_mb,
                )
            )

    async def destroy(self, name: str) -> None:
        self.destroyed.append(name)


def _beat(srv: OssServer, name: str, token: str, seq: int = 1) -> None:
    r = srv.http(
        "POST",
        "/v1/agents/heartbeat",
        token,
        {
            "instance": name,
            "seq": seq,
            "load": {"cpu_percent": 5, "memory_used_mb": 1, "runqueue": 0, "processes": 1},
        },
    )
    assert r.status == 200, r.body


def test_silent_instance_fails_and_program_recovers_on_replacement(oss_factory: Any) -> None:
    clock = Clock()
    prov = RegisteringProvider()
    srv: OssServer = oss_factory(clock=clock, providers={"test": prov}, heartbeat_timeout=3.0)
    prov.url = srv.url
    admin = srv.account("root", admin=True)
    srv.http(
        "PUT",
        "/v1/instance-types",
        admin.token,
        {"name": "t", "cpus": 1, "memory_mb": 64, "price_micros_per_s": 1},
    )
    assert (
        srv.http(
            "PUT",
            "/v1/pools",
            admin.token,
            {"name": "p", "instance_type": "t", "warm_target": 1, "provider": "test"},
        ).status
        == 200
    )
    srv.call(srv.oss.pools.reconcile())
    assert len(prov.created) == 1
    first = prov.created[0][0]
    a = srv.account("a")
    p = srv.http("POST", "/v1/programs", a.token, {"argv": ["x"], "processes": 2}).body
    assert p["placements"] == [{"instance": first, "processes": 2}]
    # The program's instance is in use: the pool warms one more idle instance.
    srv.call(srv.oss.pools.reconcile())
    assert len(prov.created) == 2
    second = prov.created[1][0]
    # Both heartbeat for a while; then the first goes silent.
    tok1 = srv.call(srv.oss.mint_instance_token(first))
    tok2 = srv.call(srv.oss.mint_instance_token(second))
    for t in range(1, 4):
        clock.advance(1)
        _beat(srv, first, tok1, t)
        _beat(srv, second, tok2, t)
        assert srv.call(srv.oss.check_availability()) == []
    clock.advance(2)  # first silent 2 s: within the 3 s timeout
    _beat(srv, second, tok2, 4)
    assert srv.call(srv.oss.check_availability()) == []
    clock.advance(2)  # first silent 4 s
    _beat(srv, second, tok2, 5)
    failed = srv.call(srv.oss.check_availability())
    assert failed == [first]
    inst = srv.http("GET", f"/v1/instances/{first}", admin.token).body
    assert inst["state"] == "failed"
    got = srv.http("GET", f"/v1/programs/{p['id']}", a.token).body
    assert got["state"] == "recovering" and got["lost_processes"] == 2
    assert f"instance {first} failed" in got["status_reason"]
    # Recovery: the idle warm instance takes the lost processes ...
    srv.call(srv.oss.retry_waiting())
    got = srv.http("GET", f"/v1/programs/{p['id']}", a.token).body
    assert got["state"] == "running" and got["placements"] == [{"instance": second, "processes": 2}]
    # ... and the pool replaces the failed instance.
    srv.call(srv.oss.pools.reconcile())
    assert len(prov.created) == 3
    srv.call(srv.oss.tick())
    log = [ln["text"] for ln in srv.http("GET", "/v1/oss/logs", admin.token).body["lines"]]
    assert any(f"instance {first} failed" in t for t in log)
    assert any("requesting replacements" in t for t in log)
    plog = [
        ln["text"] for ln in srv.http("GET", f"/v1/programs/{p['id']}/logs", a.token).body["lines"]
    ]
    assert any("marked for recovery" in t for t in plog)
    # A failed instance's heartbeat is refused until it registers again.
    r = srv.http(
        "POST",
        "/v1/agents/heartbeat",
        tok1,
        {
            "instance": first,
            "seq": 9,
            "load": {"cpu_percent": 5, "memory_used_mb": 1, "runqueue": 0, "processes": 1},
        },
    )
    assert r.status == 409 and "register again" in r.body["message"]


def test_optimizer_scales_up_saturated_program_within_limits(oss_factory: Any) -> None:
    clock = Clock()
    srv: OssServer = oss_factory(clock=clock)
    toks = {f"vm{i}": srv.instance(f"vm{i}", cpus=1) for i in range(3)}
    a = srv.account("a")
    p = srv.http(
        "POST",
        "/v1/programs",
        a.token,
        {
            "argv": ["x"],
            "processes": 3,
            "scaling_policy": {"goal": "fastest", "min_instances": 1, "max_instances": 3},
            "limits": {"max_instances": 2},
        },
    ).body
    (pl,) = p["placements"]
    srv.http(
        "POST",
        "/v1/agents/heartbeat",
        toks[pl["instance"]],
        {
            "instance": pl["instance"],
            "seq": 1,
            "load": {"cpu_percent": 99, "memory_used_mb": 1, "runqueue": 3, "processes": 3},
        },
    )
    srv.call(srv.oss.optimize())
    got = srv.http("GET", f"/v1/programs/{p['id']}", a.token).body
    assert got["target_instances"] == 2
    # The next process spreads to a second instance (target width 2).
    more = srv.http("POST", f"/v1/programs/{p['id']}/placements", a.token, {"processes": 1}).body
    assert more["assignments"][0]["instance"] != pl["instance"]
    srv.call(srv.oss.optimize())
    got = srv.http("GET", f"/v1/programs/{p['id']}", a.token).body
    assert got["target_instances"] == 2  # held by the program's instance limit
    logs = [
        ln["text"] for ln in srv.http("GET", f"/v1/programs/{p['id']}/logs", a.token).body["lines"]
    ]
    assert any("scale_up to 2" in t and "saturated" in t for t in logs)

    async def _noop() -> None:
        await asyncio.sleep(0)

    asyncio.run(_noop())


class BrokenProvider:
    """A provider whose create fails with a foreign exception type."""

    def __init__(self) -> None:
        self.calls = 0
        self.destroyed: list[str] = []

    async def create(
        self, name: str, instance_type: InstanceType, credentials: Credentials
    ) -> None:
        self.calls += 1
        raise RuntimeError("hypervisor on fire")

    async def destroy(self, name: str) -> None:
        self.destroyed.append(name)


def test_failing_provider_marks_instance_failed_and_is_logged(oss_factory: Any) -> None:
    prov = BrokenProvider()
    clock = Clock()
    srv: OssServer = oss_factory(clock=clock, providers={"broken": prov})
    admin = srv.account("root", admin=True)
    srv.http(
        "PUT",
        "/v1/instance-types",
        admin.token,
        {"name": "t", "cpus": 1, "memory_mb": 64, "price_micros_per_s": 1},
    )
    srv.http(
        "PUT",
        "/v1/pools",
        admin.token,
        {"name": "p", "instance_type": "t", "warm_target": 2, "provider": "broken"},
    )
    srv.call(srv.oss.pools.reconcile())
    assert prov.calls == 2
    insts = srv.http("GET", "/v1/instances", admin.token).body
    assert [i["state"] for i in insts] == ["failed", "failed"]
    srv.call(srv.oss.tick())
    log = [ln["text"] for ln in srv.http("GET", "/v1/oss/logs", admin.token).body["lines"]]
    assert sum("hypervisor on fire" in t and "back off" not in t for t in log) == 2
    # Backed off: 2 failures -> 4 s before the next try, then one create at a time, and
    # the failed instances are destroyed through the provider (one per try as well).
    assert sum("back off 4 s after 2 failed creates" in t for t in log) == 1, log
    srv.call(srv.oss.pools.reconcile())
    assert prov.calls == 2 and prov.destroyed == []
    clock.advance(4)
    srv.call(srv.oss.pools.reconcile())
    assert prov.calls == 3 and len(prov.destroyed) == 1


def test_a_client_placed_program_is_not_re_placed_after_a_failure(oss_factory: Any) -> None:
    """Processes placed one exec at a time (dcptrace) end with their instance: recovery
    must not hold phantom slots for them elsewhere; the status names the instance."""
    clock = Clock()
    srv: OssServer = oss_factory(clock=clock, heartbeat_timeout=3.0)
    toks = {n: srv.instance(n, cpus=1) for n in ("vm1", "vm2")}
    a = srv.account("a")
    p = srv.http("POST", "/v1/programs", a.token, {"argv": ["make"]}).body
    for pl in p["placements"]:  # the root runs at the client: its slot is given back
        srv.http("POST", f"/v1/programs/{p['id']}/release", a.token, pl)
    r = srv.http("POST", f"/v1/programs/{p['id']}/placements", a.token, {"processes": 2})
    (where,) = {x["instance"] for x in r.body["assignments"]}
    other = "vm2" if where == "vm1" else "vm1"
    clock.advance(4)
    _beat(srv, other, toks[other])
    assert srv.call(srv.oss.check_availability()) == [where]
    srv.call(srv.oss.retry_waiting())
    got = srv.http("GET", f"/v1/programs/{p['id']}", a.token).body
    assert got["state"] == "running" and got["lost_processes"] == 0, got
    assert got["placements"] == [] and got["processes"] == 0, got
    assert got["status_reason"].startswith(f"instance {where} failed: ")
    assert srv.http("GET", f"/v1/instances/{other}", a.token).status == 404  # nothing there
    srv.call(srv.oss.tick())
    plog = [
        ln["text"] for ln in srv.http("GET", f"/v1/programs/{p['id']}/logs", a.token).body["lines"]
    ]
    assert any(f"instance {where} lost: 2 process(es) ended" in t for t in plog), plog
