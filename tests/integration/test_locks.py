"""File locks across instances (issue 14): flock and fcntl record locks, native vs cluster.

The shell idiom `( flock 9; critical section ) 9>lock` locks the open file
description the subshell and the placed `flock` share: placed on an instance,
`flock`'s copy of fd 9 is a relayed pipe, so before issue 14 every locker got
"the lock" at once and a 4-way counter ended at 1.  Each case runs natively and
under `dcptrace --instances 3 --placement spread` and must print the same.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import struct
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import dcptrace_argv, traced_env, wait_for
from tests.integration.test_dcptrace_oss import Lab, dcptrace, ns_lab  # noqa: F401 (fixture)

pytestmark = [
    pytest.mark.root,
    pytest.mark.netns,
    pytest.mark.usefixtures("has_ptrace"),
    pytest.mark.skipif(os.geteuid() != 0, reason="namespaced instances need root"),
]

CLUSTER = ("--instances", "3", "--placement", "spread")
ROUNDS = 20
LOCKC = Path(__file__).parent / "data" / "lockc.c"


@pytest.fixture(scope="module")
def lockc(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The fcntl test program, built once."""
    cc = shutil.which("cc")
    if cc is None:
        pytest.skip("no C compiler (cc) to build the fcntl test program")
    out = tmp_path_factory.mktemp("lockc") / "lockc"
    subprocess.run([cc, "-O1", "-o", str(out), str(LOCKC)], check=True)
    return out


def run(mode: str, script: str, cwd: Path) -> tuple[bytes, int]:
    """(stdout, status) of `sh -c script` natively or in the cluster."""
    argv = ["sh", "-c", script]
    if mode == "cluster":
        argv = [*dcptrace_argv(*CLUSTER), "--", *argv]
    proc = subprocess.run(argv, cwd=cwd, env=traced_env(), capture_output=True,
                          stdin=subprocess.DEVNULL, timeout=300)  # fmt: skip
    assert proc.returncode == 0, proc.stderr.decode(errors="replace")
    return proc.stdout, proc.returncode


@pytest.fixture
def workdir(tmp_path: Path) -> Iterator[Path]:
    yield tmp_path


def rounds(body: str) -> str:
    """A script that runs `body` (a 4-way counter on ./c) ROUNDS times, printing each total."""
    return f"""
r=0
while [ $r -lt {ROUNDS} ]; do
  echo 0 > c
  {body}
  wait; read n < c; echo "$n"
  r=$((r+1))
done
"""


def test_flock_counter_across_instances_ends_at_4_every_round(workdir: Path) -> None:
    if shutil.which("flock") is None:
        pytest.skip("no flock(1) (util-linux)")
    script = rounds(
        "for i in 1 2 3 4; do "
        "( flock 9; read n < c; sleep 0.02; echo $((n+1)) > c ) 9>c.lock & done"
    )
    expected = b"4\n" * ROUNDS
    assert run("native", script, workdir)[0] == expected
    assert run("cluster", script, workdir)[0] == expected


def test_locks_on_files_each_instance_opens_itself_hold_too(workdir: Path) -> None:
    # `flock FILE cmd` opens FILE in the placed flock(1): local instances share the
    # host's kernel, which serves such locks natively (T lets them run).
    if shutil.which("flock") is None:
        pytest.skip("no flock(1) (util-linux)")
    script = rounds(
        "for i in 1 2 3 4; do flock c.lock sh -c 'read n < c; sleep 0.02; echo $((n+1)) > c' & done"
    ).replace(f"-lt {ROUNDS}", "-lt 5")  # 5 rounds: each starts 12 placed processes
    assert run("native", script, workdir)[0] == b"4\n" * 5
    assert run("cluster", script, workdir)[0] == b"4\n" * 5


def test_fcntl_counter_across_instances_ends_at_4_every_round(workdir: Path, lockc: Path) -> None:
    # Each placed lockc takes a POSIX write lock on fd 9 (write-only: relayed
    # as a pipe), which its deputy takes at home for it.
    script = rounds(f"for i in 1 2 3 4; do {lockc} count 9 c 9>c.lock & done")
    expected = b"4\n" * ROUNDS
    assert run("native", script, workdir)[0] == expected
    assert run("cluster", script, workdir)[0] == expected


def holder_and(workdir: Path, lockc: Path, then: str) -> str:
    """A script: a placed holder write-locks fd 9, then `then` runs, then it lets go."""
    return f"""
exec 9>c.lock
{lockc} hold 9 {workdir} & h=$!
while [ ! -e ready ]; do sleep 0.02; done
{then}
echo releasing; touch go; wait $h
"""


@pytest.mark.parametrize("mode", ["native", "cluster"])
def test_getlk_names_the_holder_in_the_programs_pids(workdir: Path, lockc: Path, mode: str) -> None:
    out, _ = run(mode, holder_and(workdir, lockc, f"{lockc} test 9; echo holder=$h"), workdir)
    lines = out.decode().split()
    assert lines[0] == "type=W" and lines[1].startswith("pid=")
    assert lines[1].removeprefix("pid=") == lines[2].removeprefix("holder="), out


@pytest.mark.parametrize("mode", ["native", "cluster"])
def test_a_blocked_lock_waits_and_a_signal_interrupts_it(
    workdir: Path, lockc: Path, mode: str
) -> None:
    # The first waiter is interrupted (EINTR, its handler has no SA_RESTART);
    # the second waits until the holder lets go, then gets the lock.
    then = (
        f"{lockc} wait 9 {workdir} > w1 & w=$!\n"
        "while [ ! -e waiting ]; do sleep 0.02; done\n"
        "while kill -0 $w 2>/dev/null; do kill -USR1 $w 2>/dev/null; sleep 0.1; done\n"
        "wait $w; cat w1\n"
        f"( {lockc} wait 9; echo after-holder ) & w2=$!\n"
    )
    out, _ = run(mode, holder_and(workdir, lockc, then) + "wait $w2\n", workdir)
    assert out.split(b"\n")[0] == b"EINTR"
    assert out.index(b"releasing") < out.index(b"got"), out
    assert out.endswith(b"got\nafter-holder\n"), out


def test_ofd_locks_follow_the_inherited_description(workdir: Path, lockc: Path) -> None:
    # OFD locks belong to the open file description: two placed processes sharing
    # fd 9 share one lock owner (both get it); a fresh open is another owner (busy).
    script = f"exec 9<>c.lock\n{lockc} ofd 9\n{lockc} ofd 9\nsh -c '{lockc} ofd 8' 8<>c.lock\n"
    expected = b"got\ngot\nbusy\n"
    assert run("native", script, workdir)[0] == expected
    assert run("cluster", script, workdir)[0] == expected


def test_flock_counter_through_a_running_oss_and_namespaced_agents(ns_lab: Lab) -> None:  # noqa: F811
    # `dcptrace --oss`: two agents in their own net/UTS/PID namespaces, over TCP,
    # as VMs are reached (the VM variant is test_vm_lab.py's).
    if shutil.which("flock") is None:
        pytest.skip("no flock(1) (util-linux)")
    script = rounds(
        "for i in 1 2 3 4; do "
        "( flock 9; read n < c; sleep 0.02; echo $((n+1)) > c ) 9>c.lock & done"
    ).replace(f"-lt {ROUNDS}", "-lt 5")
    res = dcptrace(ns_lab, ns_lab.url, "/bin/sh", "-c", script, token=ns_lab.token,
                   placement="spread")  # fmt: skip
    assert res.stdout == b"4\n" * 5, res.stderr.decode(errors="replace")


def test_a_lost_instance_releases_the_locks_its_program_held(tmp_path: Path, lockc: Path) -> None:
    from tests.integration.test_instances_cluster import deputy
    from vmagent.cluster.local import LocalCluster

    lock = tmp_path / "c.lock"
    lock.write_bytes(b"")
    with LocalCluster(1) as cluster:
        inst = cluster.instances[0]
        fd = os.open(lock, os.O_RDWR)
        proc = subprocess.Popen(
            deputy(inst, str(lockc), "hold", str(fd), str(tmp_path), window=1),
            pass_fds=(fd,), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        )  # fmt: skip
        try:
            assert wait_for(lambda: (tmp_path / "ready").exists(), 60)
            # The holder's deputy (its pid, for the program) holds it here at home.
            query = struct.pack("hhqqi4x", fcntl.F_WRLCK, 0, 0, 0, 0)
            held = struct.unpack("hhqqi4x", fcntl.fcntl(fd, fcntl.F_GETLK, query))
            assert (held[0], held[4]) == (fcntl.F_WRLCK, proc.pid)
            cluster.kill(inst.name)
            _, err = proc.communicate(timeout=60)
            assert proc.returncode == 255 and b"lost" in err
            fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # free again
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            os.close(fd)
        cluster.remove_logs()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(pytest.main([__file__, "-q"]))
