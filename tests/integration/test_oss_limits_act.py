"""Limits act (issue 10): a real `dcp-oss serve`, three real agents, real `dcptrace --oss`.

A hard budget stops a CPU-bound program placed on every instance: each agent
freezes, then kills, its processes (its log says so), dcptrace prints one
`dcptrace: stopped:` line and exits 124, and billing stopped at the crossing
tick.  A soft budget only keeps new instances away: one warning, the children
run at home.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import dcptrace_argv, secret_file, traced_env, wait_for
from tests.integration.test_dcptrace_oss import Lab, _cli

pytestmark = [pytest.mark.usefixtures("has_ptrace"), pytest.mark.slow]

SPIN = "#!/bin/sh\n# dcp-limits-spin\nwhile :; do :; done\n"
NAMES = ("n0", "n1", "n2")
PRICE = 1000  # micros per instance-second; slots_per_cpu 1 on 2 CPUs: 500/s per spinner


def _send(lab: Lab, method: str, path: str, token: str, body: Any) -> Any:
    req = urllib.request.Request(
        lab.url + path,
        data=json.dumps(body).encode(),
        method=method,
        headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"},
    )
    with urllib.request.urlopen(req, timeout=10) as resp:
        return json.loads(resp.read())


@pytest.fixture
def priced_lab(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Lab]:
    """dcp-oss serve (tick 0.5 s) and three loopback agents on a priced instance type."""
    # Instances without a working CRIU: a hard budget ends the program (with CRIU it
    # is suspended instead: tests/integration/test_oss_suspend.py).
    monkeypatch.setenv("DCP_CRIU", "/bin/false")
    lab = Lab(tmp_path)
    try:
        lab.token = _cli("account", "create", "--data", str(lab.data), "--allow-root", "acme")
        lab.admin = _cli("account", "create", "--data", str(lab.data), "--admin", "op")
        _proc, line = lab.start(
            "oss", "serve", "--listen", "127.0.0.1:0", "--data", str(lab.data),
            "--heartbeat-interval", "0.5", "--tick", "0.5", "--slots-per-cpu", "1",
        )  # fmt: skip
        assert "listening on " in line, line
        lab.url = line.split("listening on ", 1)[1].strip()
        itype = {"name": "t", "cpus": 1, "memory_mb": 64, "price_micros_per_s": PRICE}
        _send(lab, "PUT", "/v1/instance-types", lab.admin, itype)
        pool = {"name": "p", "instance_type": "t", "warm_target": 0, "provider": "none"}
        _send(lab, "PUT", "/v1/pools", lab.admin, pool)
        for name in NAMES:
            token = _send(lab, "POST", "/v1/instances", lab.admin, {"name": name, "pool": "p"})
            _proc, line = lab.start(
                "vmagent", "--oss", lab.url, "--instance", name,
                "--token-file", secret_file(token["token"], lab.data), "--listen", "127.0.0.1:0",
            )  # fmt: skip
            assert line.startswith("listening "), line

        def ready() -> bool:
            rows = lab.get("/v1/instances", lab.admin)
            return sorted(r["name"] for r in rows if r["state"] == "ready") == list(NAMES)

        assert wait_for(ready, 30), lab.get("/v1/instances", lab.admin)
        (lab.data / "spin.sh").write_text(SPIN)
        (lab.data / "spin.sh").chmod(0o755)
        yield lab
    finally:
        lab.stop()
        _kill_spinners()
    # The agents removed the cgroups they made for programs.
    for name in NAMES:
        for root in ("/sys/fs/cgroup/freezer/dcp", "/sys/fs/cgroup/dcp"):
            assert not Path(root, name).exists(), f"{root}/{name} left behind"
    # (.../dcp itself may belong to other agents on this machine: only ours are checked.)


def _spinners() -> list[int]:
    found = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                if b"spin.sh" in (d / "cmdline").read_bytes():
                    found.append(int(d.name))
            except OSError:
                pass
    return found


def _kill_spinners() -> None:
    for pid in _spinners():
        try:
            os.kill(pid, 9)
        except OSError:
            pass


def _start(lab: Lab, script: str) -> subprocess.Popen[bytes]:
    env = dict(traced_env(), DCP_TOKEN=lab.token)
    env.pop("DCP_OSS_FALLBACK", None)
    return subprocess.Popen(
        [*dcptrace_argv("--no-state", "--oss", lab.url, "--placement", "spread"),
         "--", "sh", "-c", script],
        cwd=lab.data, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        stdin=subprocess.DEVNULL,
    )  # fmt: skip


def _running_program(lab: Lab, placed: int) -> dict[str, Any]:
    found: list[dict[str, Any]] = []

    def up() -> bool:
        found[:] = [p for p in lab.get("/v1/programs") if p["state"] == "running"][:1]
        return bool(found) and len(found[0]["placements"]) >= placed

    assert wait_for(up, 60), lab.get("/v1/programs")
    return found[0]


def _agent_logs(lab: Lab) -> str:
    return "\n".join(p.read_text(errors="replace") for p in sorted(lab.data.glob("proc*.log")))


@pytest.mark.root
def test_a_hard_budget_freezes_then_kills_the_program_on_every_instance(priced_lab: Lab) -> None:
    lab = priced_lab
    p = _start(lab, "for i in 1 2 3; do ./spin.sh & done; wait")
    try:
        prog = _running_program(lab, placed=3)
        assert sorted(pl["instance"] for pl in prog["placements"]) == list(NAMES)
        hard = prog["spent_micros"] + 3000  # about two seconds of three spinners from here
        _send(lab, "PUT", f"/v1/programs/{prog['id']}/limits", lab.token,
              {"hard_budget_micros": hard})  # fmt: skip
        out, err = p.communicate(timeout=60)
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
    text = err.decode()
    assert p.returncode == 124, (p.returncode, text)
    assert "Traceback" not in text, text
    stops = [ln for ln in text.splitlines() if ln.startswith("dcptrace: stopped:")]
    assert len(stops) == 1, text
    got = lab.get(f"/v1/programs/{prog['id']}")
    assert got["state"] == "stopped_budget"
    stop = got["stop"]
    assert stop["level"] == "program" and stop["resource"] == "hard_budget_micros"
    assert stop["limit"] == hard and stop["value"] >= hard
    assert stops[0] == (
        f"dcptrace: stopped: program hard budget of {hard} micros reached"
        f" (spent {stop['value']}) [level program]"
    )
    # Billing stopped at the crossing tick: over the budget by at most one record's charge.
    billing = lab.get(f"/v1/programs/{prog['id']}/billing")
    over = billing["total_micros"] - hard
    assert 0 <= over <= max(r["amount_micros"] for r in billing["records"]), billing
    time.sleep(1.5)  # three more ticks: nothing more is billed
    assert lab.get(f"/v1/programs/{prog['id']}/billing")["total_micros"] == billing["total_micros"]
    # Each agent froze, then killed, its spinner: its own events in its log.
    assert wait_for(lambda: _agent_logs(lab).count(f"program {prog['id']} killed") == 3, 20)
    logs = _agent_logs(lab)
    for name in NAMES:
        frozen = logs.find(f"program {prog['id']} frozen on {name}: 1 process")
        killed = logs.find(f"program {prog['id']} killed on {name}: 1 process")
        assert 0 <= frozen < killed, logs
    assert "cgroup v1 freezer" in logs or "cgroup v2" in logs, logs
    assert wait_for(lambda: _spinners() == [], 20), _spinners()
    # The placements are gone: no slot stays taken.
    rows = lab.get("/v1/instances", lab.admin)
    assert {r["name"]: r["used_slots"] for r in rows} == dict.fromkeys(NAMES, 0)


@pytest.mark.root
def test_a_soft_budget_warns_once_and_keeps_new_children_at_home(priced_lab: Lab) -> None:
    lab = priced_lab
    _send(lab, "PUT", "/v1/limits", lab.token, {"budget_micros": 1})
    # Under its budget (nothing spent yet) the account gets its first instance: a spinner
    # placed there spends past the 1-micro budget at the next tick.  Then three children.
    script = (
        "./spin.sh & while [ ! -f spent ]; do sleep 0.1; done; kill $!; wait;"
        " for i in 1 2 3; do ./marker.sh & done; wait"
    )
    (lab.data / "marker.sh").write_text(
        "#!/bin/sh\nwhere=$(tr '\\0' ' ' < /proc/$PPID/cmdline |"
        " sed -n 's/.*--instance \\([^ ]*\\).*/\\1/p')\necho \"on ${where:-home}\"\n"
    )
    (lab.data / "marker.sh").chmod(0o755)
    p = _start(lab, script)
    try:
        prog = _running_program(lab, placed=1)
        assert wait_for(lambda: lab.get(f"/v1/programs/{prog['id']}")["spent_micros"] > 0, 30)
        (lab.data / "spent").touch()
        out, err = p.communicate(timeout=60)
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
    text = err.decode()
    assert p.returncode == 0, text
    assert "Traceback" not in text, text
    assert out.decode().split("\n")[:-1] == ["on home"] * 3, (out, text)
    warnings = [ln for ln in text.splitlines() if "soft budget of 1 micros reached" in ln]
    assert len(warnings) == 1 and warnings[0].endswith("no new instances"), text
    assert warnings[0].startswith("dcptrace: WARNING: account soft budget"), text
    # Still a program of its own: finished, never stopped.
    # (recorded by dcptrace's tracer process right after dcptrace returns)
    assert wait_for(lambda: lab.get(f"/v1/programs/{prog['id']}")["state"] == "finished", 30)
