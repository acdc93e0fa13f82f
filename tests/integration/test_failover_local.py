"""Failover from checkpoints on local instances (issue 12).

A real `dcptrace --instances 2 --placement spread --checkpoint-every 1` runs a
counter; its agents (each PID 1 of its own PID namespace) checkpoint it every
second into the run's OSS.  The instance holding it is then lost for real:
its agent is killed outright, which takes everything in its namespace with it
(the counter, its tracer).  The counter comes back on the other instance from
its last checkpoint and the run ends with its final output and status: every
number is there, the ones written after the checkpoint twice (at-least-once).
An instance that only froze and comes back is fenced: its copy is killed.
Without a checkpoint, the process is lost with one line, at once.  Skipped with
the reason when root or CRIU is missing.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from oss.compute.failover import END
from tests.conftest import dcptrace_argv, traced_env, wait_for
from tests.integration.checkpointing import criu_or_skip

pytestmark = [pytest.mark.usefixtures("has_ptrace"), pytest.mark.root]

N = 400  # numbers the counter writes, PAUSE s apart
# The counter rewrites `at` in place: a restored run does again what it did after its
# checkpoint, and a rename of a temporary file done then is not undone (the second
# rename would find no temporary file: docs/CHECKPOINT.md, what is lost).  Six digits
# over the same six bytes, never truncated: its size never changes, so CRIU's check of
# an open file's size holds even when a frozen instance's old copy rewrote it while
# the checkpoint was being restored elsewhere (docs/CHECKPOINT.md, never twice).
PAUSE = 0.05
COUNTER = r"""
import os, sys, time
n, pause = int(sys.argv[1]), float(sys.argv[2])
for i in range(1, n + 1):
    print(i, flush=True)
    fd = os.open("at", os.O_WRONLY | os.O_CREAT, 0o644)  # in place, not tmp + rename
    os.pwrite(fd, b"%06d" % i, 0)
    os.close(fd)
    time.sleep(pause)
print("done", flush=True)
sys.exit(7)
"""


@pytest.fixture
def counter(tmp_path: Path) -> Path:
    if os.geteuid() != 0:
        pytest.skip("local instances in their own namespaces need root")
    criu_or_skip()
    path = tmp_path / "counter.py"
    path.write_text(COUNTER)
    return path


def _at(where: Path) -> int:
    try:
        return int((where / "at").read_text() or 0)
    except (OSError, ValueError):
        return 0


def _parent(pid: int) -> int:
    with open(f"/proc/{pid}/stat") as f:
        return int(f.read().rsplit(")", 1)[1].split()[1])


def _descends(pid: int, root: int) -> bool:
    try:
        while pid > 1:
            if pid == root:
                return True
            pid = _parent(pid)
    except OSError:
        return False
    return False


def _pid_ones() -> dict[str, tuple[int, str]]:
    """Every agent that is PID 1 of its namespace: pid namespace -> (pid, its OSS)."""
    found = {}
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            argv = (d / "cmdline").read_bytes().split(b"\0")
            status = (d / "status").read_text()
            ns = os.readlink(d / "ns" / "pid")
        except OSError:
            continue
        if b"vmagent" not in argv[:3] or b"--oss" not in argv:
            continue
        nspid = next(ln.split()[1:] for ln in status.splitlines() if ln.startswith("NSpid:"))
        if nspid[-1] == "1":
            found[ns] = (int(d.name), argv[argv.index(b"--oss") + 1].decode())
    return found


def _agents(root: int) -> dict[str, tuple[int, str]]:
    """The run's agents (PID 1 of their namespaces, under `root`): pid namespace ->
    (pid, OSS socket)."""
    return {ns: a for ns, a in _pid_ones().items() if _descends(a[0], root)}


def _counters(path: Path) -> list[tuple[int, str]]:
    """The counter's processes on instances: (pid here, its pid namespace).  Not its home
    deputy, which carries the program's argv (issue 11) in this pid namespace."""
    home = os.readlink("/proc/self/ns/pid")
    out = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                argv = (d / "cmdline").read_bytes().split(b"\0")
                ns = os.readlink(d / "ns" / "pid")
            except OSError:
                continue
            if argv[:2] == [b"python3", os.fsencode(path)] and ns != home:
                out.append((int(d.name), ns))
    return out


@pytest.fixture
def run(counter: Path) -> Iterator[subprocess.Popen[bytes]]:
    """The checkpointed counter under dcptrace (killed at the end if still running)."""
    argv = dcptrace_argv(
        "--instances", "2", "--placement", "spread", "--checkpoint-every", "1",
        "--", "sh", "-c", f"python3 {counter} {N} {PAUSE}",
    )  # fmt: skip
    proc = subprocess.Popen(
        argv, cwd=counter.parent, env=traced_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()  # the run's reaper removes its instances
            proc.communicate()


def _holder(
    proc: subprocess.Popen[bytes], counter: Path
) -> tuple[int, str, dict[str, tuple[int, str]]]:
    """Once the counter runs on an instance and was checkpointed since: its pid, its
    namespace, and the run's agents."""
    where = counter.parent
    assert wait_for(lambda: _at(where) >= 20, 120), "the counter never got going"
    assert wait_for(lambda: len(_counters(counter)) == 1, 30), _counters(counter)
    ((pid, ns),) = _counters(counter)
    agents = _agents(proc.pid)
    assert ns in agents and len(agents) == 2, (ns, agents)
    since = time.time()
    store = Path(agents[ns][1].removeprefix("unix:")).parent / "oss" / "checkpoints"

    def checkpointed() -> bool:
        return any(f.stat().st_mtime > since for f in store.glob("*/*.ckpt"))

    assert wait_for(checkpointed, 60), f"no checkpoint reached {store}"
    for f in store.glob("*/*.ckpt"):
        assert f.stat().st_mode & 0o777 == 0o600 and f.parent.stat().st_mode & 0o777 == 0o700
    return pid, ns, agents


def _numbers(out: bytes) -> list[int]:
    return [int(x) for x in out.split() if x.isdigit()]


def test_a_killed_instance_s_counter_is_restored_on_the_other_and_completes(
    run: subprocess.Popen[bytes], counter: Path
) -> None:
    pid, ns, agents = _holder(run, counter)
    (other,) = [n for n in agents if n != ns]
    os.kill(agents[ns][0], signal.SIGKILL)  # the whole instance goes, as in a real failure
    assert wait_for(lambda: (pid, ns) not in _counters(counter), 30)
    # The counter runs again, on the other instance.
    assert wait_for(lambda: any(n == other for _p, n in _counters(counter)), 120), (
        _counters(counter), run.poll(),
    )  # fmt: skip
    out, err = run.communicate(timeout=240)
    said = err.decode()
    assert run.returncode == 7, said
    numbers = _numbers(out)
    assert out.split()[-1] == b"done" and out.count(b"done") == 1
    assert set(numbers) == set(range(1, N + 1)), said  # nothing before the checkpoint lost
    # In order but for one step back: to the checkpoint, then on again (at-least-once).
    back = [i for i in range(1, len(numbers)) if numbers[i] <= numbers[i - 1]]
    assert len(back) <= 1, back
    assert "restored on" in said and "from its checkpoint" in said, said
    assert "1 to be restored from checkpoints" in said, said


# Holds `held` open for writing across a checkpoint, then rewrites and extends it (fsync:
# the volume has it) before its instance is lost.  Each step is a closed file the test sees.
HOLDER = r"""
import os, sys, time
def mark(name):
    open(name, "w").close()
def wait(name):
    while not os.path.exists(name):
        time.sleep(0.05)
f = open("held", "w")
f.write("a")
f.flush()
mark("ready")
wait("go")  # a checkpoint was taken since `ready`
f.seek(0)
f.write("bbbb")
f.flush()
os.fsync(f.fileno())
mark("wrote")
wait("end")  # its first instance is gone
f.close()
print(open("held").read(), flush=True)
sys.exit(7)
"""


def test_a_file_held_open_for_writing_and_changed_after_the_checkpoint_is_restored(
    counter: Path,
) -> None:
    """CRIU checks each open file's size: the checkpoint carries the file as it was
    then, the restore puts it back, and the program writes again what it wrote after."""
    where = counter.parent
    holder = where / "holder.py"
    holder.write_text(HOLDER)
    argv = dcptrace_argv(
        "--instances", "2", "--placement", "spread", "--checkpoint-every", "1",
        "--", "sh", "-c", f"python3 {holder}",
    )  # fmt: skip
    proc = subprocess.Popen(
        argv, cwd=where, env=traced_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        stdin=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        assert wait_for(lambda: (where / "ready").exists(), 120), "the holder never started"
        assert wait_for(lambda: len(_counters(holder)) == 1, 30), _counters(holder)
        ((_pid, ns),) = _counters(holder)
        agents = _agents(proc.pid)
        store = Path(agents[ns][1].removeprefix("unix:")).parent / "oss" / "checkpoints"

        def newer(than: float) -> bool:
            return any(f.stat().st_mtime > than for f in store.glob("*/*.ckpt"))

        since = time.time()
        assert wait_for(lambda: newer(since), 60), f"no checkpoint reached {store}"
        since = time.time()  # the one stored then may have begun before `ready`: one more
        assert wait_for(lambda: newer(since), 60), f"no second checkpoint reached {store}"
        (where / "go").touch()
        assert wait_for(lambda: (where / "wrote").exists(), 60), "the holder never rewrote"
        os.kill(agents[ns][0], signal.SIGKILL)
        assert wait_for(lambda: (_pid, ns) not in _counters(holder), 30)
        (where / "end").touch()
        out, err = proc.communicate(timeout=240)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    said = err.decode()
    assert proc.returncode == 7, said
    assert out.split() == [b"bbbb"], (out, said)
    assert "restored on" in said and "from its checkpoint" in said, said
    assert (where / "held").read_text() == "bbbb"


def test_a_frozen_instance_that_comes_back_is_fenced(
    run: subprocess.Popen[bytes], counter: Path
) -> None:
    pid, ns, agents = _holder(run, counter)
    agent = agents[ns][0]
    os.kill(agent, signal.SIGSTOP)  # silent: the OSS declares it lost; the counter runs on
    try:
        other = [n for n in agents if n != ns]
        moved = wait_for(lambda: any(n in other for _p, n in _counters(counter)), 120)
    finally:
        with contextlib.suppress(ProcessLookupError):  # gone with a run that ended
            os.kill(agent, signal.SIGCONT)
    if not moved:
        gone = run.poll() is not None
        said = run.communicate(timeout=30)[1].decode(errors="replace") if gone else ""
        raise AssertionError(f"not restored elsewhere: {_counters(counter)}, {run.poll()}: {said}")
    # Back, it registers again and is told to kill the program's old copy.
    assert wait_for(lambda: (pid, ns) not in _counters(counter), 60), _counters(counter)
    out, err = run.communicate(timeout=240)
    assert run.returncode == 7, err.decode()
    assert out.split()[-1] == b"done" and out.count(b"done") == 1
    assert set(_numbers(out)) == set(range(1, N + 1))
    # Once restored elsewhere, the frozen instance was cut off from the program's files.
    assert b" fenced (declared lost)" in err, err.decode()


def test_without_a_checkpoint_the_process_is_lost_with_one_line_at_once(counter: Path) -> None:
    argv = dcptrace_argv(
        "--instances", "2", "--placement", "spread", "--checkpoint-every", "3600",
        "--", "sh", "-c", f"python3 {counter} {N} {PAUSE}",
    )  # fmt: skip
    proc = subprocess.Popen(
        argv, cwd=counter.parent, env=traced_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    try:
        assert wait_for(lambda: _at(counter.parent) >= 20, 120), "the counter never got going"
        ((_pid, ns),) = _counters(counter)
        os.kill(_agents(proc.pid)[ns][0], signal.SIGKILL)
        # Not the deputy's 90 s failover window: home tells it there is nothing to wait for.
        _out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    said = err.decode()
    assert proc.returncode == 255, said
    lost = [ln for ln in said.splitlines() if "it had no checkpoint" in ln]
    assert len(lost) == 1, said
    assert "restored" not in said


def test_under_a_dcp_oss_the_program_policy_restores_it_too(counter: Path, tmp_path: Path) -> None:
    """`dcptrace --oss URL --checkpoint-every 1` against a real `dcp-oss serve` whose
    pool's local instances upload their checkpoints over HTTP; the home follows the
    restoration through `GET /v1/programs/{id}/restorations`."""
    from tests.integration.checkpointing import local_pool

    serve = ("--heartbeat-timeout", "3", "--slots-per-cpu", "2")
    with local_pool(tmp_path / "lab", price=1, instances=2, serve=serve) as lab:
        env = dict(traced_env(), DCP_TOKEN=lab.token)
        env.pop("DCP_OSS_FALLBACK", None)
        proc = subprocess.Popen(
            [*dcptrace_argv("--no-state", "--oss", lab.url, "--placement", "spread",
                            "--checkpoint-every", "1"),
             "--", "sh", "-c", f"python3 {counter} {N} {PAUSE}"],
            cwd=counter.parent, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            stdin=subprocess.DEVNULL,
        )  # fmt: skip
        try:
            assert wait_for(lambda: _at(counter.parent) >= 20, 120), "the counter never started"
            ((_pid, ns),) = _counters(counter)
            agents = _pid_ones()
            assert ns in agents, (ns, agents)
            since = time.time()
            store = lab.data / "checkpoints"
            assert wait_for(
                lambda: any(f.stat().st_mtime > since for f in store.glob("*/*.ckpt")), 60
            ), f"no checkpoint reached {store}"
            os.kill(agents[ns][0], signal.SIGKILL)
            out, err = proc.communicate(timeout=240)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.communicate()
    said = err.decode()
    assert proc.returncode == 7, said
    assert out.split()[-1] == b"done" and out.count(b"done") == 1
    assert set(_numbers(out)) == set(range(1, N + 1)), said
    assert "restored on" in said, said


def test_a_restore_failing_everywhere_ends_the_run_at_once_naming_why(
    run: subprocess.Popen[bytes], counter: Path
) -> None:
    """The only other instance cannot restore the checkpoint (its images are cut away
    after the holder is killed): the OSS gives the restore up at once and the deputy
    ends with one line naming why, not after its 90 s failover window."""
    pid, ns, agents = _holder(run, counter)
    agent, oss = agents[ns]
    os.kill(agent, signal.SIGKILL)
    assert wait_for(lambda: not Path(f"/proc/{agent}").exists(), 30)
    store = Path(oss.removeprefix("unix:")).parent / "oss" / "checkpoints"
    # No upload of the killed agent is under way any more: none can replace the file.
    assert wait_for(lambda: not list(store.glob("*/*.part*")), 30), list(store.glob("*/*"))
    (ckpt,) = store.glob("*/*.ckpt")
    data = ckpt.read_bytes()
    head = 4 + int.from_bytes(data[:4], "big")
    ckpt.write_bytes(data[:head] + END)  # the description, then no images at all
    _out, err = run.communicate(timeout=80)
    said = err.decode()
    assert run.returncode == 255, said
    why = [ln for ln in said.splitlines() if "it was not restored: its restore failed on" in ln]
    assert len(why) == 1, said
    assert "restored on" not in said and "Traceback" not in said, said
