"""Exec grants: placements answer with the agent's address and tickets MAC'd with its exec key.

A real OSS (aiohttp on loopback, real SQLite); the tickets are checked with the
agent's own `TicketCheck`, as the agent will.
"""

from __future__ import annotations

import logging
import secrets
import sqlite3
from typing import Any

import pytest
from conftest_oss import OssServer

from vmagent.errors import AuthError
from vmagent.exec.tickets import TicketCheck, parse, split

pytest_plugins = ["conftest_oss"]


def register(srv: OssServer, name: str, key: str | None, address: str = "127.0.0.1:7070") -> str:
    token = srv.call(srv.oss.mint_instance_token(name))
    body: dict[str, Any] = {
        "instance": name, "address": address, "hostname": name, "cpus": 1, "memory_mb": 512,
    }  # fmt: skip
    if key is not None:
        body["exec_key"] = key
    r = srv.http("POST", "/v1/agents/register", token, body)
    assert r.status == 200, r.body
    return token


def submit(srv: OssServer, token: str) -> str:
    r = srv.http("POST", "/v1/programs", token, {"argv": ["/bin/sh"], "cwd": "/"})
    assert r.status == 200, r.body
    return str(r.body["id"])


DIGEST = "ab" * 32
AS_USER = {"uid": 1000, "gid": 1000, "groups": [1000, 27], "digest": DIGEST}


def test_placement_carries_a_ticket_the_agent_accepts_once(srv: OssServer) -> None:
    key = secrets.token_hex(32)
    token = register(srv, "x1", key, "10.1.2.3:7070")
    acct = srv.account("acme")
    pid = submit(srv, acct.token)
    body = {"processes": 2, "exec_as": AS_USER}
    r = srv.http("POST", f"/v1/programs/{pid}/placements", acct.token, body)
    assert r.status == 200, r.body
    assert r.body["assignments"] == [{"instance": "x1", "processes": 2}]
    (grant,) = r.body["exec_grants"]
    # The host is the one the agent registered from (loopback), only the port is its word.
    assert grant["instance"] == "x1" and grant["address"] == "127.0.0.1:7070"
    assert len(grant["tickets"]) == 2 and len(set(grant["tickets"])) == 2
    bound = parse(split(grant["tickets"][0])[0])
    assert (bound.uid, bound.gid, bound.groups, bound.digest) == (1000, 1000, (1000, 27), DIGEST)
    check = TicketCheck(token, "x1", exec_key=key)
    for t in grant["tickets"]:
        check.verify(t)
    with pytest.raises(AuthError, match="already used"):
        check.verify(grant["tickets"][0])
    # Minted with the exec key, not with anything the instance token would verify.
    with pytest.raises(AuthError, match="exec key this agent does not have"):
        TicketCheck(token, "x1").verify(grant["tickets"][1])
    with pytest.raises(AuthError, match="not valid"):
        TicketCheck(token, "x2", exec_key=key).verify(grant["tickets"][1])


def test_root_tickets_need_the_operators_allow_root(srv: OssServer) -> None:
    register(srv, "x1", secrets.token_hex(32))
    acct = srv.account("acme")
    pid = submit(srv, acct.token)
    url = f"/v1/programs/{pid}/placements"
    for ids in (
        {"uid": 0, "gid": 1000},
        {"uid": 1000, "gid": 0},
        {"uid": 5, "gid": 5, "groups": [0]},
    ):
        r = srv.http("POST", url, acct.token, {"exec_as": {**ids, "digest": DIGEST}})
        assert r.status == 403 and "uid 0 or gid 0" in r.body["message"], (ids, r.body)
    # Without an exec identity the OSS places but mints nothing (a ticket must be bound).
    r = srv.http("POST", url, acct.token, {"processes": 1})
    assert r.status == 200 and r.body["exec_grants"] == []
    # The operator's permission (dcp-oss account create --allow-root) allows it.
    srv.call(srv.oss.store.write(lambda c: c.execute("UPDATE accounts SET allow_root=1")))
    r = srv.http("POST", url, acct.token, {"exec_as": {"uid": 0, "gid": 0, "digest": DIGEST}})
    assert r.status == 200 and len(r.body["exec_grants"]) == 1, r.body


def test_the_exec_key_is_never_returned_and_a_rekey_retires_it(
    srv: OssServer, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    key = secrets.token_hex(32)
    register(srv, "x1", key)
    admin = srv.account("op", admin=True)
    acct = srv.account("acme")
    pid = submit(srv, acct.token)
    for who, path in (
        (admin.token, "/v1/instances"),
        (admin.token, "/v1/instances/x1"),
        (acct.token, "/v1/instances"),
        (acct.token, f"/v1/programs/{pid}"),
        (None, "/openapi.json"),
    ):
        r = srv.http("GET", path, who)
        assert r.status == 200, (path, r.body)
        assert key not in r.raw.decode(), path
    assert key not in caplog.text  # nor logged (the OSS runs in this process)
    # A new instance token (re-key) retires the old agent's exec key: no tickets until it
    # registers again.
    srv.call(srv.oss.mint_instance_token("x1"))
    body = {"processes": 1, "exec_as": AS_USER}
    r = srv.http("POST", f"/v1/programs/{pid}/placements", acct.token, body)
    assert r.status == 200 and r.body["exec_grants"] == []


def test_agents_without_an_exec_key_get_no_grants_and_bad_keys_are_422(srv: OssServer) -> None:
    token = register(srv, "x1", None)
    acct = srv.account("acme")
    pid = submit(srv, acct.token)
    body = {"processes": 1, "exec_as": AS_USER}
    r = srv.http("POST", f"/v1/programs/{pid}/placements", acct.token, body)
    assert r.status == 200 and r.body["exec_grants"] == []
    base = {"instance": "x1", "address": "a:1", "hostname": "h", "cpus": 1, "memory_mb": 1}
    for bad in ("short", "Z" * 64, "a" * 257, 7):
        r = srv.http("POST", "/v1/agents/register", token, {**base, "exec_key": bad})
        assert r.status == 422, (bad, r.body)
        assert "Z" * 64 not in r.raw.decode()  # the input is never echoed


def test_avoid_hint_alternates_between_equal_instances(srv: OssServer) -> None:
    for n in ("x1", "x2"):
        register(srv, n, secrets.token_hex(32))
    acct = srv.account("acme")
    pid = submit(srv, acct.token)  # its first process lands on x1 (equal: by name)
    r = srv.http("GET", f"/v1/programs/{pid}", acct.token)
    (first,) = r.body["placements"]
    srv.http(
        "POST", f"/v1/programs/{pid}/release", acct.token,
        {"instance": first["instance"], "processes": 1},
    )  # fmt: skip
    seen = []
    last: list[str] = []
    for _ in range(4):
        r = srv.http(
            "POST", f"/v1/programs/{pid}/placements", acct.token, {"processes": 1, "avoid": last}
        )
        assert r.status == 200, r.body
        (a,) = r.body["assignments"]
        seen.append(a["instance"])
        last = [a["instance"]]
        srv.http("POST", f"/v1/programs/{pid}/release", acct.token, {"instance": a["instance"]})
    assert seen == ["x1", "x2", "x1", "x2"]
    r = srv.http("POST", f"/v1/programs/{pid}/placements", acct.token, {"avoid": ["-bad name"]})
    assert r.status == 422


def test_store_schema_has_the_exec_key_column(srv: OssServer) -> None:
    conn = sqlite3.connect(srv.config.data_dir / "oss.sqlite3")
    try:
        cols = [r[1] for r in conn.execute("PRAGMA table_info(instances)")]
        version = conn.execute("PRAGMA user_version").fetchone()[0]
    finally:
        conn.close()
    assert "exec_key" in cols
    assert version >= 5
