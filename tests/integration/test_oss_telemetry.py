"""Agent reports through the real OSS: measured usage, logs and events, once each.

Drives `POST /v1/agents/report` over HTTP as an agent's uplink does; the end-to-end
path from a placed program is in test_telemetry_agent.py.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from conftest_oss import Clock, OssServer

from oss.billing.pricing import GIB, Rates

pytest_plugins = ["conftest_oss"]


class World:
    """One tenant program placed on vm1; vm2 runs nothing of it."""

    def __init__(self, srv: OssServer) -> None:
        self.srv = srv
        root = srv.account("root", admin=True)
        srv.http(
            "PUT",
            "/v1/instance-types",
            root.token,
            {"name": "t", "cpus": 1, "memory_mb": 512, "price_micros_per_s": 0},
        )
        srv.http("PUT", "/v1/pools", root.token, {"name": "p", "instance_type": "t"})
        self.vm1 = srv.instance("vm1", pool="p")
        self.vm2 = srv.instance("vm2", pool="p")
        self.a = srv.account("alpha")
        self.prog = srv.http(
            "POST",
            "/v1/programs",
            self.a.token,
            {"argv": ["make"], "resource_policy": {"tenancy": "dedicated"}},
        ).body
        assert self.prog["placements"] == [{"instance": "vm1", "processes": 1}]
        self.id = self.prog["id"]

    def report(self, seq: int, token: str | None = None, instance: str = "vm1", **kw: Any) -> Any:
        body = {"instance": instance, "seq": seq, **kw}
        return self.srv.http("POST", "/v1/agents/report", token or self.vm1, body)

    def row(self, pid: int = 100, **kw: Any) -> dict[str, Any]:
        return {"program_id": self.id, "pid": pid, "started": 1000.0, "argv": ["cc"], **kw}

    def metrics(self) -> Any:
        return self.srv.http("GET", f"/v1/programs/{self.id}/metrics", self.a.token).body


def test_a_replayed_seq_is_not_counted_twice(srv: OssServer) -> None:
    w = World(srv)
    r = w.report(5, usage=[w.row(cpu_us=2_000_000, syscalls={"storage": 3})])
    assert r.status == 200 and r.body == {"acked_seq": 5, "refused": 0}
    # The same batch again (its reply was lost), and an older one: acked, not applied.
    assert w.report(5, usage=[w.row(cpu_us=2_000_000, syscalls={"storage": 3})]).body == {
        "acked_seq": 5,
        "refused": 0,
    }
    assert w.report(4, usage=[w.row(pid=101, cpu_us=9_000_000)]).body["acked_seq"] == 5
    got = w.metrics()
    assert got["cpu_seconds"] == 2.0 and got["syscalls"] == {"storage": 3}
    # Totals, not increments: a later sample of the same process adds only what grew,
    # and the final row closes it.
    w.report(6, usage=[w.row(cpu_us=2_500_000, syscalls={"storage": 4})])
    w.report(7, usage=[w.row(cpu_us=3_000_000, final=True, exit_status=0, maxrss_kb=900)])
    w.report(8, usage=[w.row(cpu_us=9_000_000)])  # after the final row: ignored
    got = w.metrics()
    assert got["cpu_seconds"] == 3.0 and got["syscalls"] == {"storage": 4}
    assert got["by_instance"]["vm1"]["cpu_seconds"] == 3.0
    assert got["by_process"]["vm1:100"]["cpu_seconds"] == 3.0
    procs = srv.http("GET", f"/v1/programs/{w.id}/processes", w.a.token).body
    (p,) = procs["processes"]
    assert (p["pid"], p["state"], p["exit_status"], p["max_rss_kb"], p["argv"]) == (
        100,
        "exited",
        0,
        900,
        ["cc"],
    )
    assert procs["incomplete"] == []
    prom = srv.http("GET", "/metrics", srv.account("op", admin=True).token).raw.decode()
    assert f'dcp_program_cpu_seconds_total{{instance="vm1",program="{w.id}"}} 3.0' in prom


def test_an_instance_cannot_report_for_a_program_it_never_ran(srv: OssServer) -> None:
    w = World(srv)
    r = w.report(
        1,
        token=w.vm2,
        instance="vm2",
        usage=[w.row(cpu_us=5_000_000, net_rx=1 << 30)],
        logs=[{"program_id": w.id, "pid": 100, "ts": 5.0, "stream": "stdout", "text": "forged"}],
    )
    assert r.status == 200 and r.body == {"acked_seq": 1, "refused": 2}
    assert w.metrics()["cpu_seconds"] == 0.0
    assert srv.http("GET", f"/v1/programs/{w.id}/processes", w.a.token).body["processes"] == []
    logs = srv.http("GET", f"/v1/programs/{w.id}/logs", w.a.token).body["lines"]
    assert all(ln["text"] != "forged" for ln in logs)
    # Naming another instance in the body than the token's is refused outright.
    assert w.report(2, token=w.vm2, instance="vm1", usage=[w.row()]).status == 401


def test_measured_network_is_billed_once(oss_factory: Any) -> None:
    clock = Clock()
    srv = oss_factory(clock=clock, rates=Rates(net_micros_per_gb=1 << 20))
    w = World(srv)
    w.report(1, usage=[w.row(net_rx=GIB // 4, net_tx=GIB // 4)])
    w.report(1, usage=[w.row(pid=5, net_rx=GIB)])  # replayed seq: not billed
    w.report(2, usage=[w.row(net_rx=GIB // 2, net_tx=GIB // 4, final=True)])  # +1/4 GiB
    clock.advance(2)
    srv.call(srv.oss.meter())
    clock.advance(2)
    srv.call(srv.oss.meter())  # nothing new measured: no second net charge
    recs = srv.http("GET", f"/v1/programs/{w.id}/billing", w.a.token).body["records"]
    assert sum(r["net_micros"] for r in recs) == (3 * (1 << 20)) // 4
    m = w.metrics()
    assert m["net_rx_bytes"] + m["net_tx_bytes"] == 3 * GIB // 4


def test_usage_survives_an_oss_restart(oss_factory: Any, tmp_path: Path) -> None:
    data = tmp_path / "kept"
    srv = oss_factory(clock=Clock(), data_dir=data)
    w = World(srv)
    w.report(9, usage=[w.row(cpu_us=1_500_000, net_tx=4096, final=True, exit_status=3)])
    srv.stop()
    again = oss_factory(clock=Clock(), data_dir=data)
    got = again.http("GET", f"/v1/programs/{w.id}/metrics", w.a.token).body
    assert got["cpu_seconds"] == 1.5 and got["net_tx_bytes"] == 4096
    procs = again.http("GET", f"/v1/programs/{w.id}/processes", w.a.token).body["processes"]
    assert [(p["pid"], p["exit_status"]) for p in procs] == [(100, 3)]
    # The report sequence survived too: the agent's retry of batch 9 is not re-applied.
    body = {"instance": "vm1", "seq": 9, "usage": [w.row(pid=77, cpu_us=10**9)]}
    assert again.http("POST", "/v1/agents/report", w.vm1, body).body["acked_seq"] == 9
    again_m = again.http("GET", f"/v1/programs/{w.id}/metrics", w.a.token).body
    assert again_m["cpu_seconds"] == 1.5


def test_lines_and_events_reach_the_log_with_instance_and_pid(srv: OssServer) -> None:
    w = World(srv)
    w.report(
        1,
        logs=[
            {"program_id": w.id, "pid": 100, "ts": 10.5, "stream": "stdout", "text": "hello"},
            {"program_id": w.id, "pid": 100, "ts": 10.6, "stream": "stderr", "text": "oops"},
        ],
        events=[
            {"program_id": w.id, "pid": 100, "ts": 10.0, "kind": "exec", "argv": ["cc", "-c"]},
            {"program_id": w.id, "pid": 100, "ts": 11.0, "kind": "exit", "status": 0},
        ],
    )
    lines = srv.http("GET", f"/v1/programs/{w.id}/logs", w.a.token).body["lines"]
    got = [(ln["ts"], ln["instance"], ln["pid"], ln["stream"], ln["text"]) for ln in lines]
    assert [g for g in got if g[1] == "vm1"] == [
        (10.0, "vm1", 100, "event", "exec cc -c"),
        (10.5, "vm1", 100, "stdout", "hello"),
        (10.6, "vm1", 100, "stderr", "oops"),
        (11.0, "vm1", 100, "event", "exit 0"),
    ]
    ev = srv.http("GET", f"/v1/programs/{w.id}/logs?stream=event", w.a.token).body["lines"]
    assert [ln["text"] for ln in ev] == ["exec cc -c", "exit 0"]


def test_final_wait_returns_once_every_process_ended(srv: OssServer) -> None:
    w = World(srv)
    w.report(1, usage=[w.row(pid=1), w.row(pid=2, final=True)])
    got = srv.http("GET", f"/v1/programs/{w.id}/processes?final_wait=0.2", w.a.token).body
    assert got["incomplete"] == ["vm1:1"]
    w.report(2, usage=[w.row(pid=1, final=True, signal=9)])
    got = srv.http("GET", f"/v1/programs/{w.id}/processes?final_wait=5", w.a.token).body
    assert got["incomplete"] == [] and [p["signal"] for p in got["processes"]] == [9, None]
    # `expect`: a process the home placed may not be reported yet: wait for it (bounded).
    got = srv.http("GET", f"/v1/programs/{w.id}/processes?final_wait=0.2&expect=3", w.a.token).body
    assert len(got["processes"]) == 2


def test_a_report_after_the_placement_was_released_still_counts(srv: OssServer) -> None:
    """A short process: its home releases the placement before the agent's first batch."""
    w = World(srv)
    r = srv.http("POST", f"/v1/programs/{w.id}/placements", w.a.token, {"processes": 1})
    assert r.status == 200 and r.body["assignments"] == [{"instance": "vm1", "processes": 1}]
    for _ in range(2):  # the submission's slot and this one
        srv.http("POST", f"/v1/programs/{w.id}/release", w.a.token, {"instance": "vm1"})
    assert srv.http("GET", f"/v1/programs/{w.id}", w.a.token).body["placements"] == []
    assert w.report(1, usage=[w.row(final=True, cpu_us=10)]).body["refused"] == 0
    srv.call(srv.oss.tick())
    ev = srv.http("GET", f"/v1/programs/{w.id}/logs?stream=event", w.a.token).body["lines"]
    assert [(ln["instance"], ln["text"]) for ln in ev] == [
        ("vm1", "placed 1 process"),
        ("vm1", "placed 1 process"),
    ]


def test_bytes_measured_after_the_program_ended_are_billed(oss_factory: Any) -> None:
    clock = Clock()
    srv = oss_factory(clock=clock, rates=Rates(net_micros_per_gb=1 << 30))  # 1 micro/byte
    w = World(srv)
    clock.advance(3)
    srv.call(srv.oss.meter())
    srv.http("POST", f"/v1/programs/{w.id}/finish", w.a.token, {"exit_status": 0})
    w.report(1, usage=[w.row(net_rx=700, net_tx=300, final=True)])  # the last process's
    srv.call(srv.oss.meter())
    recs = srv.http("GET", f"/v1/programs/{w.id}/billing", w.a.token).body["records"]
    assert [(r["seconds"], r["net_micros"]) for r in recs] == [(3, 0), (0, 1000)]
    srv.call(srv.oss.meter())  # billed once
    assert len(srv.http("GET", f"/v1/programs/{w.id}/billing", w.a.token).body["records"]) == 2


def test_processes_of_a_failed_instance_are_lost_with_an_event(srv: OssServer) -> None:
    w = World(srv)
    w.report(1, usage=[w.row(pid=4242, argv=["cc", "-c", "a.c"]), w.row(pid=7, final=True)])
    assert srv.clock is not None
    srv.clock.advance(srv.oss.config.heartbeat_timeout + 1)
    srv.call(srv.oss.check_availability())
    srv.call(srv.oss.tick())
    procs = srv.http("GET", f"/v1/programs/{w.id}/processes", w.a.token).body["processes"]
    assert {p["pid"]: p["state"] for p in procs} == {4242: "lost", 7: "exited"}
    ev = srv.http("GET", f"/v1/programs/{w.id}/logs?stream=event", w.a.token).body["lines"]
    lost = [ln for ln in ev if ln["text"].startswith("lost")]
    assert [(ln["instance"], ln["pid"]) for ln in lost] == [("vm1", 4242)]
    assert lost[0]["text"].startswith("lost: pid 4242 (cc -c a.c) on vm1: silent ")


def test_storage_is_billed_as_measured_while_a_walk_is_fresh(oss_factory: Any) -> None:
    clock = Clock()
    srv = oss_factory(clock=clock, rates=Rates(storage_micros_per_gb_s=1024))
    w = World(srv)  # declares no storage
    body = {"instance": "vm1", "seq": 1, "storage": [{"program_id": w.id, "kb": 1 << 20}]}
    assert srv.http("POST", "/v1/agents/report", w.vm1, body).body["refused"] == 0
    clock.advance(2)
    srv.call(srv.oss.meter())  # 1024 MB x 2 s x 1024 micros per GiB-second = 2048
    clock.advance(200)  # the walk is stale: back to the declared 0 MB
    srv.call(srv.oss.meter())
    recs = srv.http("GET", f"/v1/programs/{w.id}/billing", w.a.token).body["records"]
    assert [r["storage_micros"] for r in recs] == [2048, 0]
    other = {"instance": "vm2", "seq": 1, "storage": [{"program_id": w.id, "kb": 5}]}
    assert srv.http("POST", "/v1/agents/report", w.vm2, other).body["refused"] == 1
