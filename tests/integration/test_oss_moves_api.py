"""Optimizer moves through the real OSS (issue 12), driven over HTTP as agents do.

No root, no CRIU: two registered instances (a slow and a fast CPU score), a program
placed on the slow one, usage samples with CPU and run-queue wait reported by its
instance.  One decision pass (`Mover.tick`, driven by the test) orders the move in
the slow instance's heartbeat reply and logs it with its reason; a program whose
policy turns moves off is held with that reason; samples from an instance the
program is not placed on feed nothing.  The agents' side of a move is
tests/integration/test_oss_optimizer_moves.py.
"""

from __future__ import annotations

import secrets
from typing import Any

from conftest_oss import Clock, OssServer

from tests.conftest import wait_for

pytest_plugins = ["conftest_oss"]


def register(srv: OssServer, name: str, speed: float | None, pool: str | None = None) -> str:
    token = srv.call(srv.oss.mint_instance_token(name, pool))
    body = {
        "instance": name, "address": "127.0.0.1:7070", "hostname": name, "cpus": 2,
        "memory_mb": 512, "exec_key": secrets.token_hex(32), "checkpoint": True,
    }  # fmt: skip
    if speed is not None:
        body["speed"] = speed
    r = srv.http("POST", "/v1/agents/register", token, body)
    assert r.status == 200, r.body
    return token


def samples(srv: OssServer, token: str, instance: str, program: str, seq: int) -> int:
    """Six seconds of a CPU-bound process (throttled: it mostly waits) on `instance`."""
    started = srv.clock.now - 60  # type: ignore[union-attr]
    for k in range(7):
        srv.clock.advance(1.0)  # type: ignore[union-attr]
        row = {
            "program_id": program, "pid": 4242, "session": 4242, "started": started,
            "argv": ["python3", "work.py"], "cpu_us": k * 50_000, "wait_us": k * 950_000,
            "at": srv.clock.now,  # type: ignore[union-attr]
        }  # fmt: skip
        seq += 1
        r = srv.http(
            "POST", "/v1/agents/report", token, {"instance": instance, "seq": seq, "usage": [row]}
        )
        assert r.status == 200, r.body
    return seq


def beat(srv: OssServer, token: str, instance: str) -> list[dict[str, Any]]:
    load = {"cpu_percent": 50.0, "memory_used_mb": 10, "runqueue": 0.0, "processes": 5}
    r = srv.http(
        "POST", "/v1/agents/heartbeat", token, {"instance": instance, "seq": 1, "load": load}
    )
    assert r.status == 200, r.body
    return list(r.body.get("commands", []))


def log(srv: OssServer, token: str, program: str) -> list[str]:
    lines = srv.http("GET", f"/v1/programs/{program}/logs", token).body["lines"]
    return [ln["text"] for ln in lines if ln["text"].startswith("optimizer: ")]


def test_a_cpu_bound_process_on_a_slow_instance_is_ordered_to_the_fast_one(
    oss_factory: Any,
) -> None:
    srv = oss_factory(clock=Clock(), moves_every=0.001)  # every pass the test drives decides
    slow = register(srv, "a-slow", 0.1)  # first by name: placements go there
    fast = register(srv, "b-fast", 1.0)
    alpha = srv.account("alpha")
    prog = srv.http("POST", "/v1/programs", alpha.token, {"argv": ["python3"]}).body
    assert prog["placements"] == [{"instance": "a-slow", "processes": 1}], prog
    # The fast instance reports for a program not placed there: refused, no profile.
    samples(srv, fast, "b-fast", prog["id"], 0)
    assert prog["id"] not in srv.oss.mover.profiles.programs()
    samples(srv, slow, "a-slow", prog["id"], 0)
    srv.call(srv.oss.mover.tick())

    def orders() -> list[dict[str, Any]]:
        return [c for c in beat(srv, slow, "a-slow") if c["action"] == "migrate"]

    # The move runs as the OSS's own task: its order reaches the next heartbeat reply.
    assert wait_for(lambda: orders() != [], 30), log(srv, alpha.token, prog["id"])
    (order,) = orders()
    assert (order["program"], order["pid"], order["to"]) == (prog["id"], 4242, "b-fast")
    (moving,) = log(srv, alpha.token, prog["id"])
    assert moving.startswith("optimizer: moving pid 4242 from a-slow to b-fast: CPU-bound ("), (
        moving
    )
    assert "b-fast (speed 1.00) runs it 10.0x faster" in moving, moving
    assert srv.oss.migrating(prog["id"])  # one at a time: the next pass orders nothing
    srv.call(srv.oss.mover.tick())
    assert orders() == [order]


def test_a_program_whose_policy_turns_moves_off_is_held_with_that_reason(
    srv: OssServer,
) -> None:
    slow = register(srv, "a-slow", 0.1)
    register(srv, "b-fast", 1.0)
    beta = srv.account("beta")
    r = srv.http("PUT", "/v1/policies", beta.token, {"scaling_policy": {"moves": False}})
    assert r.status == 200, r.body
    prog = srv.http("POST", "/v1/programs", beta.token, {"argv": ["python3"]}).body
    assert prog["scaling_policy"]["moves"] is False, prog["scaling_policy"]
    samples(srv, slow, "a-slow", prog["id"], 0)
    srv.call(srv.oss.mover.tick())
    assert [c for c in beat(srv, slow, "a-slow") if c["action"] == "migrate"] == []
    assert log(srv, beta.token, prog["id"]) == ["optimizer: no move: moves are off by its policy"]
    # An explicit policy wins over the account's default.
    on = srv.http(
        "POST", "/v1/programs", beta.token, {"argv": ["x"], "scaling_policy": {"moves": True}}
    ).body
    assert on["scaling_policy"]["moves"] is True


def test_an_instance_that_measured_no_speed_has_its_type_s_declared_one(
    oss_factory: Any,
) -> None:
    srv = oss_factory(clock=Clock(), moves_every=0.001)
    root = srv.account("root", admin=True)
    fast_type = {"name": "big", "cpus": 2, "memory_mb": 512, "price_micros_per_s": 0,
                 "speed": 2.0}  # fmt: skip
    assert srv.http("PUT", "/v1/instance-types", root.token, fast_type).status == 200
    types = srv.http("GET", "/v1/instance-types", root.token).body
    assert [t["speed"] for t in types if t["name"] == "big"] == [2.0]
    pool = {"name": "bigs", "instance_type": "big", "warm_target": 0, "max_size": 1}
    assert srv.http("PUT", "/v1/pools", root.token, pool).status == 200
    slow = register(srv, "a-slow", 0.2)
    register(srv, "bigs-1", None, pool="bigs")  # an agent that sent no score
    alpha = srv.account("alpha")
    prog = srv.http("POST", "/v1/programs", alpha.token, {"argv": ["python3"]}).body
    assert prog["placements"] == [{"instance": "a-slow", "processes": 1}], prog
    samples(srv, slow, "a-slow", prog["id"], 0)
    srv.call(srv.oss.mover.tick())

    def moving() -> list[str]:
        return [t for t in log(srv, alpha.token, prog["id"]) if "moving" in t]

    assert wait_for(lambda: moving() != [], 30), log(srv, alpha.token, prog["id"])
    assert "bigs-1 (speed 2.00) runs it 10.0x faster" in moving()[0], moving()
