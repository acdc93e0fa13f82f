"""Attack: a placed process widens its view (or claims another program's) in HELLO.

A program's view (`--map`) travels with each placed process in the deputy's
HELLO, so a local user holding the exec ticket of its own placed process could
send another view: map `/` over its virtual directory, or name another program
to be traced (and charged) as.  Tickets bind the program and the digest of its
view (ticket v3): the agent refuses a HELLO whose view is not the one the
ticket vouches for, and refuses tickets of the old format, which bind none.
Old agent: it ran the exec whatever view the HELLO carried.
"""

from __future__ import annotations

import json
import secrets

import pytest
from attack import as_nobody, require_attacker
from wire import CLIENT, real_agent

from oss.compute import exectickets
from vmagent.exec import tickets
from vmagent.exec.view import View

pytestmark = pytest.mark.security

ID = (b"/usr/bin/id", (b"/usr/bin/id", b"-u"))

SCRIPT = (
    CLIENT
    + r"""
import binascii
addr, tries = sys.argv[1], json.loads(sys.argv[2])
results = []
for t in tries:
    argv = [a.encode() for a in t["argv"]]
    extra = {b"view": binascii.unhexlify(t["view"])} if t["view"] else {}
    out, err = run_v2(addr, t["ticket"], argv[0], argv, None, None, extra)
    results.append({"out": out.decode(errors="replace").strip(), "error": err})
print(json.dumps(results))
"""
)


def attack(address: str, tries: list[dict[str, object]]) -> list[dict[str, str | None]]:
    res = as_nobody(SCRIPT, address, json.dumps(tries))
    assert res.returncode == 0, res.stderr
    return list(json.loads(res.stdout))


def old_ticket(token: str, name: str) -> str:
    """The format before views (v2: no program, no view), as the old agent took it."""
    v3 = tickets.mint(token, name, uid=1000, gid=1000, digest=tickets.exec_digest(*ID))
    parts = tickets.split(v3)[0].split(".")
    public = ".".join(["v2", *parts[1:9]])
    return f"{public}.{tickets.secret_of(token, public, name)}"


def test_a_process_cannot_widen_its_view_or_change_program() -> None:
    require_attacker()
    token = secrets.token_urlsafe(24)
    mine = View.of("prog_a", {"/mnt/v": "/srv/data"})
    wider = View.of("prog_a", {"/mnt/v": "/"})
    extra_map = View.of("prog_a", {"/mnt/v": "/srv/data", "/etc": "/tmp"})
    other_program = View.of("prog_b", {"/mnt/v": "/srv/data"})

    def ticket(view: View) -> str:
        return tickets.mint(
            token, agent.name, uid=1000, gid=1000, digest=tickets.exec_digest(*ID),
            program="prog_a", view=view.digest(),
        )  # fmt: skip

    argv = ["/usr/bin/id", "-u"]
    with real_agent(token) as agent:
        results = attack(
            agent.address,
            [
                {"ticket": ticket(mine), "argv": argv, "view": wider.hex()},
                {"ticket": ticket(mine), "argv": argv, "view": extra_map.hex()},
                {"ticket": ticket(mine), "argv": argv, "view": other_program.hex()},
                {"ticket": ticket(mine), "argv": argv, "view": ""},  # drop the view
                {"ticket": old_ticket(token, agent.name), "argv": argv, "view": wider.hex()},
                {"ticket": ticket(mine), "argv": argv, "view": mine.hex()},  # as vouched
            ],
        )
    *refused, ok = results
    assert ok == {"out": "1000", "error": None}, (ok, agent.log)
    for r in refused:
        assert r["out"] == "" and r["error"], results
    assert "cannot be widened" in str(refused[0]["error"]), refused[0]
    assert "another program" in str(refused[2]["error"]), refused[2]
    assert "old format" in str(refused[4]["error"]), refused[4]
    assert exectickets.VERSION == "v3"
