"""Many simultaneous submissions against a limit never overshoot it (real server, real SQLite)."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from conftest_oss import OssServer

from oss import models as m
from oss.client import OssClient
from oss.compute.scheduler import Tenancy
from oss.errors import BudgetExhausted, LimitExceeded, OssError

pytest_plugins = ["conftest_oss"]


async def _storm(url: str, token: str, n: int, spec: m.ProgramSubmit) -> list[Any]:
    async with OssClient(url, token) as c:

        async def one() -> Any:
            try:
                return await c.submit(spec)
            except OssError as exc:
                return exc

        return await asyncio.gather(*(one() for _ in range(n)))


def _usage(srv: OssServer, account_id: str) -> tuple[int, int]:
    def op(c: Any) -> tuple[int, int]:
        inst = c.execute(
            "SELECT count(DISTINCT instance) FROM placements WHERE account_id=?", (account_id,)
        ).fetchone()[0]
        storage = c.execute(
            "SELECT coalesce(sum(storage_mb),0) FROM programs WHERE account_id=? AND"
            " state IN ('pending','running','recovering')",
            (account_id,),
        ).fetchone()[0]
        return inst, storage

    return srv.call(srv.oss.store.read(op))


def test_instance_limit_never_overshoots_under_concurrent_submissions(srv: OssServer) -> None:
    for i in range(12):
        srv.instance(f"vm{i:02d}", cpus=1)
    a = srv.account("a")
    assert srv.http("PUT", "/v1/limits", a.token, {"max_instances": 5}).status == 200
    spec = m.ProgramSubmit(argv=["x"], resource_policy=m.ResourcePolicy(tenancy=Tenancy.DEDICATED))
    results = asyncio.run(_storm(srv.url, a.token, 60, spec))
    ok = [r for r in results if isinstance(r, m.Program)]
    refused = [r for r in results if isinstance(r, LimitExceeded)]
    assert len(ok) == 5 and len(refused) == 55, [type(r) for r in results]
    assert all("instances limit is 5" in str(r) for r in refused)
    assert len({p.placements[0].instance for p in ok}) == 5
    assert _usage(srv, a.id)[0] == 5


def test_storage_limit_and_user_limit_under_concurrency(srv: OssServer) -> None:
    for i in range(4):
        srv.instance(f"vm{i}", cpus=4)
    a = srv.account("a")
    srv.http("PUT", "/v1/limits", a.token, {"max_storage_mb": 1000})
    spec = m.ProgramSubmit(argv=["x"], storage_mb=300)
    results = asyncio.run(_storm(srv.url, a.token, 40, spec))
    assert sum(isinstance(r, m.Program) for r in results) == 3
    assert _usage(srv, a.id)[1] == 900
    # A user-level instance limit, with shared instances (several programs per instance).
    b = srv.account("b")
    user = b.user_id
    srv.http("PUT", f"/v1/users/{user}/limits", b.token, {"max_instances": 2})
    spec2 = m.ProgramSubmit(argv=["x"], processes=16)  # 16 slots: a whole 4-cpu instance
    results = asyncio.run(_storm(srv.url, b.token, 20, spec2))
    placed = [r for r in results if isinstance(r, m.Program) and r.placements]
    assert _usage(srv, b.id)[0] <= 2
    assert 1 <= len(placed) <= 2


def test_program_limit_and_budget_block_scale_up(srv: OssServer) -> None:
    srv.instance("vm1", cpus=1)
    srv.instance("vm2", cpus=1)
    a = srv.account("a")
    p = srv.http(
        "POST",
        "/v1/programs",
        a.token,
        {
            "argv": ["x"],
            "processes": 4,
            "limits": {"max_instances": 1},
        },
    ).body
    r = srv.http("POST", f"/v1/programs/{p['id']}/placements", a.token, {"processes": 1})
    assert r.status == 409 and r.body["error"] == "limit_exceeded"
    assert r.body["fields"]["level"] == "program" and r.body["fields"]["resource"] == "instances"
    srv.http("PUT", f"/v1/programs/{p['id']}/limits", a.token, {"max_instances": 2})

    async def storm() -> list[Any]:
        async with OssClient(srv.url, a.token) as c:

            async def one() -> Any:
                try:
                    return await c.place(p["id"], 1)
                except OssError as exc:
                    return exc

            return await asyncio.gather(*(one() for _ in range(10)))

    res = asyncio.run(storm())
    assert sum(isinstance(x, m.PlacementResult) for x in res) == 4  # vm2's 4 slots
    got = srv.http("GET", f"/v1/programs/{p['id']}", a.token).body
    assert len(got["placements"]) == 2 and got["processes"] == 8


@pytest.mark.parametrize("level", ["account", "program"])
def test_budget_exhausted_blocks_new_instances(srv: OssServer, level: str) -> None:
    admin = srv.account("root", admin=True)
    srv.http(
        "PUT",
        "/v1/instance-types",
        admin.token,
        {"name": "t", "cpus": 1, "memory_mb": 1, "price_micros_per_s": 100},
    )
    srv.http("PUT", "/v1/pools", admin.token, {"name": "p", "instance_type": "t"})
    srv.instance("vm1", cpus=1, pool="p")
    srv.instance("vm2", cpus=1, pool="p")
    a = srv.account("a")
    lim = {"budget_micros": 500}
    body: dict[str, Any] = {"argv": ["x"], "processes": 4}
    if level == "account":
        srv.http("PUT", "/v1/limits", a.token, lim)
    else:
        body["limits"] = lim
    p = srv.http("POST", "/v1/programs", a.token, body).body
    srv.clock.advance(20)  # type: ignore[union-attr]
    srv.call(srv.oss.meter())  # dedicated? no: 4 of 4 slots -> share 1 -> 2000 micros
    r = srv.http("POST", f"/v1/programs/{p['id']}/placements", a.token, {"processes": 1})
    assert r.status == 402 and r.body["error"] == "budget_exhausted"
    got = srv.http("GET", f"/v1/programs/{p['id']}", a.token).body
    assert got["state"] == "running" and got["spent_micros"] == 2000


def test_hard_budget_stops_program_with_clear_status(srv: OssServer) -> None:
    with pytest.raises(BudgetExhausted):
        raise BudgetExhausted("x")  # the type exists for the 402 path
    admin = srv.account("root", admin=True)
    srv.http(
        "PUT",
        "/v1/instance-types",
        admin.token,
        {"name": "t", "cpus": 1, "memory_mb": 1, "price_micros_per_s": 100},
    )
    srv.http("PUT", "/v1/pools", admin.token, {"name": "p", "instance_type": "t"})
    srv.instance("vm1", cpus=1, pool="p")
    a = srv.account("a")
    p = srv.http(
        "POST",
        "/v1/programs",
        a.token,
        {
            "argv": ["x"],
            "resource_policy": {"tenancy": "dedicated"},
            "limits": {"budget_micros": 500, "hard_budget_micros": 1000},
        },
    ).body
    srv.clock.advance(5)  # type: ignore[union-attr]
    srv.call(srv.oss.meter())
    assert srv.http("GET", f"/v1/programs/{p['id']}", a.token).body["state"] == "running"
    srv.clock.advance(6)  # type: ignore[union-attr]
    srv.call(srv.oss.meter())
    got = srv.http("GET", f"/v1/programs/{p['id']}", a.token).body
    assert got["state"] == "stopped_budget"
    assert "hard budget of 1000 micros reached (spent 1100)" in got["status_reason"]
    assert got["placements"] == []
    assert srv.http("GET", "/v1/instances/vm1", admin.token).body["used_slots"] == 0
