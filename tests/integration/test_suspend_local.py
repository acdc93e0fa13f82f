"""Suspend (dump, kill) and resume of a session's tree on its own instance (issue 12).

What a budget stop does before it kills: the tree is written out with CRIU and
killed, the session and its deputy wait; a resume restores it with the same
pids and it finishes with the output an uninterrupted run gives, the exit
status reaching the same deputy.  Real agent, deputy, tracer and CRIU.
"""

from __future__ import annotations

import os
import subprocess
import urllib.error
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import wait_for
from tests.integration import checkpointing
from tests.integration.checkpointing import agent_call, criu_or_skip
from tests.integration.test_trace_resident import DROP, TracedAgent

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="CRIU dumps and restores as root")

COUNTER = r"""
import os, sys, time
flag = sys.argv[1]
for i in range(1, 121):
    if i == 30 and flag != "-":
        with open(flag + ".tmp", "w") as f:
            f.write(str(int(open('/proc/self/stat').read().split()[0])))
        os.rename(flag + ".tmp", flag)
    print(i, flush=True)
    time.sleep(0.01)
sys.exit(7)
"""


@pytest.fixture(scope="module")
def agent() -> Iterator[TracedAgent]:
    criu_or_skip()
    a = TracedAgent("susp0")
    yield a
    print(a.stop())  # the agent's log, shown when a test failed
    DROP.close()


def run(agent: TracedAgent, flag: str) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        agent.deputy("/usr/bin/python3", "-c", COUNTER, flag),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )


def test_a_suspended_counter_resumes_with_the_output_of_an_uninterrupted_run(
    agent: TracedAgent, tmp_path: Path
) -> None:
    whole = run(agent, "-")
    expected, err = whole.communicate(timeout=120)
    assert whole.returncode == 7, err.decode()
    flag = tmp_path / "flag"
    with checkpointing.started(agent.deputy("/usr/bin/python3", "-c", COUNTER, str(flag))) as proc:
        assert wait_for(flag.exists, 60), "the counter never started"
        pid = int(flag.read_text())
        sid = checkpointing.session_of(agent.address, agent.token, pid)
        held = agent_call(agent.address, agent.token, "POST", f"/v1/sessions/{sid}/suspend", {})
        assert held["pids"] == [pid] and held["image_bytes"] > 0
        assert not Path(f"/proc/{pid}").exists()  # killed: it uses nothing while suspended
        assert proc.poll() is None  # the deputy waits
        with pytest.raises(urllib.error.HTTPError) as twice:
            agent_call(agent.address, agent.token, "POST", f"/v1/sessions/{sid}/suspend", {})
        assert twice.value.code == 409
        back = agent_call(agent.address, agent.token, "POST", f"/v1/sessions/{sid}/resume", {})
        assert back["pid"] == pid and back["restore_ms"] > 0
        out, err = proc.communicate(timeout=120)
    assert proc.returncode == 7, err.decode()
    assert out == expected  # 1..120, no gap, no repeat


def test_resume_of_a_session_not_suspended_is_one_line(agent: TracedAgent, tmp_path: Path) -> None:
    flag = tmp_path / "flag"
    with checkpointing.started(agent.deputy("/usr/bin/python3", "-c", COUNTER, str(flag))) as proc:
        assert wait_for(flag.exists, 60), "the counter never started"
        sid = checkpointing.session_of(agent.address, agent.token, int(flag.read_text()))
        with pytest.raises(urllib.error.HTTPError) as info:
            agent_call(agent.address, agent.token, "POST", f"/v1/sessions/{sid}/resume", {})
        assert info.value.code == 409 and "is not suspended" in info.value.msg
        proc.communicate(timeout=120)
    assert proc.returncode == 7
