"""Tenant isolation on every endpoint, driven by the route table.

Every route must be classified below; a new route that is not makes
`test_every_route_is_covered` fail, so no endpoint escapes these tests.
"""

from __future__ import annotations

import re
from typing import Any

import pytest
from conftest_oss import OssServer

from oss.server import ROUTES, Route

# Placeholder bodies for routes that take one (valid against their models).
BODIES: dict[str, Any] = {
    "/v1/programs/{program_id}/finish": {"exit_status": 0},
    "/v1/programs/{program_id}/placements": {"processes": 1},
    "/v1/programs/{program_id}/release": {"instance": "vm1", "processes": 1},
    "/v1/programs/{program_id}/limits": {"max_instances": 1},
    "/v1/programs/{program_id}/logs": {"lines": [{"text": "x"}]},
    "/v1/programs/{program_id}/metrics": {"syscalls": {"storage": 1}},
    "/v1/users/{user_id}/limits": {"max_instances": 1},
    "/v1/programs/{program_id}/migrate": {"to": "vm2"},
    "/v1/programs/{program_id}/signals": {"pid": 4194305, "signal": 15},
    "/v1/programs/{program_id}/storage": {
        "name": "s-1", "server": "10.0.0.1:22", "key": "k" * 32, "host_key": "h", "volumes": 1,
    },
    "/v1/programs/{program_id}/storage/mounts": {"instance": "vm1"},
    "/v1/programs/{program_id}/storage/usage": {"gib_seconds": {"disk": 1.0}},
}

# Routes without path parameters, and how isolation is checked for them.
LISTS = {
    ("GET", "/v1/programs"): "ids",
    ("GET", "/v1/accounts"): "ids",
    ("GET", "/v1/users"): "ids",
    ("GET", "/v1/tokens"): "ids",
    ("GET", "/v1/instances"): "names",
    ("GET", "/v1/billing"): "billing",
    ("GET", "/v1/metrics"): "metrics",
    ("GET", "/v1/limits"): "own",
    ("GET", "/v1/policies"): "own",
    ("GET", "/v1/spend"): "own",
}
# Streams that never end by themselves: their isolation is replayed by an attacker
# reading them for a while (tests/security/test_tenant_operator_views.py).
STREAMS = {("GET", "/v1/events")}
# Routes that only create objects in the caller's own account, or are global catalogues.
OWN_WRITES = {
    ("POST", "/v1/users"),
    ("POST", "/v1/tokens"),
    ("PUT", "/v1/limits"),
    ("PUT", "/v1/policies"),
    ("POST", "/v1/programs"),
}
CATALOGUE = {("GET", "/v1/instance-types"), ("GET", "/v1/pools"), ("GET", "/v1/pools/{pool}")}
PUBLIC = {("GET", "/healthz"), ("GET", "/openapi.json"), ("GET", "/ui")}

pytest_plugins = ["conftest_oss"]


def _params(r: Route) -> list[str]:
    return re.findall(r"{(\w+)}", r.path)


class World:
    """Account A owns one of everything; B is another tenant; root is the operator."""

    def __init__(self, srv: OssServer) -> None:
        self.srv = srv
        self.root = srv.account("root", admin=True)
        self.a = srv.account("alpha")
        self.b = srv.account("beta")
        srv.http(
            "PUT",
            "/v1/instance-types",
            self.root.token,
            {"name": "t", "cpus": 1, "memory_mb": 512, "price_micros_per_s": 7},
        )
        srv.http("PUT", "/v1/pools", self.root.token, {"name": "pool1", "instance_type": "t"})
        self.itokens = {
            "vm1": srv.instance("vm1", pool="pool1"),
            "vm2": srv.instance("vm2", pool="pool1"),
        }
        self.prog = srv.http(
            "POST",
            "/v1/programs",
            self.a.token,
            {"argv": ["a"], "resource_policy": {"tenancy": "dedicated"}},
        ).body
        self.b_prog = srv.http("POST", "/v1/programs", self.b.token, {"argv": ["b"]}).body
        self.user = srv.http("POST", "/v1/users", self.a.token, {"name": "u2"}).body
        self.tok = srv.http("POST", "/v1/tokens", self.a.token, {"label": "t"}).body
        srv.http(
            "POST",
            f"/v1/programs/{self.prog['id']}/logs",
            self.a.token,
            {"lines": [{"text": "secret-a"}]},
        )
        srv.http(
            "POST",
            f"/v1/programs/{self.prog['id']}/metrics",
            self.a.token,
            {"syscalls": {"storage": 3}, "instance": "vm1"},
        )
        srv.clock.advance(5)  # type: ignore[union-attr]
        srv.call(srv.oss.meter())
        self.values = {
            "program_id": self.prog["id"],
            "user_id": self.user["id"],
            "token_id": self.tok["id"],
            "account_id": self.a.id,
            "instance": self.prog["placements"][0]["instance"],
            "pool": "pool1",
            "session": "ab" * 16,  # issue 12: a session's checkpoint (failover)
        }


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Any:
    from conftest_oss import Clock
    from conftest_oss import OssServer as S

    srv = S(tmp_path_factory.mktemp("iso"), Clock()).start()
    try:
        yield World(srv)
    finally:
        srv.stop()


def test_every_route_is_covered() -> None:
    for r in ROUTES:
        key = (r.method, r.path)
        if r.scope in ("admin", "agent") or key in PUBLIC | CATALOGUE | OWN_WRITES | STREAMS:
            continue
        if _params(r):
            continue  # covered by test_other_tenant_gets_404
        assert key in LISTS, f"route {key} has no isolation check: add one"


ACCOUNT_OBJECT_ROUTES = [
    r for r in ROUTES if r.scope == "account" and _params(r) and (r.method, r.path) not in CATALOGUE
]


@pytest.mark.parametrize("route", ACCOUNT_OBJECT_ROUTES, ids=lambda r: f"{r.method} {r.path}")
def test_other_tenant_gets_404(world: World, route: Route) -> None:
    path = route.path
    for p in _params(route):
        assert p in world.values, f"no fixture object for path parameter {p}"
        path = path.replace("{" + p + "}", world.values[p])
    body = BODIES.get(route.path, {} if route.body else None)
    r = world.srv.http(route.method, path, world.b.token, body)
    assert r.status == 404, (route.path, r.status, r.body)
    assert "secret-a" not in r.raw.decode()
    assert world.prog["id"] not in r.raw.decode() or r.body["error"] == "not_found"
    # The owner can reach it (so the 404 is isolation, not a broken route).
    if route.method == "GET":
        assert world.srv.http(route.method, path, world.a.token).status == 200, route.path


@pytest.mark.parametrize("key", sorted(LISTS), ids=lambda k: f"{k[0]} {k[1]}")
def test_lists_show_only_own_objects(world: World, key: tuple[str, str]) -> None:
    r = world.srv.http(key[0], key[1], world.b.token)
    assert r.status == 200
    text = r.raw.decode()
    for secret in (world.prog["id"], world.user["id"], world.tok["id"], world.a.id):
        assert secret not in text, (key, secret)
    if LISTS[key] == "names":
        assert world.values["instance"] not in text  # A's dedicated instance
    if LISTS[key] == "billing":
        assert all(rec["program_id"] == world.b_prog["id"] for rec in r.body["records"])


@pytest.mark.parametrize(
    "route", [r for r in ROUTES if r.scope == "admin"], ids=lambda r: f"{r.method} {r.path}"
)
def test_admin_routes_forbidden_to_tenants(world: World, route: Route) -> None:
    path = re.sub(r"{\w+}", "vm1", route.path)  # a real name: the route must match
    r = world.srv.http(route.method, path, world.a.token, {} if route.body else None)
    assert r.status == 403 and r.body["error"] == "forbidden"


@pytest.mark.parametrize(
    "route", [r for r in ROUTES if r.scope != "public"], ids=lambda r: f"{r.method} {r.path}"
)
def test_no_token_401(world: World, route: Route) -> None:
    path = route.path
    for p in _params(route):
        path = path.replace("{" + p + "}", world.values[p])
    for headers in ({}, {"Authorization": "Bearer dcp_wrong"}, {"Authorization": "Basic eDp5"}):
        r = world.srv.http(route.method, path, None, None, headers=headers)
        assert r.status == 401 and r.body["error"] == "unauthorized", (route.path, headers)


def test_b_cannot_append_to_or_bill_a(world: World) -> None:
    pid = world.prog["id"]
    r = world.srv.http(
        "POST", f"/v1/programs/{pid}/logs", world.b.token, {"lines": [{"text": "x"}]}
    )
    assert r.status == 404
    a_total = world.srv.http("GET", "/v1/billing", world.a.token).body["records"]
    assert a_total and all(rec["program_id"] == pid for rec in a_total)
    # A revoked token stops working at once.
    tok = world.srv.http("POST", "/v1/tokens", world.b.token, {}).body
    assert world.srv.http("GET", "/v1/programs", tok["token"]).status == 200
    assert world.srv.http("DELETE", f"/v1/tokens/{tok['id']}", world.b.token).status == 200
    assert world.srv.http("GET", "/v1/programs", tok["token"]).status == 401


def test_an_instance_reports_only_for_programs_it_runs(world: World) -> None:
    """Agent routes: the report route takes rows only for programs placed on (or already
    recorded on) the token's instance; A's program runs on one of vm1/vm2."""
    pid = world.prog["id"]
    here = world.values["instance"]
    other = "vm2" if here == "vm1" else "vm1"
    row = {"program_id": pid, "pid": 9, "started": 3.0, "cpu_us": 7}
    for inst, refused in ((other, 1), (here, 0)):
        body = {"instance": inst, "seq": 1, "usage": [row]}
        r = world.srv.http("POST", "/v1/agents/report", world.itokens[inst], body)
        assert r.status == 200 and r.body["refused"] == refused, r.body
    procs = world.srv.http("GET", f"/v1/programs/{pid}/processes", world.a.token).body
    assert [(p["instance"], p["pid"]) for p in procs["processes"]] == [(here, 9)]
    assert world.srv.http("GET", f"/v1/programs/{pid}/processes", world.b.token).status == 404
