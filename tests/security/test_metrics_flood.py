"""Attack: a tenant floods `POST /v1/programs/{id}/metrics` with new metric keys.

Before: 60 reports of 10,000 new keys took the OSS from 317 to 777 MB and the
admin `/metrics` to 188 MB, rendered on the event loop (every instance then
missed its heartbeats).  After: metric keys are a fixed schema (refused with a
4xx otherwise), a tenant reports only for its own programs and never for an
instance its program is not on, and the exposition stays small.
"""

from __future__ import annotations

import json

import pytest
from attack import as_nobody
from ossproc import OssProcess

pytestmark = pytest.mark.security

FLOOD = r"""
import json, sys, threading, urllib.request, urllib.error
url, token, prog, other = sys.argv[1:5]
def post(path, body):
    req = urllib.request.Request(url + path, data=json.dumps(body).encode(), method="POST",
        headers={"Authorization": "Bearer " + token, "Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status
    except urllib.error.HTTPError as e:
        return e.code
health = []
stop = threading.Event()
def probe():
    while not stop.is_set():
        with urllib.request.urlopen(url + "/healthz", timeout=60) as r:
            health.append(r.status)
t = threading.Thread(target=probe)
t.start()
statuses = []
for i in range(60):
    n = 10_000 if i % 2 else 2_000  # 10,000 keys is also over the body cap
    keys = {f"k{i}_{j}": 1 for j in range(n)}
    statuses.append(post(f"/v1/programs/{prog}/metrics", {"syscalls": keys}))
statuses.append(post(f"/v1/programs/{prog}/metrics", {"latency_seconds": {"made_up": 1.0}}))
foreign = post(f"/v1/programs/{other}/metrics", {"syscalls": {"storage": 1}})
on_instance = post(f"/v1/programs/{prog}/metrics", {"instance": "vm-x", "cpu_seconds": 1.0})
fine = post(f"/v1/programs/{prog}/metrics", {"syscalls": {"storage": 7}})
stop.set()
t.join()
print(json.dumps({"flood": statuses, "foreign": foreign, "instance": on_instance,
                  "fine": fine, "health": health}))
"""


def test_metric_key_flood_is_refused_and_memory_stays_bounded(oss: OssProcess) -> None:
    attacker = oss.account("attacker")
    victim = oss.account("victim")
    prog = oss.http("POST", "/v1/programs", attacker, {"argv": ["true"]}).body["id"]
    other = oss.http("POST", "/v1/programs", victim, {"argv": ["true"]}).body["id"]
    rss_before = oss.rss_bytes()
    got = as_nobody(FLOOD, oss.url, attacker, prog, other, timeout=300)
    assert got.returncode == 0, got.stderr
    res = json.loads(got.stdout)
    assert all(s in (413, 422) for s in res["flood"]), res["flood"]
    assert 422 in res["flood"] and 413 in res["flood"]
    assert res["foreign"] == 404  # another tenant's program: not even acknowledged
    assert res["instance"] == 404  # an instance the program is not placed on
    assert res["fine"] == 200  # the fixed schema still takes a proper report
    assert res["health"] and all(s == 200 for s in res["health"])
    # Bounded: no per-key state was kept, the exposition holds the fixed series only.
    assert oss.rss_bytes() - rss_before < 64 << 20
    text = oss.http("GET", "/metrics", oss.admin).raw.decode()
    assert len(text) < 256 << 10
    assert "k1_" not in text and "made_up" not in text
    assert f'program="{prog}",service="storage"}} 7.0' in text
    counters = oss.http("GET", f"/v1/programs/{prog}/metrics", attacker).body
    assert counters["syscalls"] == {"storage": 7}
