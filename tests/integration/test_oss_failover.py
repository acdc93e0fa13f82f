"""Failover from checkpoints through a real OSS (issue 12), its HTTP routes and a
test clock: a program asking for checkpoints where no instance's CRIU works is
refused with one line; otherwise its instances get the policy, a checkpoint is
taken only from the instance holding the session, a lost instance's session is
ordered restored on another one, which alone may fetch it; the home reads the
restoration (its owner only), and the lost instance, back, is fenced."""

from __future__ import annotations

import json
import secrets
import struct
from typing import Any

from conftest_oss import Clock, OssServer

from tests.conftest import wait_for

pytest_plugins = ["conftest_oss"]

LOAD = {"cpu_percent": 1, "memory_used_mb": 1, "runqueue": 0, "processes": 1}
AS_USER = {"uid": 1000, "gid": 1000, "groups": [1000], "digest": "ab" * 32}
SESSION = "cd" * 16
END = struct.pack(">HQ", 0, 0)


def register(srv: OssServer, token: str, name: str, checkpoint: bool = True) -> None:
    body = {
        "instance": name, "address": "127.0.0.1:7070", "hostname": name, "cpus": 1,
        "memory_mb": 512, "exec_key": secrets.token_hex(32), "checkpoint": checkpoint,
    }  # fmt: skip
    r = srv.http("POST", "/v1/agents/register", token, body)
    assert r.status == 200, r.body


def beat(srv: OssServer, token: str, name: str) -> list[dict[str, Any]]:
    r = srv.http("POST", "/v1/agents/heartbeat", token, {"instance": name, "seq": 1, "load": LOAD})
    assert r.status == 200, r.body
    return list(r.body["commands"])


def checkpoint_body(program: str, pid: int = 4242) -> bytes:
    meta = {"session": SESSION, "program_id": program, "pid": pid, "nonce": "n1", "key": "k",
            "request": {"argv": ["636174"]}, "taken": 0}  # fmt: skip
    head = json.dumps(meta).encode()
    return struct.pack(">I", len(head)) + head + b"images" * 1000 + END


def test_checkpoints_where_no_instance_can_take_them_are_one_line(srv: OssServer) -> None:
    register(srv, srv.call(srv.oss.mint_instance_token("n0")), "n0", checkpoint=False)
    acct = srv.account("acme")
    r = srv.http("POST", "/v1/programs", acct.token, {"argv": ["sh"], "checkpoint_every": 1})
    assert r.status == 409, r.body
    assert r.body["message"].endswith("no instance here has a working CRIU")
    r = srv.http("POST", "/v1/programs", acct.token, {"argv": ["sh"], "checkpoint_every": 0})
    assert r.status == 422, r.body


def test_a_lost_instance_s_checkpoint_is_restored_elsewhere_and_it_is_fenced(
    oss_factory: Any,
) -> None:
    clock = Clock()
    srv: OssServer = oss_factory(clock=clock, heartbeat_timeout=5.0)
    t0, t1 = (srv.call(srv.oss.mint_instance_token(n)) for n in ("n0", "n1"))
    register(srv, t0, "n0")
    acct, other = srv.account("acme"), srv.account("other")
    prog = srv.http("POST", "/v1/programs", acct.token, {"argv": ["sh"], "checkpoint_every": 2})
    assert prog.status == 200, prog.body
    pid = prog.body["id"]
    body = {"processes": 1, "exec_as": AS_USER}
    r = srv.http("POST", f"/v1/programs/{pid}/placements", acct.token, body)
    assert r.status == 200 and r.body["exec_grants"][0]["instance"] == "n0", r.body
    register(srv, t1, "n1")
    orders = beat(srv, t0, "n0")
    assert [(c["action"], c["every"]) for c in orders] == [("checkpoint", 2.0)], orders
    path = f"/v1/agents/checkpoints/{pid}/{SESSION}"
    r = srv.http("POST", path, t1, raw=checkpoint_body(pid))  # n1 was never asked
    assert r.status == 403, r.body
    r = srv.http("POST", path, t0, raw=checkpoint_body(pid)[:-3])  # cut short
    assert r.status == 400, r.body
    r = srv.http("POST", path, t0, raw=checkpoint_body(pid))
    assert r.status == 200, r.body
    # n0 falls silent; n1 beats on.
    clock.advance(6)
    beat(srv, t1, "n1")
    assert srv.call(srv.oss.check_availability()) == ["n0"]
    # The order goes out once the target is readied for it (its storage, if any: a task
    # of the OSS's own), so it may come with a later heartbeat.
    ordered: list[dict[str, Any]] = []

    def restore_ordered() -> bool:
        ordered.extend(c for c in beat(srv, t1, "n1") if c["action"] == "restore")
        return bool(ordered)

    assert wait_for(restore_ordered, 10)
    (restore,) = ordered
    assert (restore["program"], restore["session"]) == (pid, SESSION)
    assert srv.http("GET", path, t0).status == 404  # only the instance ordered to restore
    got = srv.http("GET", path, t1)
    assert got.status == 200 and got.raw == checkpoint_body(pid)
    done = {"command": restore["id"], "ok": True, "pid": 4242, "salt": "ab", "restore_ms": 12.5}
    r = srv.http("POST", "/v1/agents/checkpoints/restored", t1, done)
    assert r.status == 200, r.body
    news = srv.http("GET", f"/v1/programs/{pid}/restorations", acct.token)
    assert news.status == 200, news.body
    (one,) = news.body
    assert (one["nonce"], one["instance"], one["lost"], one["salt"]) == ("n1", "n1", "n0", "ab")
    assert srv.http("GET", f"/v1/programs/{pid}/restorations", other.token).status == 404
    # n0 comes back: registered again, it is told to kill the program's old copy, and
    # its checkpoints of the session are refused (n1 holds it now).
    register(srv, t0, "n0")
    kills = [c for c in beat(srv, t0, "n0") if c["action"] == "kill"]
    assert [(c["program"], c["tickets"]) for c in kills] == [(pid, [])], kills
    r = srv.http("POST", path, t0, raw=checkpoint_body(pid, pid=1))
    assert r.status in (403, 409), r.body
