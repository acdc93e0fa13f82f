"""Autoscaling and availability (issue 10) with real local instances.

`dcp-oss serve --provider local=vmagent.cluster.provider:make` grows a pool
(warm 1, max 3, 2 slots per instance) when a program's placements are refused
for capacity, and shrinks it back to its warm instance once the instances idle
past `--idle-grace`; every decision is one OSS log line with its reason.  A
`kill -9` of an instance's agent fails the instance, which is then destroyed
through the provider and named by dcptrace.
"""

from __future__ import annotations

import os
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import dcptrace_argv, traced_env, wait_for
from tests.integration.checkpointing import local_pool, pool_agents, ready_instances
from tests.integration.test_dcptrace_oss import Lab
from tests.integration.test_oss_limits_act import _send

pytestmark = [pytest.mark.usefixtures("has_ptrace"), pytest.mark.slow, pytest.mark.root]

BUSY = """#!/bin/sh
# dcp-autoscale-busy: say where, then spin until the test lets this wave go (where:
# the instance's PID 1 is its agent, argv ending `--hostname NAME`; the program's
# own hostname is the home's everywhere, issue 11)
read w < /proc/1/cmdline
w=${w##*--hostname}
echo "on ${w##*/} wave $1"
while [ ! -f "go$1" ]; do :; done
"""


@pytest.fixture
def pool_lab(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Lab]:
    """dcp-oss serve with the local provider and a pool p (warm 1, max 3) of 2-slot instances."""
    # Instances without a working CRIU: a hard budget ends the program (with CRIU it
    # is suspended instead: tests/integration/test_oss_suspend.py).
    monkeypatch.setenv("DCP_CRIU", "/bin/false")
    serve = ("--heartbeat-timeout", "2", "--slots-per-cpu", "1", "--idle-grace", "3")
    with local_pool(tmp_path, 1, 1, max_size=3, serve=serve, need_criu=False) as lab:
        (lab.data / "busy.sh").write_text(BUSY)
        (lab.data / "busy.sh").chmod(0o755)
        yield lab
    # The program groups of the agents are gone, those of the one killed -9 too (swept
    # by the agents that stopped after it); .../dcp may hold other agents' groups.
    for root in ("/sys/fs/cgroup/freezer/dcp", "/sys/fs/cgroup/dcp"):
        left = sorted(p.name for p in Path(root).glob("p-*"))
        assert left == [], f"{root}: {left} left behind"
    assert not Path("/sys/fs/cgroup/dcp").exists()


def _instances(lab: Lab) -> list[dict[str, Any]]:
    return lab.get("/v1/instances", lab.admin)  # type: ignore[no-any-return]


def _oss_log(lab: Lab) -> list[str]:
    return [ln["text"] for ln in lab.get("/v1/oss/logs?limit=10000", lab.admin)["lines"]]


def _dcptrace(lab: Lab, script: str) -> subprocess.Popen[bytes]:
    env = dict(traced_env(), DCP_TOKEN=lab.token)
    env.pop("DCP_OSS_FALLBACK", None)
    return subprocess.Popen(
        [*dcptrace_argv("--no-state", "--oss", lab.url, "--placement", "spread"),
         "--", "sh", "-c", script],
        cwd=lab.data, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        stdin=subprocess.DEVNULL,
    )  # fmt: skip


def _finish(p: subprocess.Popen[bytes]) -> tuple[str, str]:
    try:
        out, err = p.communicate(timeout=120)
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
    return out.decode(), err.decode()


def test_the_pool_grows_to_max_for_refused_placements_and_shrinks_after_idle_grace(
    pool_lab: Lab,
) -> None:
    lab = pool_lab
    (warm,) = ready_instances(lab)
    p = _dcptrace(lab, "for i in 1 2 3 4 5 6; do ./busy.sh 1 & done; wait")
    try:
        # The warm instance takes 2 of the 6 CPU-bound children, 4 are refused (they spin
        # at home): the pool grows to its max of 3.
        grown = wait_for(lambda: len(ready_instances(lab)) == 3, 90)
        assert grown, (_instances(lab), _oss_log(lab))
        assert warm in ready_instances(lab)
    finally:
        (lab.data / "go1").touch()
    out, err = _finish(p)
    assert p.returncode == 0, err
    assert "Traceback" not in err, err
    where = [ln.split()[1] for ln in out.splitlines()]
    assert len(where) == 6 and where.count(warm) == 2, out
    # Idle past the grace (and the demand window), the two added instances go: back to 1.
    assert wait_for(lambda: ready_instances(lab) == [warm], 120), (_instances(lab), _oss_log(lab))

    def released_lines() -> list[str]:  # the OSS log is written at its next tick
        return [t for t in _oss_log(lab) if t.startswith("pool p: release ")]

    assert wait_for(lambda: sum(t.count(": idle ") for t in released_lines()) == 2, 10)
    log = _oss_log(lab)
    # Two instances created past the first warm one, at least one for the program's
    # demand: its waiting placements, or the width the optimizer gave it from them
    # (whichever the tick saw first); at once, or a tick apart when the refusals reach
    # the OSS over two ticks, or one to keep an idle warm instance once the first is
    # busy (all the policy's).
    grew = [t for t in log if t.startswith("pool p: create ")][1:]
    assert sum(int(t.split()[3].rstrip(":")) for t in grew) == 2, log
    assert any("placements waited" in t or "target width" in t for t in grew), log
    assert all("max 3" in t for t in grew), log
    states = {r["name"]: r["state"] for r in _instances(lab)}
    assert sorted(states.values()) == ["destroyed", "destroyed", "ready"], states


def test_a_killed_agent_is_destroyed_through_the_provider_and_named_by_dcptrace(
    pool_lab: Lab,
) -> None:
    lab = pool_lab
    (node,) = ready_instances(lab)
    # Two children placed on the one instance; the program then waits for both.
    p = _dcptrace(lab, "./busy.sh 1 & ./busy.sh 1 & wait; echo done")
    try:

        def placed() -> bool:
            progs = [q for q in lab.get("/v1/programs") if q["state"] == "running"]
            return bool(progs) and progs[0]["processes"] == 2

        assert wait_for(placed, 60), lab.get("/v1/programs")
        agent = next(
            pid for pid in pool_agents()
            if f"--instance\0{node}\0".encode() in Path(f"/proc/{pid}/cmdline").read_bytes()
        )  # fmt: skip
        os.kill(agent, signal.SIGKILL)  # PID 1 of its namespace: its programs die with it
        out, err = _finish(p)
    finally:
        (lab.data / "go1").touch()
    assert "Traceback" not in err, err
    assert out.splitlines()[-1] == "done", out
    lost = [ln for ln in err.splitlines() if ln.startswith(f"dcptrace: instance {node} lost:")]
    assert len(lost) == 1 and "2 processes ended" in lost[0] and "busy.sh" in lost[0], err
    # The OSS failed the silent instance and destroyed it through its provider.
    log = _oss_log(lab)
    assert wait_for(lambda: f"pool p: destroy {node}: failed" in _oss_log(lab), 30), log
    assert wait_for(
        lambda: {r["name"]: r["state"] for r in _instances(lab)}[node] == "destroyed", 30
    ), _instances(lab)


def _agent_log(name: str) -> str:
    """The log of local instance `name` (the provider keeps it in its own directory)."""
    return "".join(
        p.read_text(errors="replace") for p in Path("/tmp").glob(f"dcp-local-provider-*/{name}.log")
    )


def test_a_hard_budget_stops_a_program_in_a_namespaced_instance(pool_lab: Lab) -> None:
    lab = pool_lab
    (node,) = ready_instances(lab)
    p = _dcptrace(lab, "./busy.sh 1 & ./busy.sh 1 & wait")
    try:

        def placed() -> list[dict[str, Any]]:
            return [q for q in lab.get("/v1/programs") if q["state"] == "running"
                    and q["processes"] == 2]  # fmt: skip

        assert wait_for(lambda: bool(placed()), 60), lab.get("/v1/programs")
        prog = placed()[0]
        _send(lab, "PUT", f"/v1/programs/{prog['id']}/limits", lab.token,
              {"hard_budget_micros": prog["spent_micros"] + 2})  # fmt: skip
        out, err = _finish(p)
        # The agent, PID 1 of its namespace, grouped and froze both children, then killed
        # them (within a heartbeat of the stop; dcptrace may have seen it first).
        assert wait_for(lambda: "killed on" in _agent_log(node), 10), _agent_log(node)
    finally:
        (lab.data / "go1").touch()  # only now: the children must not end on their own
    assert p.returncode == 124, err
    assert err.count("dcptrace: stopped: program hard budget of") == 1, err
    log = _agent_log(node)
    assert f"program {prog['id']} frozen on {node}: 2 process(es)" in log, log
    assert f"program {prog['id']} killed on {node}: 2 process(es)" in log, log
    assert "by cgroup" in log, log
