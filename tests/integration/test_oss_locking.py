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
    assert not [r for r in ROUTES if "lock" in r.path or "/lease" in r.path]
    assert not [r for r in ROUTES if "locking" in r.handler.__module__]
