"""Attack: a local user holding a valid exec ticket (stolen or its own) stretches it.

A ticket is bound to one exec (path + argv) and the uid/gid the home side
vouched for; the agent caps its lifetime and single use survives a restart.
Old agent: any ticket ran any program as any uid the HELLO named, lived 300 s,
and a restarted agent forgot which tickets were used.
"""

from __future__ import annotations

import json
import secrets
import time

import pytest
from attack import as_nobody, require_attacker
from wire import CLIENT, real_agent

from vmagent.exec import tickets

pytestmark = pytest.mark.security

ID = (b"/usr/bin/id", (b"/usr/bin/id", b"-u"))

SCRIPT = (
    CLIENT
    + r"""
addr, tries = sys.argv[1], json.loads(sys.argv[2])
results = []
for t in tries:
    argv = [a.encode() for a in t["argv"]]
    if t["ticket"].startswith("v1."):
        out, err = run_v1(addr, t["ticket"], argv[0], argv, t.get("uid", 0), t.get("uid", 0))
    else:
        out, err = run_v2(addr, t["ticket"], argv[0], argv, t.get("uid"), t.get("uid"))
    results.append({"out": out.decode(errors="replace").strip(), "error": err})
print(json.dumps(results))
"""
)


def attack(address: str, tries: list[dict[str, object]]) -> list[dict[str, str | None]]:
    res = as_nobody(SCRIPT, address, json.dumps(tries))
    assert res.returncode == 0, res.stderr
    return list(json.loads(res.stdout))


def ticket(token: str, name: str, **kw: object) -> str:
    return tickets.mint(
        token, name, uid=1000, gid=1000, digest=tickets.exec_digest(ID[0], ID[1]), **kw
    )  # type: ignore[arg-type]


def test_a_ticket_runs_only_its_exec_as_its_uid_briefly_and_once() -> None:
    require_attacker()
    token = secrets.token_urlsafe(24)
    with real_agent(token) as agent:
        a = agent.name
        once = ticket(token, a)
        results = attack(
            agent.address,
            [
                {"ticket": ticket(token, a), "argv": ["/bin/sh", "-c", "id -u"]},  # argv B
                {"ticket": ticket(token, a), "argv": ["/usr/bin/id", "-u"], "uid": 0},  # uid 0
                {"ticket": ticket(token, a, ttl=3600), "argv": ["/usr/bin/id", "-u"]},
                {"ticket": ticket(token, a, now=time.time() - 60), "argv": ["/usr/bin/id", "-u"]},
                {"ticket": once, "argv": ["/usr/bin/id", "-u"]},  # as vouched: runs
                {"ticket": once, "argv": ["/usr/bin/id", "-u"]},  # again: refused
            ],
        )
        other, as_root, long_lived, expired, ok, again = results
        assert other["error"] and "another program" in other["error"], other
        assert as_root["error"] and "vouches for uid 1000" in as_root["error"], as_root
        assert long_lived["error"] and "longer than 30 s" in long_lived["error"], long_lived
        assert expired["error"] and "expired" in expired["error"], expired
        assert ok == {"out": "1000", "error": None}, ok  # the ticket's uid, not the agent's
        assert again["error"] and "already used" in again["error"], again
        unused = ticket(token, a)
        used = ticket(token, a)
        assert attack(agent.address, [{"ticket": used, "argv": ["/usr/bin/id", "-u"]}])[0] == ok
        agent.stop()
        agent.start()  # same token, new process: it remembers no nonce
        after = attack(
            agent.address,
            [
                {"ticket": used, "argv": ["/usr/bin/id", "-u"]},
                {"ticket": unused, "argv": ["/usr/bin/id", "-u"]},
                {"ticket": ticket(token, a), "argv": ["/usr/bin/id", "-u"]},
            ],
        )
        assert after[0]["error"] and "before this agent started" in after[0]["error"], after
        assert after[1]["error"] and "before this agent started" in after[1]["error"], after
        assert after[2] == ok, after
        agent.stop()
        # Its log says why each was refused, and holds no secret.
        assert "already used" in agent.log and "before this agent started" in agent.log
        assert token not in agent.log
        for t in (once, used, unused):
            assert t.rpartition(".")[2] not in agent.log
