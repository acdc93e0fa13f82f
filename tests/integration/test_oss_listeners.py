"""Listener reports from instances: `POST /v1/agents/programs/{id}/network/listeners`.

A real OSS (aiohttp on loopback, real SQLite) with a network prefix and a
recording applier.  An instance opens a listener of a program it runs; its
close ends the redirect even when it arrives after the instance's last process
of the program was released (the heartbeat that released it raced the report:
seen in CI, where the redirect stayed until the program ended).  Only the
instance that holds a listener ends it, and nobody opens one for a program it
does not run.
"""

from __future__ import annotations

import ipaddress
import secrets
from typing import Any

import pytest
from conftest_oss import OssServer
from test_oss_agent_placement import submit
from test_oss_exec_grants import AS_USER, register

from oss.network.manager import NetworkConfig
from oss.network.plan import HostSpot, InstanceSpot
from tests.unit.test_network_manager import FakeApplier

pytest_plugins = ["conftest_oss"]

NAMES = ("l1", "l2")


@pytest.fixture
def net_srv(oss_factory: Any) -> tuple[OssServer, FakeApplier]:
    srv: OssServer = oss_factory()
    spots = {n: InstanceSpot(n, f"10.213.9.{10 + i}", "10.213.9.1", "h", i)
             for i, n in enumerate(NAMES)}  # fmt: skip
    config = NetworkConfig(ipaddress.IPv4Network("10.214.9.0/29"), spots,
                           {"h": HostSpot("h", "br0")})  # fmt: skip
    fake = FakeApplier()
    srv.oss.use_network(config, fake)
    srv.call(srv.oss.network.start())  # type: ignore[union-attr]
    return srv, fake


def _listeners(srv: OssServer, token: str, pid: str) -> list[tuple[str, int, str]]:
    r = srv.http("GET", f"/v1/programs/{pid}/network", token)
    assert r.status == 200, r.body
    return [(x["instance"], x["port"], x["proto"]) for x in r.body["listeners"]]


def _udp_5301(fake: FakeApplier, pid: str) -> list[object]:
    """The rules the applier holds that steer UDP port 5301 of program `pid`."""
    return [rule for (_key, program), state in fake.held.items() if program == pid
            for rule in state.rules if rule.proto == 17 and rule.ports == (5301, 5301)]  # fmt: skip


def test_a_close_after_the_release_still_ends_the_redirect(
    net_srv: tuple[OssServer, FakeApplier],
) -> None:
    srv, fake = net_srv
    tokens = {n: register(srv, n, secrets.token_hex(32)) for n in NAMES}
    acct = srv.account("acme")
    pid = submit(srv, acct.token)
    first = srv.http("GET", f"/v1/programs/{pid}", acct.token).body["placements"][0]["instance"]
    r = srv.http("POST", f"/v1/agents/programs/{pid}/placements", tokens[first],
                 {"parent_pid": 7, "exec_as": AS_USER})  # fmt: skip
    assert r.status == 200, r.body
    second = r.body["exec_grants"][0]["instance"]
    assert second != first
    url = f"/v1/agents/programs/{pid}/network/listeners"
    report = {"pid": 42, "port": 5301, "proto": "udp", "local": "0.0.0.0"}
    r = srv.http("POST", url, tokens[second], {**report, "open": True})
    assert r.status == 200, r.body
    assert r.body["address"].startswith("10.214.9."), r.body
    assert (second, 5301, "udp") in _listeners(srv, acct.token, pid)
    assert _udp_5301(fake, pid), fake.held
    # Another instance cannot close it, nor open one for a program it does not run.
    other = next(n for n in NAMES if n != second)
    r = srv.http("POST", url, tokens[other], {**report, "open": False})
    assert (second, 5301, "udp") in _listeners(srv, acct.token, pid)
    # The heartbeat that releases `second`'s process is served before the close.
    rel = srv.http("POST", f"/v1/agents/programs/{pid}/release", tokens[first],
                   {"instance": second})  # fmt: skip
    assert rel.status == 200, rel.body
    r = srv.http("POST", url, tokens[second], {**report, "open": False})
    assert r.status == 404, r.body  # it runs nothing of the program any more: says so
    assert _listeners(srv, acct.token, pid) == []
    assert not _udp_5301(fake, pid), fake.held
    r = srv.http("POST", url, tokens[second], {**report, "open": True})
    assert r.status == 404, r.body
    assert _listeners(srv, acct.token, pid) == []
