"""Malformed requests get a 4xx with a clear JSON message, never a 500, and lose nothing."""

from __future__ import annotations

import pytest
from conftest_oss import OssServer

pytest_plugins = ["conftest_oss"]


@pytest.mark.parametrize(
    ("raw", "status", "code", "needle"),
    [
        (b'{"argv": ["a"', 400, "invalid_request", "not valid JSON"),
        (b"\xff\xfe", 400, "invalid_request", "not valid JSON"),
        (b'{"argv": ["a"], "colour": "red"}', 422, "validation_failed", "colour"),
        (b'{"argv": "not-a-list"}', 422, "validation_failed", "argv"),
        (b'{"argv": []}', 422, "validation_failed", "argv"),
        (b'{"argv": ["a"], "processes": "many"}', 422, "validation_failed", "processes"),
        (b'{"argv": ["a"], "processes": -1}', 422, "validation_failed", "processes"),
        (
            b'{"argv": ["a"], "scaling_policy": {"min_instances": 3, "max_instances": 1}}',
            422,
            "validation_failed",
            "min_instances",
        ),
        (
            b'{"argv": ["a"], "resource_policy": {"tenancy": "solo"}}',
            422,
            "validation_failed",
            "tenancy",
        ),
        (b"[1, 2]", 422, "validation_failed", "error"),
        (b"null", 422, "validation_failed", "error"),
        pytest.param(
            b"[" * 200_000 + b"]" * 200_000,
            400,
            "invalid_request",
            "nested too deeply",
            id="deeply-nested",
        ),
        (b'{"argv": ["a"], "processes": 1e400}', 422, "validation_failed", "processes"),
        (b'{"argv": ["\\ud800"]}', 422, "validation_failed", "unicode"),
        (
            b'{"argv": ["a"], "storage_mb": 100000000000000000000000000}',
            422,
            "validation_failed",
            "storage_mb",
        ),
        (b'"str"', 422, "validation_failed", "error"),
    ],
)
def test_bad_bodies(srv: OssServer, raw: bytes, status: int, code: str, needle: str) -> None:
    a = srv.account("a")
    r = srv.http(
        "POST", "/v1/programs", a.token, raw=raw, headers={"Content-Type": "application/json"}
    )
    assert r.status == status, r.body
    assert r.body["error"] == code
    assert needle in r.raw.decode()
    assert srv.http("GET", "/v1/programs", a.token).body == []  # nothing half-created


def test_oversized_body_413(oss_factory: object) -> None:
    srv = oss_factory(max_body_bytes=4096)  # type: ignore[operator]
    a = srv.account("a")
    big = b'{"argv": ["' + b"x" * 10_000 + b'"]}'
    r = srv.http(
        "POST", "/v1/programs", a.token, raw=big, headers={"Content-Type": "application/json"}
    )
    assert r.status == 413 and r.body["error"] == "payload_too_large"
    assert "4096" in r.body["message"]
    assert srv.http("GET", "/v1/programs", a.token).body == []


@pytest.mark.parametrize(
    ("method", "path", "status"),
    [
        ("GET", "/v1/nowhere", 404),
        ("DELETE", "/v1/programs", 405),
        ("GET", "/v1/programs?limit=zero", 422),
        ("GET", "/v1/programs?state=sleeping", 422),
        ("GET", "/v1/programs?colour=red", 422),
        ("GET", "/v1/programs/prog_x/logs?since=-5", 422),
        ("GET", "/v1/programs/prog_x/logs?follow=maybe", 422),
    ],
)
def test_bad_paths_and_queries(srv: OssServer, method: str, path: str, status: int) -> None:
    a = srv.account("a")
    r = srv.http(method, path, a.token)
    assert r.status == status
    assert r.body["error"] and r.body["message"]


@pytest.mark.parametrize(
    "auth", [None, "", "Bearer", "Bearer ", "Token abc", "Bearer dcp_forged", "Bearer \u00e9"]
)
def test_bad_tokens_401(srv: OssServer, auth: str | None) -> None:
    headers = {} if auth is None else {"Authorization": auth.encode("utf-8").decode("latin-1")}
    r = srv.http("GET", "/v1/programs", None, headers=headers)
    assert r.status == 401 and r.body["error"] == "unauthorized"
    assert "Bearer" in r.body["message"] or "token" in r.body["message"]


def test_agent_body_wrong_types(srv: OssServer) -> None:
    tok = srv.instance("vm1")
    r = srv.http(
        "POST",
        "/v1/agents/heartbeat",
        tok,
        {"instance": "vm1", "seq": "one", "load": {"cpu_percent": "hot"}},
    )
    assert r.status == 422
    locs = {tuple(e["loc"]) for e in r.body["fields"]["errors"]}
    assert ("seq",) in locs and ("load", "cpu_percent") in locs
