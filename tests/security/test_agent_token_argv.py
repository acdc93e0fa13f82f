"""Attack: `nobody` scans /proc/*/cmdline and /proc/*/environ during a real
`dcptrace --instances 2` run for the instance tokens, and tries everything it
found (as a bearer token, as a ticket, as a key to mint its own root ticket)
against the agents it saw.

Old code: the agents took `--token TOKEN` on argv; the attacker minted a ticket
and ran commands as root.  Now the token reaches an agent over an inherited
pipe, and nothing on any command line or readable environment opens an agent.
"""

from __future__ import annotations

import pytest
from test_exec_ticket_theft import run_attacked

pytestmark = pytest.mark.security


def test_no_instance_token_in_proc_and_nothing_found_runs_as_root() -> None:
    victim, seen = run_attacked(2, 4)
    assert seen["tried"] > 0, seen
    assert seen["wins"] == [], seen["wins"]
    assert len(seen["agents"]) == 2 and seen["instances"] == ["node0", "node1"], seen
    # The agents' own command lines were in view (and say where the token came from).
    agents = [c for c in seen["agent_cmdlines"] if " -m vmagent " in c]
    assert len(agents) >= 2, seen  # (other runs on this machine may add theirs)
    assert all("--token-fd" in c and "--token " not in c for c in agents), agents
    assert seen["environ_read"] == 0, seen  # root's environments are not nobody's to read
    assert victim.returncode == 0, victim.stderr
    assert victim.stdout.decode().split() == ["ok-1", "ok-2", "ok-3", "ok-4"]
