"""The internal locking service: leases with fencing tokens over real SQLite."""

from __future__ import annotations

import pytest
from conftest_oss import Clock, OssServer

from oss.errors import LeaseError
from oss.server import ROUTES

pytest_plugins = ["conftest_oss"]


def test_leases_fencing_and_persistence(oss_factory: object, tmp_path: object) -> None:
    clock = Clock()
    srv: OssServer = oss_factory(clock=clock)  # type: ignore[operator]
    locks = srv.oss.locks
    a = srv.call(locks.acquire("mem/page/7", "vm1", ttl=10))
    assert a.fencing == 1
    with pytest.raises(LeaseError):
        srv.call(locks.acquire("mem/page/7", "vm2", ttl=10))
    assert srv.call(locks.acquire("mem/page/7", "vm1", ttl=10)).fencing == 1  # renewal
    clock.advance(11)
    b = srv.call(locks.acquire("mem/page/7", "vm2", ttl=10))
    assert b.fencing == 2
    with pytest.raises(LeaseError):
        srv.call(locks.validate("mem/page/7", a.fencing))  # the old holder is fenced off
    srv.call(locks.validate("mem/page/7", b.fencing))
    srv.call(locks.release(a))  # a stale release does nothing
    srv.call(locks.validate("mem/page/7", b.fencing))
    srv.call(locks.release(b))
    with pytest.raises(LeaseError):
        srv.call(locks.validate("mem/page/7", b.fencing))
    # Fencing tokens survive a restart and keep increasing.
    data = srv.config.data_dir
    srv.stop()
    srv2: OssServer = oss_factory(clock=clock, data_dir=data)  # type: ignore[operator]
    assert srv2.call(srv2.oss.locks.acquire("mem/page/7", "vm3", ttl=10)).fencing == 3


def test_locking_is_not_reachable_by_clients() -> None:
    lease_routes = [r for r in ROUTES if "/leases" in r.path or "/lock" in r.path]
    assert lease_routes and all(r.scope == "agent" for r in lease_routes)


def test_instances_coordinate_through_lease_routes(oss_factory: object) -> None:
    import asyncio

    from oss.client import OssClient

    clock = Clock()
    srv: OssServer = oss_factory(clock=clock)  # type: ignore[operator]
    t1, t2 = srv.instance("vm1"), srv.instance("vm2")
    acct = srv.account("a")
    # An account token cannot touch leases at all.
    r = srv.http("POST", "/v1/agents/leases/acquire", acct.token, {"name": "x"})
    assert r.status == 401

    async def go() -> None:
        async with OssClient(srv.url, t1) as a, OssClient(srv.url, t2) as b:
            la = await a.lease("shm/42", ttl=5)
            assert (la.holder, la.fencing) == ("vm1", 1)
            with pytest.raises(LeaseError):
                await b.lease("shm/42")
            clock.advance(6)
            lb = await b.lease("shm/42", ttl=5)
            assert (lb.holder, lb.fencing) == ("vm2", 2)
            with pytest.raises(LeaseError):
                await a.validate_lease("shm/42", la.fencing)
            await b.validate_lease("shm/42", lb.fencing)
            await a.release_lease("shm/42", lb.fencing)  # not a's lease: no effect
            await b.validate_lease("shm/42", lb.fencing)
            await b.release_lease("shm/42", lb.fencing)
            with pytest.raises(LeaseError):
                await b.validate_lease("shm/42", lb.fencing)

    asyncio.run(go())
