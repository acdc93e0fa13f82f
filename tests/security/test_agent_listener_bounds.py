"""Attack: a local user ties up the agent's listener without any credential.

Old agent: 300 idle connections stayed open for good, a 16 MiB HELLO was
buffered whole before anything was checked (8 of them: 38 -> 167 MB), and
anonymous /v1/health told the instance name, pid and session count.
"""

from __future__ import annotations

import json
import secrets

import pytest
from attack import as_nobody, require_attacker
from wire import CLIENT, real_agent

pytestmark = pytest.mark.security

IDLE = (
    CLIENT
    + r"""
import select
addr, count, limit = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
socks = []
for _ in range(count):
    s = connect(addr)
    socks.append(s)
# Wait (bounded) until the agent has closed them all; count the ones still open.
deadline = time.monotonic() + limit
open_ = set(socks)
while open_ and time.monotonic() < deadline:
    ready, _, _ = select.select(list(open_), [], [], 0.5)
    for s in ready:
        try:
            data = s.recv(4096)
        except OSError:
            data = b""
        if not data:
            open_.discard(s)
print(json.dumps({"opened": len(socks), "still_open": len(open_)}))
"""
)

FLOOD = (
    CLIENT
    + r"""
addr, count, size = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
sent = []
for _ in range(count):
    s = connect(addr)
    # A HELLO header announcing `size` bytes, then the bytes, as fast as the agent takes them.
    n = 0
    try:
        s.sendall(MAGIC + HDR.pack(HELLO, 0, size, 0))
        chunk = b"A" * 65536
        while n < size:
            n += s.send(chunk)
    except OSError:
        pass
    reply = read_frames(s)
    sent.append({"sent": n, "reply": [k for k, _, _ in reply],
                 "message": reply[-1][2].decode(errors="replace") if reply else ""})
    s.close()
print(json.dumps(sent))
"""
)

HEALTH = r"""
import sys, urllib.request
print(urllib.request.urlopen("http://%s/v1/health" % sys.argv[1], timeout=10).read().decode())
"""


def test_idle_and_oversized_strangers_are_cut_off_and_health_says_only_alive() -> None:
    require_attacker()
    token = secrets.token_urlsafe(24)
    with real_agent(token) as agent:
        # 300 idle connections: the agent closes every one (handshake deadline 5 s;
        # beyond 128 pending ones it refuses at once).  30 s is a bound, not a timing.
        res = as_nobody(IDLE, agent.address, "300", "30", timeout=90)
        assert res.returncode == 0, res.stderr
        idle = json.loads(res.stdout)
        assert idle == {"opened": 300, "still_open": 0}, idle

        before = agent.rss_kb()
        res = as_nobody(FLOOD, agent.address, "8", str(16 << 20), timeout=120)
        assert res.returncode == 0, res.stderr
        for attempt in json.loads(res.stdout):
            # Refused on the header: what got out before the reset sat in socket buffers.
            assert attempt["sent"] < 8 << 20, attempt
            assert attempt["reply"] == [10], attempt  # one ERROR frame, then closed
            assert "bad frame header" in attempt["message"], attempt
        grown_mb = (agent.rss_kb() - before) / 1024
        assert grown_mb < 16, f"agent RSS grew by {grown_mb:.1f} MB"

        res = as_nobody(HEALTH, agent.address)
        assert res.returncode == 0, res.stderr
        assert json.loads(res.stdout) == {"ok": True}
        # The token's holder still gets the details.
        assert json.loads(agent.get("/v1/health", token))["instance"] == agent.name
