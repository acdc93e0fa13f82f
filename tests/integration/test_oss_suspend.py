"""Budget stop -> checkpoint -> `dcp-oss resume` -> the same final output (issue 12).

A real `dcp-oss serve` with the local provider (an agent in its own namespaces
whose CRIU works, as it tells the OSS when it registers), a counter placed by a
real `dcptrace --oss`.  Its hard budget reached, the OSS suspends it: the agent
dumps and kills the counter and keeps its images, the program is `suspended`
(placements kept, billed nothing more), dcptrace says so once and waits.  A
resume is refused while the budget is still reached; raised with `dcp-oss limits
set`, `dcp-oss resume` restores the counter and dcptrace prints exactly what an
uninterrupted run prints and exits with its status.  Skipped with the reason
when root or CRIU is missing.
"""

from __future__ import annotations

import contextlib
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import dcptrace_argv, traced_env, wait_for
from tests.integration.checkpointing import local_pool
from tests.integration.test_dcptrace_oss import Lab, _env

pytestmark = [pytest.mark.usefixtures("has_ptrace"), pytest.mark.slow, pytest.mark.root]

# Counts 1..400 (argv[1] s apart), `at` holding the last number written; exits 7.
COUNTER = r"""
import os, sys, time
pause = float(sys.argv[1])
for i in range(1, 401):
    print(i, flush=True)
    if pause:
        with open("at.tmp", "w") as f:
            f.write(str(i))
        os.rename("at.tmp", "at")
        time.sleep(pause)
sys.exit(7)
"""


@pytest.fixture
def lab(tmp_path: Path) -> Iterator[Lab]:
    """dcp-oss serve (tick 0.5 s), the local provider, one ready priced instance."""
    with local_pool(tmp_path, price=1000, instances=1, program=COUNTER) as lab:
        yield lab


def _agent_log() -> str:
    """The local instances' logs (the provider keeps them in its own directory)."""
    return "".join(
        p.read_text(errors="replace") for p in Path("/tmp").glob("dcp-local-provider-*/*.log")
    )


def _dcp_oss(lab: Lab, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "oss", *args, "--url", lab.url],
        capture_output=True, text=True, env=dict(_env(), DCP_TOKEN=lab.token), timeout=60,
    )  # fmt: skip


def _at(lab: Lab) -> int:
    try:
        return int((lab.data / "at").read_text() or 0)
    except (OSError, ValueError):
        return 0


@contextlib.contextmanager
def _counting(lab: Lab) -> Iterator[tuple[subprocess.Popen[bytes], str]]:
    """The counter under a real `dcptrace --oss`, placed and past 5; its program id.
    Killed on the way out if still running."""
    env = dict(traced_env(), DCP_TOKEN=lab.token)
    env.pop("DCP_OSS_FALLBACK", None)
    p = subprocess.Popen(
        [*dcptrace_argv("--no-state", "--oss", lab.url, "--placement", "spread"),
         "--", "sh", "-c", f"{sys.executable} counter.py 0.05; exit $?"],
        cwd=lab.data, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        stdin=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        found: list[dict[str, object]] = []

        def running() -> bool:
            found[:] = [q for q in lab.get("/v1/programs") if q["state"] == "running"]
            return bool(found) and bool(found[0]["placements"]) and _at(lab) >= 5

        assert wait_for(running, 60), lab.get("/v1/programs")
        yield p, str(found[0]["id"])
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()


def test_a_budget_stop_suspends_and_resume_gives_the_uninterrupted_output(lab: Lab) -> None:
    whole = subprocess.run(
        [sys.executable, str(lab.data / "counter.py"), "0"], capture_output=True, timeout=60
    )
    assert whole.returncode == 7 and whole.stdout.decode().split() == [
        str(i) for i in range(1, 401)
    ]
    with _counting(lab) as (p, program):
        spent = lab.get(f"/v1/programs/{program}")["spent_micros"]
        res = _dcp_oss(lab, "limits", "set", "--program", program, "--hard-budget", str(spent + 1))
        assert res.returncode == 0, res.stderr

        def state() -> str:
            return str(lab.get(f"/v1/programs/{program}")["state"])

        assert wait_for(lambda: state() != "running", 30)
        got = lab.get(f"/v1/programs/{program}")
        assert got["state"] == "suspended", got
        assert got["placements"], got  # kept for the resume
        assert got["status_reason"].startswith("suspended: program hard budget of"), got
        # The agent dumped, then killed, the counter: it writes no more.
        logs = ""

        def dumped() -> bool:
            nonlocal logs
            logs = _dcp_oss(lab, "logs", program).stdout
            return "checkpointed and stopped" in logs

        assert wait_for(dumped, 60), (logs, _agent_log())
        stopped_at = _at(lab)
        assert 5 <= stopped_at < 400, stopped_at
        billed = lab.get(f"/v1/programs/{program}/billing")["total_micros"]
        time.sleep(1.5)  # three ticks: nothing more is billed, nothing more is counted
        assert lab.get(f"/v1/programs/{program}/billing")["total_micros"] == billed
        assert _at(lab) == stopped_at and p.poll() is None
        # Refused while the budget is still reached: one line, still suspended.
        res = _dcp_oss(lab, "resume", program)
        assert res.returncode != 0 and res.stderr.count("\n") == 1, res
        assert "stays suspended" in res.stderr and "raise it first" in res.stderr, res.stderr
        assert state() == "suspended"
        res = _dcp_oss(lab, "limits", "set", "--program", program, "--hard-budget", "10000000000")
        assert res.returncode == 0, res.stderr
        res = _dcp_oss(lab, "resume", program)
        assert res.returncode == 0, res.stderr
        assert res.stdout.startswith(f"{program}: running (resumed by "), res.stdout
        out, err = p.communicate(timeout=120)
    text = err.decode()
    assert "Traceback" not in text, text
    assert p.returncode == 7, text
    assert out == whole.stdout  # byte-identical to the uninterrupted run
    said = [ln for ln in text.splitlines() if "suspended at its budget" in ln]
    assert said == [f"dcptrace: suspended at its budget: dcp-oss resume {program} after raising it"]
    # Its end, recorded by dcptrace's tracer right after dcptrace returns.
    assert wait_for(lambda: lab.get(f"/v1/programs/{program}")["state"] == "failed", 30)
    assert lab.get(f"/v1/programs/{program}")["exit_status"] == 7


def test_a_cancelled_suspended_program_ends_its_dcptrace(lab: Lab) -> None:
    with _counting(lab) as (p, program):
        res = _dcp_oss(lab, "limits", "set", "--program", program, "--hard-budget", "1")
        assert res.returncode == 0, res.stderr
        assert wait_for(
            lambda: "checkpointed and stopped" in _dcp_oss(lab, "logs", program).stdout, 60
        )
        assert lab.get(f"/v1/programs/{program}")["state"] == "suspended"
        res = _dcp_oss(lab, "programs", "cancel", program)
        assert res.returncode == 0, res.stderr
        out, err = p.communicate(timeout=60)  # ends: its counter was killed for good
    assert p.returncode == 128 + 9, err.decode()
    lines = out.decode().split()
    assert lines == [str(i) for i in range(1, len(lines) + 1)] and len(lines) < 400, lines
    assert lab.get(f"/v1/programs/{program}")["state"] == "cancelled"
