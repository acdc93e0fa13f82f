"""The API's error table, models and OpenAPI document (no server, no network)."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from oss import errors, models
from oss.server import ROUTES, STATUS, openapi, status_of
from oss.service import OssConfig


def _subclasses(cls: type[errors.OssError]) -> list[type[errors.OssError]]:
    out: list[type[errors.OssError]] = []
    for s in cls.__subclasses__():
        out += [s, *_subclasses(s)]
    return out


def test_every_error_type_has_a_4xx_or_5xx_status_and_a_message() -> None:
    for cls in _subclasses(errors.OssError):
        if cls.__module__ != "oss.errors":
            continue
        exc = cls.__new__(cls)
        errors.OssError.__init__(exc, "detail")
        st = status_of(exc)
        assert 400 <= st < 600 and st != 500, cls
        assert cls.__doc__ and exc.message.endswith("detail")
    assert len({c for c, _ in STATUS}) == len(STATUS)


def test_limit_exceeded_message_and_fields() -> None:
    e = errors.LimitExceeded("account", "instances", 3, 4)
    assert status_of(e) == 409
    assert e.fields == {"level": "account", "resource": "instances", "limit": 3, "requested": 4}
    assert "account instances limit is 3" in str(e)


def test_models_forbid_unknown_fields() -> None:
    with pytest.raises(ValidationError):
        models.ProgramSubmit.model_validate({"argv": ["a"], "nope": 1})
    with pytest.raises(ValidationError):
        models.AgentHeartbeat.model_validate(
            {
                "instance": "a",
                "seq": 1,
                "load": {
                    "cpu_percent": 1,
                    "memory_used_mb": 1,
                    "runqueue": 0,
                    "processes": 1,
                    "x": 1,
                },
            }
        )
    with pytest.raises(ValidationError, match="min_instances"):
        models.ScalingPolicy(min_instances=2, max_instances=1)


def test_openapi_covers_every_route_and_is_closed() -> None:
    doc = openapi()
    ops = {(m.upper(), p) for p, item in doc["paths"].items() for m in item}
    assert ops == {(r.method, r.path) for r in ROUTES}
    for name, s in doc["components"]["schemas"].items():
        if s.get("type") == "object" and s.get("properties"):
            assert s.get("additionalProperties") is False, name
    ids = [op["operationId"] for item in doc["paths"].values() for op in item.values()]
    assert len(ids) == len(set(ids))


def test_agent_wire_contract_shapes() -> None:
    doc = openapi()["components"]["schemas"]
    assert set(doc["AgentRegister"]["properties"]) == {
        "instance",
        "address",
        "hostname",
        "cpus",
        "memory_mb",
        "exec_key",  # optional: the agent's key for OSS-minted exec tickets
        "checkpoint",  # optional (issue 12): its CRIU works, budget stops suspend
        "speed",  # optional (issue 12): its measured CPU score, for optimizer moves
    }
    assert set(doc["AgentRegister"]["required"]) == {
        "instance",
        "address",
        "hostname",
        "cpus",
        "memory_mb",
    }
    assert set(doc["AgentRegistered"]["properties"]) == {"instance", "heartbeat_interval"}
    # optional `done`: ids of the reply commands carried out (issue 10)
    assert set(doc["AgentHeartbeat"]["properties"]) == {"instance", "seq", "load", "done"}
    assert set(doc["AgentHeartbeat"]["required"]) == {"instance", "seq", "load"}
    assert set(doc["HeartbeatReply"]["properties"]) == {"ok", "commands"}
    assert set(doc["AgentCommand"]["properties"]) == {
        "id",
        "program",
        "action",
        "reason",
        "tickets",
        "pid",  # migrate (issue 12): the session's program, target instance and address
        "to",
        "address",
        "state",  # network (issue 13): the instance's node state for the program
        "storage",  # mount / unmount (issue 14): the program's storage spec
        "signal",  # signal (issue 11): send it to the program's `pid` if it runs there
        "thread",  # signal (issue 11): `pid` is a thread's id, which alone gets it
        "sender",  # signal (issue 11): the sender's program pid (the receiver's si_pid)
        "checkpoint",  # kill (issue 12): suspend what can be checkpointed; `resume` later
        "every",  # checkpoint (issue 12, failover): the program's interval there
        "session",  # restore (issue 12, failover): the session to restore from its checkpoint
    }
    assert set(doc["Load"]["properties"]) == {
        "cpu_percent",
        "memory_used_mb",
        "runqueue",
        "processes",
    }


def test_config_validation(tmp_path: object) -> None:
    from pathlib import Path

    with pytest.raises(ValueError, match="heartbeat_timeout"):
        OssConfig(data_dir=Path("/x"), heartbeat_interval=5, heartbeat_timeout=1)
    with pytest.raises(ValueError, match="tick"):
        OssConfig(data_dir=Path("/x"), tick=0)
