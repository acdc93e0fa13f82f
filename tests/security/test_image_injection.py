"""Attack: a local user has an agent restore a process image of their making.

The agent restores CRIU images as root (`POST /v1/migrations`): whoever gets
images restored there runs any process, as any user, on the instance.  Only a
source agent holding a migration ticket minted with this instance's key may
send them; the attacker (`nobody`) tries without a ticket, with tickets MAC'd
under keys it can guess, with another instance's name, and the other routes of
the feature (check, commit, checkpoint, migrate).  Every attempt is refused
before a byte of images is unpacked (no scratch directory is ever created).
"""

from __future__ import annotations

import json
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from attack import as_nobody, require_attacker

from tests.integration.test_trace_resident import DROP, TracedAgent

pytestmark = pytest.mark.security

INJECT = r"""
import hashlib, hmac, json, struct, sys, time, urllib.error, urllib.request
addr, name = sys.argv[1:3]
sid = "ab" * 16

def ticket(key, instance):
    public = "m1.i.%s.%d.%s" % ("00" * 12, int((time.time() + 30) * 1000), sid)
    mac = hmac.new(key.encode(), ("migrate.%s.%s" % (public, instance)).encode(), "sha256")
    return public + "." + mac.hexdigest()

meta = json.dumps({"session": sid, "pids": [4242]}).encode()
images = struct.pack(">I", len(meta)) + meta + b"\0" * 4096

def post(path, auth, body):
    headers = {"Content-Type": "application/octet-stream"}
    if auth:
        headers["Authorization"] = auth
    req = urllib.request.Request("http://%s%s" % (addr, path), data=body, headers=headers,
                                 method="POST")
    try:
        with urllib.request.urlopen(req, timeout=20) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode().strip()

out = []
for label, auth in [
    ("none", None),
    ("bearer", "Bearer guess"),
    ("empty-key", "DCP-Migrate " + ticket("", name)),
    ("name-as-key", "DCP-Migrate " + ticket(name, name)),
    ("other-instance", "DCP-Migrate " + ticket("", "elsewhere")),
    ("garbage", "DCP-Migrate m1.i.x.y.z.w"),
]:
    for path, body in [
        ("/v1/migrations", images),
        ("/v1/migrations/check", json.dumps({"pids": [4242]}).encode()),
        ("/v1/migrations/commit", json.dumps({"session": sid}).encode()),
    ]:
        out.append([label, path] + list(post(path, auth, body)))
for path in ("/v1/sessions/%s/checkpoint" % sid, "/v1/sessions/%s/migrate" % sid):
    out.append(["no-bearer", path] + list(post(path, None, b"{}")))
print(json.dumps(out))
"""


@pytest.fixture(scope="module")
def agent() -> Iterator[TracedAgent]:
    require_attacker()
    a = TracedAgent("inj0")
    yield a
    a.stop()
    DROP.close()


def test_nobody_cannot_have_an_agent_restore_images_of_its_making(agent: TracedAgent) -> None:
    def unpacked() -> set[Path]:
        places = (Path("/dev/shm"), Path(tempfile.gettempdir()))
        return {p for place in places for p in place.glob(f"dcp-mig-{agent.name}-*-restore-*")}

    before = unpacked()
    res = as_nobody(INJECT, agent.address, agent.name, timeout=120)
    assert res.returncode == 0, res.stderr
    answers = json.loads(res.stdout)
    assert len(answers) == 20
    for label, path, status, text in answers:
        if label in ("none", "bearer", "no-bearer"):
            assert status == 401, (label, path, status, text)
        elif label == "garbage":
            assert status == 409 and "malformed migration ticket" in text, (label, path, text)
        else:
            refused = f"migration ticket not valid for {agent.name}"
            assert status == 409 and refused in text, (label, path, status, text)
    assert unpacked() == before  # nothing unpacked
