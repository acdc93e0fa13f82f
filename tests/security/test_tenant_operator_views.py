"""Attack: a tenant uses the operator views (issue 16) to see or cancel another
tenant's programs.

The web view and `dcp-oss` read a running OSS through routes added for them: the
live event stream (/v1/events), spend against budget (/v1/spend), pages of a
program's processes (?offset&limit), billing by user (?user_id) and the page itself
(/ui/...).  The attacker, as `nobody`, holds tenant B's token (from the environment)
and knows tenant A's program id and user id.  It must:

1. get its own program's changes on the event stream, and never A's;
2. not see A's program or users in its spend report;
3. get 404 for a page of A's processes and for billing of A's user;
4. get 404 cancelling A's program (which then still waits, not cancelled);
5. get nothing but the page's three files from /ui (no path out of it);
6. get 401 from the event stream without a token.
"""

from __future__ import annotations

import json

import pytest
from attack import as_nobody, require_attacker
from ossproc import OssProcess

pytestmark = pytest.mark.security

ATTACK = r"""
import json, os, socket, sys, urllib.error, urllib.request
url, victim_prog, victim_user, own_prog = sys.argv[1:5]
token = os.environ["B_TOKEN"]

def call(method, path, tok=token):
    req = urllib.request.Request(url + path, method=method,
                                 headers={"Authorization": "Bearer " + tok} if tok else {})
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()

out = {}
# 1. the event stream: read what it sends in its first seconds (raw socket: bounded)
host, port = url.split("//")[1].split(":")
s = socket.create_connection((host, int(port)), timeout=10)
s.sendall(("GET /v1/events HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer " + token +
           "\r\n\r\n").encode())
s.settimeout(4)
seen = b""
try:
    while len(seen) < 1 << 20:
        chunk = s.recv(65536)
        if not chunk:
            break
        seen += chunk
except socket.timeout:
    pass
s.close()
text = seen.decode(errors="replace")
out["events_status"] = text.split(" ", 2)[1] if text.startswith("HTTP/") else text[:40]
out["events_own"] = own_prog in text
out["events_victim"] = victim_prog in text
# 2. spend
status, body = call("GET", "/v1/spend")
out["spend"] = status
out["spend_victim"] = victim_prog in body or victim_user in body
# 3. pages of processes, billing by user
out["procs"] = call("GET", "/v1/programs/" + victim_prog + "/processes?offset=0&limit=5")[0]
out["billing_user"] = call("GET", "/v1/billing?user_id=" + victim_user)[0]
# 4. cancel
out["cancel"] = call("POST", "/v1/programs/" + victim_prog + "/cancel")[0]
# 5. the page's files only
out["ui"] = call("GET", "/ui", None)[0]
out["ui_escape"] = [call("GET", p, None)[0] for p in
                    ("/ui/..%2fserver.py", "/ui/%2e%2e%2f%2e%2e%2fetc%2fpasswd", "/ui/routes.py",
                     "/ui/__init__.py")]
# 6. no token
out["events_anon"] = call("GET", "/v1/events", None)[0]
print(json.dumps(out))
"""


def test_a_tenant_sees_and_cancels_only_its_own_programs_in_the_operator_views(
    oss: OssProcess,
) -> None:
    require_attacker()
    a = oss.account("tenant-a")
    b = oss.account("tenant-b")
    victim = oss.http("POST", "/v1/programs", a, {"argv": ["/bin/secret-job"]}).body
    own = oss.http("POST", "/v1/programs", b, {"argv": ["/bin/mine"]}).body
    victim_user = victim["user_id"]
    res = as_nobody(
        ATTACK, oss.url, victim["id"], victim_user, own["id"],
        env={"PATH": "/usr/bin:/bin", "B_TOKEN": b},
    )  # fmt: skip
    assert res.returncode == 0, res.stderr
    got = json.loads(res.stdout)
    assert got["events_status"] == "200", got
    assert got["events_own"] is True, got  # the stream works for the tenant's own
    assert got["events_victim"] is False, got
    assert got["spend"] == 200 and got["spend_victim"] is False, got
    assert got["procs"] == 404 and got["billing_user"] == 404, got
    assert got["cancel"] == 404, got
    assert got["ui"] == 200 and got["ui_escape"] == [404, 404, 404, 404], got
    assert got["events_anon"] == 401, got
    state = oss.http("GET", f"/v1/programs/{victim['id']}", a).body["state"]
    assert state == "pending", state
