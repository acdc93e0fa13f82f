"""Signals behave as without tracing; dcptrace never leaves a tracee behind."""

from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from tests.conftest import dcptrace_argv, run, traced, traced_env, wait_for

pytestmark = pytest.mark.usefixtures("has_ptrace")
PR_SET_CHILD_SUBREAPER = 36


def descendants(pid: int) -> set[int]:
    """Every live descendant of pid (via /proc/*/task/*/children)."""
    out: set[int] = set()
    todo = [pid]
    while todo:
        p = todo.pop()
        try:
            tasks = os.listdir(f"/proc/{p}/task")
        except OSError:
            continue
        for t in tasks:
            try:
                kids = Path(f"/proc/{p}/task/{t}/children").read_text().split()
            except OSError:
                continue
            for k in map(int, kids):
                if k not in out:
                    out.add(k)
                    todo.append(k)
    return out


def program_pids(front: int) -> set[int]:
    """The program's processes: descendants of dcptrace minus its tracer child."""
    try:
        tracers = {int(k) for k in Path(f"/proc/{front}/task/{front}/children").read_text().split()}
    except OSError:
        return set()
    return descendants(front) - tracers


def alive(pid: int) -> bool:
    """True for a process that exists and is not a zombie."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


@pytest.fixture
def subreaper():  # type: ignore[no-untyped-def]
    """Become the subreaper so orphans are reparented to (and reaped by) this test."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)
    yield
    libc.prctl(PR_SET_CHILD_SUBREAPER, 0, 0, 0, 0)
    try:
        while os.waitpid(-1, os.WNOHANG)[0]:
            pass
    except ChildProcessError:
        pass


def start(argv: list[str]) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [*dcptrace_argv(), "--", *argv], env=traced_env(),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )  # fmt: skip


def test_sigkill_of_dcptrace_leaves_no_tracee(subreaper: None) -> None:
    proc = start(["bash", "-c", "sleep 300 & sleep 300 & (sleep 300; echo) & wait"])
    assert wait_for(lambda: len(descendants(proc.pid)) >= 5), "workload did not start"
    tracees = descendants(proc.pid)
    proc.kill()
    proc.wait(timeout=10)
    assert wait_for(lambda: not any(alive(p) for p in tracees)), (
        f"left behind: {[p for p in tracees if alive(p)]}"
    )


def test_sigterm_to_dcptrace_reaches_the_program(subreaper: None) -> None:
    script = "trap 'echo got-term; exit 7' TERM; sleep 30 >/dev/null 2>&1 & wait"
    proc = start(["bash", "-c", script])
    assert wait_for(lambda: len(descendants(proc.pid)) >= 3)
    everything = descendants(proc.pid)
    time.sleep(0.2)  # let bash install its trap and block in wait
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=20)
    assert out == b"got-term\n"
    assert proc.returncode == 7
    for pid in everything:  # the orphaned sleep, still traced, as natively still running
        if alive(pid):
            os.kill(pid, signal.SIGKILL)


def test_orphan_keeps_running_and_dcptrace_returns(subreaper: None, tmp_path: Path) -> None:
    marker = tmp_path / "orphan-done"
    script = f"(sleep 0.5; echo late > {marker}) >/dev/null 2>&1 & echo main-done"
    res = traced(["bash", "-c", script], timeout=20)
    assert res.stdout == b"main-done\n"
    assert not marker.exists()  # dcptrace returned before the orphan finished
    assert wait_for(marker.exists, 10), "the orphan did not finish under the tracer"
    assert marker.read_text() == "late\n"


def test_program_death_by_signal_is_reproduced() -> None:
    proc = start(["sleep", "30"])
    assert wait_for(lambda: len(program_pids(proc.pid)) >= 1)
    time.sleep(0.2)  # past exec: the program, not the pre-exec child
    for child in program_pids(proc.pid):
        os.kill(child, signal.SIGUSR1)
    proc.communicate(timeout=20)
    assert proc.returncode == -signal.SIGUSR1


def test_stop_and_continue_inside_the_program() -> None:
    script = (
        "sleep 1 & p=$!; kill -STOP $p; sleep 0.3; "
        "grep -q '^State:.*[tT]' /proc/$p/status && echo stopped; "
        "kill -CONT $p; wait $p; echo status $?"
    )
    native = run(["bash", "-c", script])
    under = traced(["bash", "-c", script])
    assert native.stdout == b"stopped\nstatus 0\n"
    assert under.stdout == native.stdout
    assert under.returncode == native.returncode == 0


def test_sigpipe_when_the_reader_goes_away() -> None:
    script = f"{' '.join(dcptrace_argv())} -- yes | head -n 2; echo ${{PIPESTATUS[0]}}"
    res = run(["bash", "-c", script], env=traced_env())
    assert res.stdout == b"y\ny\n141\n"


def test_sigchld_and_wait_status_inside_the_program() -> None:
    script = "trap 'echo chld' CHLD; sh -c 'exit 3' & wait $!; echo $?"
    assert traced(["bash", "-c", script]).stdout == run(["bash", "-c", script]).stdout


def test_many_threads_and_execs() -> None:
    script = (
        "import threading, os\n"
        "def f():\n    os.spawnv(os.P_WAIT, '/bin/true', ['true'])\n"
        "ts = [threading.Thread(target=f) for _ in range(20)]\n"
        "[t.start() for t in ts]; [t.join() for t in ts]; print('ok', threading.active_count())"
    )
    import sys

    res = traced([sys.executable, "-c", script])
    assert res.stdout == b"ok 1\n"
    assert res.returncode == 0


def test_tracer_killed_stops_the_program_with_one_clear_line(subreaper: None) -> None:
    proc = start(["sh", "-c", "sleep 300; echo not-reached"])
    assert wait_for(lambda: len(program_pids(proc.pid)) >= 2)
    program = program_pids(proc.pid)
    tracer = next(iter(descendants(proc.pid) - program))
    os.kill(tracer, signal.SIGKILL)
    out, err = proc.communicate(timeout=20)
    assert proc.returncode == 125
    assert b"not-reached" not in out
    assert err.decode().strip() == (
        "dcptrace: the tracer was killed by SIGKILL; the program was stopped with it"
    )
    assert wait_for(lambda: not any(alive(p) for p in program))
