"""Placement asked from an instance: `POST /v1/agents/programs/{id}/placements` (issue 10).

A real OSS (aiohttp on loopback, real SQLite).  An instance may place an exec of a
program only while it runs one of its processes; the placement follows the
program's own policy, the asking instance last; the ticket binds the exec, the
program and the digest of the view the program was submitted with.
"""

from __future__ import annotations

import secrets

from conftest_oss import OssServer
from test_oss_exec_grants import AS_USER, register

from oss.compute import exectickets
from vmagent.exec.tickets import TicketCheck, parse, split
from vmagent.exec.view import View

pytest_plugins = ["conftest_oss"]

MAPS = [["/mnt/v", "/srv/data"]]


def submit(srv: OssServer, token: str, placement: str = "spread") -> str:
    body = {"argv": ["/bin/sh"], "cwd": "/", "view": {"maps": MAPS, "placement": placement}}
    r = srv.http("POST", "/v1/programs", token, body)
    assert r.status == 200, r.body
    assert r.body["view"]["maps"] == MAPS
    return str(r.body["id"])


def test_an_instance_places_an_exec_of_the_program_it_runs(srv: OssServer) -> None:
    keys = {n: secrets.token_hex(32) for n in ("a1", "a2", "a3")}
    tokens = {n: register(srv, n, k) for n, k in keys.items()}
    acct = srv.account("acme")
    pid = submit(srv, acct.token)
    # The root's slot went to one instance (a1: the first among equals).
    got = srv.http("GET", f"/v1/programs/{pid}", acct.token).body["placements"]
    assert got == [{"instance": "a1", "processes": 1}]
    url = f"/v1/agents/programs/{pid}/placements"
    body = {"parent_pid": 4242, "exec_as": AS_USER}
    r = srv.http("POST", url, tokens["a1"], body)
    assert r.status == 200, r.body
    (grant,) = r.body["exec_grants"]
    assert grant["instance"] != "a1"  # spread: the asker comes last among equals
    public = split(grant["tickets"][0])[0]
    bound = parse(public)
    view = View.of(pid, {"/mnt/v": "/srv/data"}, "spread")
    assert (bound.program, bound.view) == (pid, view.digest())
    TicketCheck(
        tokens[grant["instance"]], grant["instance"], exec_key=keys[grant["instance"]]
    ).verify(grant["tickets"][0])
    # The placed process's instance may place the next exec in turn (a grandchild).
    second = grant["instance"]
    r2 = srv.http("POST", url, tokens[second], body)
    assert r2.status == 200, r2.body
    assert r2.body["assignments"][0]["instance"] not in (second,)
    # Releasing from an instance frees the slot.
    rel = srv.http("POST", f"/v1/agents/programs/{pid}/release", tokens["a1"], {"instance": second})
    assert rel.status == 200, rel.body


def test_only_an_instance_running_the_program_may_place_it(srv: OssServer) -> None:
    tokens = {n: register(srv, n, secrets.token_hex(32)) for n in ("b1", "b2")}
    acct = srv.account("acme")
    pid = submit(srv, acct.token)
    placed = srv.http("GET", f"/v1/programs/{pid}", acct.token).body["placements"][0]["instance"]
    other = "b2" if placed == "b1" else "b1"
    body = {"parent_pid": 1, "exec_as": AS_USER}
    r = srv.http("POST", f"/v1/agents/programs/{pid}/placements", tokens[other], body)
    assert r.status == 404, r.body
    r = srv.http("POST", "/v1/agents/programs/prog_nope/placements", tokens[placed], body)
    assert r.status == 404, r.body
    # An account token is not an instance's.
    r = srv.http("POST", f"/v1/agents/programs/{pid}/placements", acct.token, body)
    assert r.status in (401, 403), r.body
    # A finished program places nothing more, even from where it ran.
    srv.http("POST", f"/v1/programs/{pid}/finish", acct.token, {"exit_status": 0})
    r = srv.http("POST", f"/v1/agents/programs/{pid}/placements", tokens[placed], body)
    assert r.status == 404, r.body


def test_root_ids_need_allow_root_from_an_instance_too(srv: OssServer) -> None:
    tokens = {n: register(srv, n, secrets.token_hex(32)) for n in ("c1", "c2")}
    acct = srv.account("acme")
    pid = submit(srv, acct.token)
    placed = srv.http("GET", f"/v1/programs/{pid}", acct.token).body["placements"][0]["instance"]
    body = {"parent_pid": 1, "exec_as": {**AS_USER, "uid": 0}}
    r = srv.http("POST", f"/v1/agents/programs/{pid}/placements", tokens[placed], body)
    assert r.status == 403, r.body


def test_a_program_without_a_view_gets_tickets_for_the_empty_view(srv: OssServer) -> None:
    register(srv, "d1", secrets.token_hex(32))
    acct = srv.account("acme")
    r = srv.http("POST", "/v1/programs", acct.token, {"argv": ["/bin/sh"], "cwd": "/"})
    pid = r.body["id"]
    body = {"processes": 1, "exec_as": AS_USER}
    got = srv.http("POST", f"/v1/programs/{pid}/placements", acct.token, body).body
    bound = parse(split(got["exec_grants"][0]["tickets"][0])[0])
    assert (bound.program, bound.view) == (pid, exectickets.EMPTY_VIEW)
