"""Failover across a restart of the OSS (issue 12).

A real `dcp-oss serve` and two real agents, each PID 1 of its own PID namespace
(killing one takes its processes with it, as a crashed VM would), run a
counter under `dcptrace --oss URL --checkpoint-every 1`.  The OSS is stopped
and started again on the same port and data mid-run: its policies and index
are rows of its store, so the counter keeps being checkpointed; then the
instance holding it is killed and the restarted OSS restores it on the other,
and the run ends with every number and the counter's own status.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from tests.conftest import dcptrace_argv, traced_env, wait_for
from tests.integration.checkpointing import criu_or_skip
from tests.integration.test_dcptrace_oss import Lab, start_lab
from tests.integration.test_failover_local import _at, _counters, _numbers, _pid_ones

pytestmark = [pytest.mark.usefixtures("has_ptrace"), pytest.mark.root]

N = 200
HOLD = 60  # the counter waits at this number for the test's `go` (no race with its end)
COUNTER = r"""
import os, sys, time
n, hold = int(sys.argv[1]), int(sys.argv[2])
for i in range(1, n + 1):
    print(i, flush=True)
    with open("at", "w") as f:
        f.write(str(i))
    time.sleep(0.02)
    while i == hold and not os.path.exists("go"):
        time.sleep(0.05)
print("done", flush=True)
sys.exit(7)
"""
# Each agent PID 1 of its own PID and mount namespaces, on the host's network.
ISOLATED = ("unshare", "--pid", "--mount", "--mount-proc", "--fork", "--kill-child", "--")
SERVE = ("--heartbeat-timeout", "3")


def _serve(lab: Lab, port: str) -> None:
    _proc, line = lab.start(
        "oss", "serve", "--listen", f"127.0.0.1:{port}", "--data", str(lab.data),
        "--heartbeat-interval", "0.5", "--tick", "0.5", *SERVE,
    )  # fmt: skip
    assert "listening on " in line, line


def _checkpointed_since(store: Path, since: float) -> bool:
    return any(f.stat().st_mtime > since for f in store.glob("*/*.ckpt"))


def test_a_restarted_oss_keeps_checkpointing_and_restores_a_lost_instance_s_program(
    tmp_path: Path,
) -> None:
    if os.geteuid() != 0:
        pytest.skip("instances in their own PID namespaces need root")
    criu_or_skip()
    lab = Lab(tmp_path / "lab")
    lab.data.mkdir(mode=0o700)
    work = tmp_path / "work"
    work.mkdir()
    counter = work / "counter.py"
    counter.write_text(COUNTER)
    try:
        # -v: the agents' INFO lines (checkpoints, restores) are in lab/proc*.log.
        agents = {n: (*ISOLATED, "127.0.0.1:0", "-v") for n in ("n0", "n1")}
        start_lab(lab, "127.0.0.1", agents, serve=SERVE)
        env = dict(traced_env(), DCP_TOKEN=lab.token)
        env.pop("DCP_OSS_FALLBACK", None)
        argv = [*dcptrace_argv("--no-state", "--oss", lab.url, "--placement", "spread",
                               "--checkpoint-every", "1"),
                "--", "sh", "-c", f"python3 {counter} {N} {HOLD}"]  # fmt: skip
        run = subprocess.Popen(argv, cwd=work, env=env, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, stdin=subprocess.DEVNULL)  # fmt: skip
        try:
            assert wait_for(lambda: _at(work) >= HOLD, 120), "the counter never got going"
            ((_pid, ns),) = _counters(counter)
            ones = _pid_ones()
            assert ns in ones, (ns, ones)
            store = lab.data / "checkpoints"
            since = time.time()
            assert wait_for(lambda: _checkpointed_since(store, since), 60), "no checkpoint"
            # The OSS stops (its policies and index were rows of its store) and comes back.
            serve = lab.procs[0]
            serve.send_signal(signal.SIGTERM)
            serve.wait(timeout=30)
            restarted = time.time()
            _serve(lab, lab.url.rpartition(":")[2])
            # It takes the counter's checkpoints still (not refused: no policy known).
            assert wait_for(lambda: _checkpointed_since(store, restarted), 60), (
                "no checkpoint after the restart: "
                + (lab.data / f"proc{len(lab.procs) - 1}.log").read_text()[-3000:]
            )
            for f in store.glob("*/*.ckpt"):
                assert f.stat().st_mode & 0o777 == 0o600
                assert f.parent.stat().st_mode & 0o777 == 0o700
            # The counter's instance is lost for real; the restarted OSS restores it.
            os.kill(ones[ns][0], signal.SIGKILL)
            assert wait_for(lambda: any(n != ns for _p, n in _counters(counter)), 120), (
                _counters(counter), run.poll(),
            )  # fmt: skip
            (work / "go").touch()
            out, err = run.communicate(timeout=180)
        finally:
            if run.poll() is None:
                run.kill()
                run.communicate()
    finally:
        lab.stop()
    said = err.decode()
    assert run.returncode == 7, said
    assert out.split()[-1] == b"done" and out.count(b"done") == 1, said
    assert set(_numbers(out)) == set(range(1, N + 1)), said
    assert "restored on" in said and "from its checkpoint" in said, said
    assert "Traceback" not in said, said
