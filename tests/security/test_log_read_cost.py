"""Attack: tenants read `limit=1` of a large log, over and over, several at once.

Before: every read decoded the whole log (115 MB: 0.38 s each; four readers
took the OSS to 756 MB).  After: chunks are read in order from the cursor and
decoded only up to the one holding the page's last line; the OSS counts the
chunks it decodes (`dcp_log_chunks_decoded_total`), which is what this checks.
"""

from __future__ import annotations

import json

import pytest
from attack import as_nobody
from ossproc import OssProcess

pytestmark = pytest.mark.security

APPENDS = 60
LINES_PER_APPEND = 4096  # four full chunks
DECODED = "dcp_log_chunks_decoded_total"

READERS = r"""
import json, sys, threading, urllib.request
url, token, prog, n = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
pages = [None] * n
def read(i):
    req = urllib.request.Request(f"{url}/v1/programs/{prog}/logs?limit=1",
                                 headers={"Authorization": "Bearer " + token})
    with urllib.request.urlopen(req, timeout=120) as r:
        pages[i] = json.loads(r.read())
ts = [threading.Thread(target=read, args=(i,)) for i in range(n)]
for t in ts: t.start()
for t in ts: t.join()
print(json.dumps([len(p["lines"]) for p in pages]))
"""


def test_reading_one_line_decodes_one_chunk(oss: OssProcess) -> None:
    tenant = oss.account("reader")
    prog = oss.http("POST", "/v1/programs", tenant, {"argv": ["true"]}).body["id"]
    filler = "x" * 60
    for a in range(APPENDS):
        lines = [
            {"ts": 1000.0 + a * LINES_PER_APPEND + i, "text": f"{a}:{i} {filler}"}
            for i in range(LINES_PER_APPEND)
        ]
        assert oss.http("POST", f"/v1/programs/{prog}/logs", tenant, {"lines": lines}).status == 200
    before = oss.metric(DECODED)
    got = as_nobody(READERS, oss.url, tenant, prog, "1")
    assert got.returncode == 0, got.stderr
    assert json.loads(got.stdout) == [1]
    assert oss.metric(DECODED) - before == 1
    # Four readers at once: four chunks decoded in all, not four logs.
    rss_before = oss.rss_bytes()
    before = oss.metric(DECODED)
    got = as_nobody(READERS, oss.url, tenant, prog, "4")
    assert got.returncode == 0, got.stderr
    assert json.loads(got.stdout) == [1] * 4
    assert oss.metric(DECODED) - before == 4
    assert oss.rss_bytes() - rss_before < 32 << 20
    # The contrast: a big page decodes the chunks it returns from (about 1024 lines each).
    before = oss.metric(DECODED)
    page = oss.http("GET", f"/v1/programs/{prog}/logs?limit=100000", tenant).body
    assert len(page["lines"]) == 100_000
    assert 100_000 / 1024 <= oss.metric(DECODED) - before <= 100_000 / 1024 + 3
