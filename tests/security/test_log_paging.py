"""Attack (on correctness): paging a log with small limits loses lines.

Before: the returned cursor jumped to the program's last chunk (15 lines in 3
chunks with limit=4: 11 lines unreachable).  After: the cursor names the next
line; paging with any limit, and following, returns every line once, in order.
"""

from __future__ import annotations

import json

import pytest
from attack import as_nobody
from ossproc import OssProcess

pytestmark = pytest.mark.security

TOTAL = 10_000
BATCHES = (1, 7, 2500, 1023, 1024, 1025, 3, 999)  # cycled: chunk boundaries everywhere

PAGER = r"""
import json, sys, urllib.request
url, token, prog = sys.argv[1:4]
sizes = [int(x) for x in sys.argv[4].split(",")]
def get(query):
    req = urllib.request.Request(f"{url}/v1/programs/{prog}/{query}",
                                 headers={"Authorization": "Bearer " + token})
    with urllib.request.urlopen(req, timeout=60) as r:
        return r.read()
out = {}
for stream in ("logs?stream=stdout&", "stdout?"):
    got, cursor, i = [], 0, 0
    while True:
        page = json.loads(get(f"{stream}limit={sizes[i % len(sizes)]}&cursor={cursor}"))
        i += 1
        if not page["lines"]:
            break
        got += [ln["text"] for ln in page["lines"]]
        cursor = page["cursor"]
    out[stream] = got
# Follow from the middle of the log (the program has ended: the stream ends).
half = json.loads(get("stdout?limit=4999"))
rest = get(f"stdout?follow=true&limit=97&cursor={half['cursor']}").splitlines()
tail = [json.loads(line)["text"] for line in rest]
out["follow"] = [ln["text"] for ln in half["lines"]] + tail
print(json.dumps(out))
"""


def test_paging_returns_every_line_once_in_order(oss: OssProcess) -> None:
    tenant = oss.account("pager")
    prog = oss.http("POST", "/v1/programs", tenant, {"argv": ["true"]}).body["id"]
    want = [f"line {i}" for i in range(TOTAL)]
    sent, b = 0, 0
    while sent < TOTAL:
        n = min(BATCHES[b % len(BATCHES)], TOTAL - sent)
        b += 1
        lines = [
            # Two instances' output interleaved in time; stderr lines in between.
            {"ts": 100.0 + k, "stream": "stdout", "text": want[k],
             "instance": f"vm{k % 2}"}
            for k in range(sent, sent + n)
        ] + [{"ts": 100.0 + sent, "stream": "stderr", "text": f"noise {sent}"}]  # fmt: skip
        body = {"lines": lines}
        assert oss.http("POST", f"/v1/programs/{prog}/logs", tenant, body).status == 200
        sent += n
    assert oss.http("POST", f"/v1/programs/{prog}/finish", tenant, {"exit_status": 0}).status == 200
    got = as_nobody(PAGER, oss.url, tenant, prog, "1,3,7,13,101,997,4999")
    assert got.returncode == 0, got.stderr
    res = json.loads(got.stdout)
    for key in ("logs?stream=stdout&", "stdout?", "follow"):
        texts = res[key]
        assert len(texts) == len(set(texts)) == TOTAL, (key, len(texts), len(set(texts)))
        # Arrival order: per append batch, the first-named instance's lines, then the
        # other's, each in time order; across batches, the batch order.
        assert sorted(texts, key=lambda t: int(t.split()[1])) == want
        assert texts == _expected_order(), key


def _expected_order() -> list[str]:
    out: list[str] = []
    sent, b = 0, 0
    while sent < TOTAL:
        n = min(BATCHES[b % len(BATCHES)], TOTAL - sent)
        b += 1
        batch = range(sent, sent + n)
        first = sent % 2
        out += [f"line {k}" for k in batch if k % 2 == first]
        out += [f"line {k}" for k in batch if k % 2 != first]
        sent += n
    return out
