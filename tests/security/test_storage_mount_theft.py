"""Attack: a stranger asks an agent to mount a program's storage from the stranger's server.

Had it worked, the program's files on that instance would be read from, and
its writes sent to, a server the attacker runs.  The agent's storage routes
(`POST /v1/storage`, `DELETE /v1/storage/NAME`) take the agent's token before
they read a body; without it: 401, nothing mounted, nothing unmounted, and a
large body is not buffered.
"""

from __future__ import annotations

import json
import secrets
from pathlib import Path

import pytest
from attack import as_nobody, require_attacker
from wire import real_agent

pytestmark = pytest.mark.security

MOUNT = r"""
import json, sys, urllib.error, urllib.request
addr, token, body = sys.argv[1], sys.argv[2], sys.argv[3].encode()
out = []
for method, path, data in (("POST", "/v1/storage", body), ("DELETE", "/v1/storage/victim", None),
                           ("POST", "/v1/storage", b"x" * (8 << 20))):
    req = urllib.request.Request("http://%s%s" % (addr, path), data=data, method=method,
                                 headers={"Authorization": "Bearer " + token})
    try:
        out.append(urllib.request.urlopen(req, timeout=30).status)
    except urllib.error.HTTPError as exc:
        out.append(exc.code)
    except OSError:
        out.append("closed")
print(json.dumps(out))
"""


def test_a_stranger_cannot_mount_or_unmount_storage_on_an_instance() -> None:
    require_attacker()
    token = secrets.token_urlsafe(24)
    name = "theft-" + secrets.token_hex(4)
    spec = {"name": name, "server": "127.0.0.1:1", "key": "attacker", "host_key": "x",
            "volumes": 1, "memory_capacity": 1 << 20}  # fmt: skip
    with real_agent(token) as agent:
        for guess in ("", "wrong-" + token):
            res = as_nobody(MOUNT, agent.address, guess, json.dumps(spec))
            assert res.returncode == 0, res.stderr
            codes = json.loads(res.stdout)
            assert codes[:2] == [401, 401], codes
            assert codes[2] in (401, 413, "closed"), codes  # refused, never buffered whole
    assert not Path(f"/run/dcp/fs/{name}").exists()
