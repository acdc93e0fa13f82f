"""Attack: a compromised instance forges another instance's telemetry.

The attacker holds instance vm2's token (root on vm2) and reports usage, output
lines and events for a victim's program that runs only on vm1: to bill the victim
for traffic it never made, or to plant lines in its log.  The OSS accepts rows from
an instance only for programs it runs or ran: these are refused and counted, and the
victim's metrics, processes, log and bill stay untouched.  Naming vm1 in the body
with vm2's token is refused outright, and an account token cannot report at all.
"""

from __future__ import annotations

import json

import pytest
from attack import as_nobody, require_attacker
from conftest_oss import OssServer

from oss.billing.pricing import Rates

pytestmark = pytest.mark.security
pytest_plugins = ["conftest_oss"]

FORGE = r"""
import json, os, sys, urllib.error, urllib.request
url, instance, program = sys.argv[1:4]
row = {"program_id": program, "pid": 4242, "started": 1.0}
body = {
    "instance": instance, "seq": 1,
    "usage": [{**row, "cpu_us": 10**12, "net_rx": 1 << 40, "net_tx": 1 << 40, "final": True}],
    "logs": [{"program_id": program, "pid": 4242, "ts": 1.0, "stream": "stdout",
              "text": "PLANTED"}],
    "events": [{"program_id": program, "pid": 4242, "ts": 1.0, "kind": "exit", "status": 0}],
}
req = urllib.request.Request(url + "/v1/agents/report", data=json.dumps(body).encode(),
                             headers={"Authorization": "Bearer " + os.environ["TOKEN"],
                                      "Content-Type": "application/json"}, method="POST")
try:
    with urllib.request.urlopen(req, timeout=10) as resp:
        print(resp.status, resp.read().decode())
except urllib.error.HTTPError as exc:
    print(exc.code, exc.read().decode())
"""


def _attack(srv: OssServer, token: str, instance: str, program: str) -> tuple[int, dict]:
    env = {"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8", "TOKEN": token}
    res = as_nobody(FORGE, srv.url, instance, program, env=env)
    assert res.returncode == 0, res.stderr
    status, _, body = res.stdout.strip().partition(" ")
    return int(status), json.loads(body)


def test_another_instances_program_cannot_be_charged_or_logged(oss_factory: object) -> None:
    require_attacker()
    srv: OssServer = oss_factory(rates=Rates(net_micros_per_gb=10**6))  # type: ignore[operator]
    root = srv.account("op", admin=True)
    srv.http(
        "PUT",
        "/v1/instance-types",
        root.token,
        {"name": "t", "cpus": 1, "memory_mb": 512, "price_micros_per_s": 0},
    )
    srv.http("PUT", "/v1/pools", root.token, {"name": "p", "instance_type": "t"})
    srv.instance("vm1", pool="p")
    vm2 = srv.instance("vm2", pool="p")
    victim = srv.account("victim")
    prog = srv.http(
        "POST",
        "/v1/programs",
        victim.token,
        {"argv": ["x"], "resource_policy": {"tenancy": "dedicated"}},
    ).body
    assert [p["instance"] for p in prog["placements"]] == ["vm1"]

    status, reply = _attack(srv, vm2, "vm2", prog["id"])
    assert (status, reply) == (200, {"acked_seq": 1, "refused": 3})
    status, reply = _attack(srv, vm2, "vm1", prog["id"])  # vm2's token, vm1's name
    assert status == 401, reply
    status, reply = _attack(srv, victim.token, "vm1", prog["id"])  # not an instance
    assert status == 401, reply

    srv.call(srv.oss.meter())
    base = f"/v1/programs/{prog['id']}"
    got = srv.http("GET", base + "/metrics", victim.token).body
    assert (got["cpu_seconds"], got["net_rx_bytes"], got["by_instance"]) == (0.0, 0, {})
    assert srv.http("GET", base + "/processes", victim.token).body["processes"] == []
    lines = srv.http("GET", base + "/logs", victim.token).body["lines"]
    assert not [ln for ln in lines if ln["instance"] == "vm2" or ln["text"] == "PLANTED"]
    bill = srv.http("GET", base + "/billing", victim.token).body
    assert all(r["net_micros"] == 0 for r in bill["records"])
