"""Optimizer moves (issue 12, migrate on decision) with real local instances.

A real `dcp-oss serve` with two pools of namespaced local instances: `p` (fast:
the instance gets what the host gives it) and `p-slow`, whose instances are
limited to a tenth of one CPU by a cgroup CPU quota (the local provider's
`make_slow`).  The agents measure their CPU score at registration (the slow one
scores lower because of the quota: measured, not declared).  A CPU-bound program
placed by a real `dcptrace --oss` on the cheaper slow instance is moved to the
fast one by the optimizer without being asked (real CRIU), its output and exit
status are those of a native run, and the move and its reason are in `dcp-oss
programs show`, the program's log, the OSS log and the run record.  A program
whose policy turns moves off stays where it was.  Skipped with the reason when
root, CRIU or a cgroup CPU controller is missing.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import dcptrace_argv, traced_env, wait_for
from tests.integration.checkpointing import local_pool, pool_agents, ready_instances
from tests.integration.test_dcptrace_oss import Lab, _cli, _env
from tests.integration.test_oss_limits_act import _send

pytestmark = [pytest.mark.usefixtures("has_ptrace"), pytest.mark.slow, pytest.mark.root]

# ROUNDS rounds of pure-Python work (0: until FLAG.stop exists), a line each; where it
# runs goes to FLAG.host (the instance, from its agent's command line), not stdout, so
# stdout is the same wherever it ran; exit 5.  Its files are looked at every tenth
# round: each look stops it in its instance tracer, which on a throttled instance
# can wait for the next quota period, and a process stopped that often is not
# CPU-bound to the optimizer (it is not runnable while stopped).
WORK = r"""
import os, sys
rounds, flag = int(sys.argv[1]), sys.argv[2]
x, i = 1, 0
while (i < rounds) if rounds else not (i % 10 == 0 and os.path.exists(flag + ".stop")):
    for _ in range(100_000):
        x = (x * 1103515245 + 12345) & 0x7FFFFFFF
    print(i, x, flush=True)
    if i % 10 == 0:
        cmd = open("/proc/1/cmdline", "rb").read().split(b"\0")
        where = cmd[cmd.index(b"--hostname") + 1].decode() if b"--hostname" in cmd else "home"
        cpu = [ln for ln in open("/proc/self/cgroup").read().splitlines() if ":cpu" in ln]
        with open(flag + ".host.tmp", "w") as f:
            f.write(where + "\n" + "".join(cpu))
        os.rename(flag + ".host.tmp", flag + ".host")
    i += 1
sys.exit(5)
"""
ROUNDS = 500  # ~3.5 s of CPU natively, idle; minutes on the slow instance: it moves first


def _cpu_controller_or_skip() -> None:
    root = Path("/sys/fs/cgroup")
    try:
        v2 = "cpu" in (root / "cgroup.controllers").read_text().split()
    except OSError:
        v2 = False
    if not v2 and not (root / "cpu" / "cpu.cfs_quota_us").exists():
        pytest.skip("no cgroup CPU controller to make slow local instances")


@pytest.fixture
def lab(tmp_path: Path) -> Iterator[Lab]:
    """Pool p-slow: one instance at a tenth of a CPU (price 10/s); pool p of a fast type
    (price 100/s), empty until the test fills it."""
    _cpu_controller_or_skip()
    serve = (
        "--heartbeat-timeout", "30", "--slots-per-cpu", "2",
        "--provider", "slow=vmagent.cluster.provider:make_slow",
    )  # fmt: skip
    with local_pool(tmp_path, price=100, instances=0, max_size=1, serve=serve) as lab:
        slow = {"name": "slowt", "cpus": 2, "memory_mb": 64, "price_micros_per_s": 10}
        _send(lab, "PUT", "/v1/instance-types", lab.admin, slow)
        pool = {"name": "p-slow", "instance_type": "slowt", "warm_target": 1, "max_size": 1,
                "provider": "slow"}  # fmt: skip
        _send(lab, "PUT", "/v1/pools", lab.admin, pool)
        assert wait_for(lambda: len(ready_instances(lab)) == 1, 60), lab.get(
            "/v1/instances", lab.admin
        )
        (lab.data / "work.py").write_text(WORK)
        try:
            yield lab
        finally:
            (lab.data / "b.stop").touch()


def _dcptrace(lab: Lab, token: str, rounds: int, flag: str) -> subprocess.Popen[bytes]:
    env = dict(traced_env(), DCP_TOKEN=token)
    env.pop("DCP_OSS_FALLBACK", None)
    # --no-share-cwd: the slow instance's whole quota (a tenth of a CPU) would be
    # shared by its dcpfs and two CPU-bound programs; FLAG.host through the program's
    # storage took minutes there.  A move of a process writing in the shared cwd:
    # test_oss_migrate.py (the same move).
    return subprocess.Popen(
        [*dcptrace_argv("--no-state", "--oss", lab.url, "--placement", "spread",
                        "--record", f"{flag}.json", "--no-share-cwd"),
         "--", "sh", "-c", f"{sys.executable} work.py {rounds} {flag}; exit $?"],
        cwd=lab.data, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        stdin=subprocess.DEVNULL,
    )  # fmt: skip


def _dcp_oss(lab: Lab, *args: str, token: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "oss", *args, "--oss", lab.url],
        capture_output=True, text=True, env=dict(_env(), DCP_TOKEN=token), timeout=60,
    )  # fmt: skip


def _where(lab: Lab, flag: str) -> str:
    """The instance the program ran on at its last round."""
    try:
        return (lab.data / f"{flag}.host").read_text().split("\n")[0]
    except OSError:
        return ""


def _cpu_cgroup(lab: Lab, flag: str) -> str:
    """Its CPU cgroup at its last round (a slow instance's quota is one)."""
    try:
        return (lab.data / f"{flag}.host").read_text().split("\n", 1)[1]
    except (OSError, IndexError):
        return ""


def _program(lab: Lab, token: str) -> str:
    found: list[str] = []

    def up() -> bool:
        found[:] = [p["id"] for p in lab.get("/v1/programs", token) if p["state"] == "running"]
        return len(found) == 1

    assert wait_for(up, 60), lab.get("/v1/programs", token)
    return found[0]


def _log(lab: Lab, path: str, token: str) -> list[dict[str, Any]]:
    return list(lab.get(path, token)["lines"])


def _end(p: subprocess.Popen[bytes], timeout: float) -> tuple[str, str]:
    try:
        out, err = p.communicate(timeout=timeout)
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
    return out.decode(), err.decode()


def test_a_cpu_bound_program_moves_to_the_faster_instance_and_one_with_moves_off_stays(
    lab: Lab,
) -> None:
    (slow,) = ready_instances(lab)
    assert pool_agents(lab.url), "the slow instance's agent is not found by its OSS URL"
    # Another tenant whose default policy turns optimizer moves off.
    calm = _cli("account", "create", "--data", str(lab.data), "--allow-root", "calm")
    _send(lab, "PUT", "/v1/policies", calm, {"scaling_policy": {"moves": False}})
    # Both programs start on the slow instance (the only one), CPU-bound; then a fast
    # instance comes up.  Nobody asks for a move.
    b = _dcptrace(lab, calm, 0, "b")  # until told to stop
    a = _dcptrace(lab, lab.token, ROUNDS, "a")
    try:
        prog_b, prog_a = _program(lab, calm), _program(lab, lab.token)
        assert wait_for(lambda: _where(lab, "a") == _where(lab, "b") == slow, 60), (
            _where(lab, "a"),
            _where(lab, "b"),
        )
        pool = {"name": "p", "instance_type": "t", "warm_target": 1, "max_size": 1,
                "provider": "local"}  # fmt: skip
        _send(lab, "PUT", "/v1/pools", lab.admin, pool)
        assert wait_for(lambda: len(ready_instances(lab)) == 2, 60)
        speeds = {r["name"]: r["speed"] for r in lab.get("/v1/instances", lab.admin)}
        (fast,) = [n for n in ready_instances(lab) if n != slow]
        # Measured at registration: the quota shows (well above the minimum gain).
        assert speeds[fast] > 1.5 * speeds[slow] > 0, speeds
        # The optimizer sees A CPU-bound on the slow instance and moves it.
        assert wait_for(lambda: _where(lab, "a") == fast, 150), _where(lab, "a")
        # It runs at the fast instance's speed there: out of the slow one's CPU quota.
        assert wait_for(lambda: slow not in _cpu_cgroup(lab, "a"), 30), _cpu_cgroup(lab, "a")
        assert slow in _cpu_cgroup(lab, "b"), _cpu_cgroup(lab, "b")
        # B was as CPU-bound, as old, on the same instance: it held, for its policy.
        lines = _log(lab, f"/v1/programs/{prog_b}/logs", calm)
        holds = [ln["text"] for ln in lines if ln["text"].startswith("optimizer: ")]
        assert holds == ["optimizer: no move: moves are off by its policy"], holds
        assert _where(lab, "b") == slow
        (lab.data / "b.stop").touch()
        out_b, err_b = _end(b, 120)
        out_a, err_a = _end(a, 300)
    finally:
        for p in (a, b):
            if p.poll() is None:
                p.kill()
                p.wait()
    native = subprocess.run(
        [sys.executable, "work.py", str(ROUNDS), "native"],
        cwd=lab.data, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert native.returncode == 5
    assert a.returncode == 5, err_a
    assert out_a == native.stdout  # every line once, in order, the same numbers
    assert "Traceback" not in err_a, err_a
    assert b.returncode == 5, err_b
    lines_b = [ln.split() for ln in out_b.splitlines()]
    assert lines_b and [int(i) for i, _x in lines_b] == list(range(len(lines_b)))

    # The move and its reason: programs show, the program's log, the OSS log, the record.
    shown = _dcp_oss(lab, "programs", "show", prog_a, token=lab.token)
    assert shown.returncode == 0, shown.stderr
    (moved,) = [ln for ln in shown.stdout.splitlines() if f": {slow} -> {fast} at " in ln]
    assert ": optimizer: CPU-bound (" in moved and f" on {slow} (speed " in moved, moved
    assert "x faster" in moved, moved
    texts = [ln["text"] for ln in _log(lab, f"/v1/programs/{prog_a}/logs", lab.token)]
    starts = [t for t in texts if t.startswith("optimizer: moving pid ")]
    assert len(starts) == 1 and f"from {slow} to {fast}: CPU-bound (" in starts[0], texts
    assert any(t.startswith("optimizer: moved pid ") for t in texts), texts
    oss_log = [ln["text"] for ln in _log(lab, "/v1/oss/logs", lab.admin)]
    assert any(t.startswith(f"program {prog_a} optimizer: moving pid ") for t in oss_log)
    assert not any(f"program {prog_b} optimizer: moving" in t for t in oss_log)
    record = json.loads((lab.data / "a.json").read_text())
    hops = [r["migrated"] for r in record["placed_processes"] if "migrated" in r]
    assert len(hops) == 1 and (hops[0]["from"], hops[0]["to"]) == (slow, fast), hops
    assert hops[0]["freeze_ms"] > 0 and hops[0]["reason"].startswith("optimizer: CPU-bound")
    record_b = json.loads((lab.data / "b.json").read_text())
    assert not [r for r in record_b["placed_processes"] if "migrated" in r], record_b
