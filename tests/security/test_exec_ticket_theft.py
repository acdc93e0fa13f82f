"""Attack: `nobody` polls /proc during a run of 30 placed execs and uses every
ticket-looking string it can read against the agents.

Old deputy: `--ticket T` on its argv; the attacker used 30 of 30 tickets first,
ran `id` as root each time, and the victim's execs all failed.  Now a ticket
sits in a 0600 file of the victim's uid (its path on argv is useless), and a
deputy proves it holds the ticket's secret before the agent runs anything.
"""

from __future__ import annotations

import json
import subprocess
import tempfile
import threading
from pathlib import Path
from typing import Any

import pytest
from attack import as_nobody, require_attacker
from wire import HARVEST, victim_script

from tests.conftest import dcptrace_argv, traced_env

pytestmark = pytest.mark.security

EXECS = 30


def run_attacked(instances: int, execs: int) -> tuple[Any, dict[str, Any]]:
    """Run a victim under `dcptrace --instances N` while the attacker harvests; both results."""
    require_attacker()
    shared = Path(tempfile.mkdtemp(prefix="dcp-theft-"))
    shared.chmod(0o777)
    result: dict[str, Any] = {}
    victim = subprocess.Popen(
        [*dcptrace_argv("--no-state", "--instances", str(instances), "--placement", "spread"), "--",
         "sh", "-c", victim_script(shared, execs)],
        env=traced_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        stdin=subprocess.DEVNULL,
    )  # fmt: skip

    def attacker() -> None:
        result["res"] = as_nobody(
            HARVEST, str(shared / "stop"), str(shared / "done"), "150", str(victim.pid),
            timeout=200,
        )  # fmt: skip

    thread = threading.Thread(target=attacker)
    thread.start()
    try:
        out, err = victim.communicate(timeout=240)
        (shared / "stop").touch()  # the victim failed early: stop the attacker all the same
        thread.join(240)
        res = result["res"]
        assert res.returncode == 0, res.stderr
        return subprocess.CompletedProcess(victim.args, victim.returncode, out, err), json.loads(
            res.stdout
        )
    finally:
        (shared / "stop").touch()
        (shared / "done").touch()
        if victim.poll() is None:
            victim.kill()
            victim.wait()
        thread.join(240)
        for p in shared.iterdir():
            p.unlink()
        shared.rmdir()


def test_no_ticket_read_from_proc_runs_anything_and_the_victim_runs_all() -> None:
    victim, seen = run_attacked(2, EXECS)
    assert seen["agents"], f"the attacker saw no deputy (nothing was placed?): {seen}"
    assert seen["tried"] > 0, seen
    assert seen["wins"] == [], seen["wins"]
    assert seen["ticket_files"] >= 1 and seen["ticket_files_read"] == 0, seen
    lines = victim.stdout.decode().split()
    assert lines == [f"ok-{i}" for i in range(1, EXECS + 1)], victim.stderr.decode()[-2000:]
    assert victim.returncode == 0, victim.stderr
