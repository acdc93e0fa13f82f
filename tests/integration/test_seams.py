"""The seams between instances (issue 11, items 9-14): native vs dcptrace vs cluster.

Each case runs natively, under plain dcptrace and under
`dcptrace --instances 3 --placement spread`; stdout, stderr and status must match.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from tests.conftest import dcptrace_argv, traced_env, wait_for

pytestmark = pytest.mark.usefixtures("has_ptrace")

CLUSTER = ("--instances", "3", "--placement", "spread")
MODES = {"dcptrace": (), "cluster": CLUSTER}
# The one line a cluster run may add on a host without cgroup v2 controllers.
CGROUP_WARNING = b"dcptrace: WARNING: cgroup v2"


@pytest.fixture(params=sorted(MODES))
def mode(request: pytest.FixtureRequest) -> str:
    """dcptrace alone, or with three spread instances."""
    return str(request.param)


def run(mode: str, argv: list[str], cwd: Path | None = None) -> tuple[bytes, bytes, int]:
    """(stdout, stderr, status) of `argv` natively or under dcptrace in `mode`."""
    full = argv if mode == "native" else [*dcptrace_argv(*MODES[mode]), "--", *argv]
    proc = subprocess.run(full, cwd=cwd, env=traced_env(), capture_output=True,
                          stdin=subprocess.DEVNULL, timeout=240)  # fmt: skip
    err = b"".join(
        line for line in proc.stderr.splitlines(keepends=True)
        if not line.startswith(CGROUP_WARNING)
    )  # fmt: skip
    # A shell's job report names the pid, which differs run to run.
    err = re.sub(rb"(line \d+: +)\d+ ", rb"\1PID ", err)
    return proc.stdout, err, proc.returncode


def differential(argv: list[str], mode: str, cwd: Path | None = None) -> tuple[bytes, bytes, int]:
    """Run natively and in `mode`; assert they agree; return the native result."""
    native = run("native", argv, cwd)
    assert run(mode, argv, cwd) == native
    return native


# --- 11: an exec the kernel refuses fails as it does natively ---------------------


def test_bad_interpreter_and_missing_program_fail_as_natively(tmp_path: Path, mode: str) -> None:
    bad = tmp_path / "bad.sh"
    bad.write_text("#!/nonexistent/interpreter\necho never\n")
    bad.chmod(0o755)
    chained = tmp_path / "chained.sh"  # its interpreter is a script with a bad one
    chained.write_text(f"#!{bad}\necho never\n")
    chained.chmod(0o755)
    script = (
        f'{bad}; echo "status $?"; {chained} x; echo "status $?"; '
        'no-such-program-dcp; echo "status $?"; exec ' + str(bad)
    )
    out, err, status = differential(["bash", "-c", script], mode, cwd=tmp_path)
    assert out == b"status 127\nstatus 127\nstatus 127\n"
    assert b"cannot execute: required file not found" in err
    assert status == 127


# --- 13: a remote SIGKILL is a SIGKILL at home (137), never a deputy error ----------


def test_death_by_sigkill_is_137(mode: str) -> None:
    script = 'sh -c "kill -KILL \\$\\$"; echo "status $?"; sh -c "kill -KILL \\$\\$"'
    out, err, status = differential(["bash", "-c", script], mode)
    assert out == b"status 137\n"
    assert b"Killed" in err and b"dcp:" not in err
    assert status == -signal.SIGKILL  # the shell exec'd the last one: it died of it


# --- 14: SIGKILL of dcptrace --instances leaves nothing behind -----------------------


def lab_objects() -> set[str]:
    """The labs' namespaces, links and agent processes on this machine now."""
    found = (
        {f"netns {n}" for n in os.listdir("/run/netns")} if os.path.isdir("/run/netns") else set()
    )
    found |= {f"link {n}" for n in os.listdir("/sys/class/net") if n.startswith("dcp")}
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"vmagent" in argv[:3] or b"net.reaper" in argv[:3]:
            found.add(f"process {pid} {b' '.join(argv[:3]).decode()}")
    return {o for o in found if o.startswith(("link", "process")) or "dcp-" in o}


@pytest.mark.root
@pytest.mark.netns
@pytest.mark.skipif(os.geteuid() != 0, reason="namespaced instances need root")
def test_sigkill_of_dcptrace_leaves_no_namespace_link_or_agent() -> None:
    before = lab_objects()
    proc = subprocess.Popen(
        [*dcptrace_argv(*CLUSTER), "--", "sh", "-c", "echo ready; exec sleep 600"],
        env=traced_env(), stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
        start_new_session=True,
    )  # fmt: skip
    assert proc.stdout is not None
    try:
        assert proc.stdout.readline() == b"ready\n"
        during = lab_objects() - before
        kinds = {o.split()[0] for o in during}
        assert kinds == {"netns", "link", "process"}, during  # the lab exists
        # Front and tracer at once (a front killed alone lets the tracer tear down).
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        assert wait_for(lambda: not (lab_objects() & during), 60), lab_objects() & during
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


# --- 9: EOF, EPIPE and SIGPIPE cross instances as on one machine -----------------

EPIPE_WRITER = (
    "import signal, sys\n"
    "signal.signal(signal.SIGPIPE, signal.SIG_IGN)\n"
    "try:\n"
    "    while True: sys.stdout.write('x' * 4096); sys.stdout.flush()\n"
    "except BrokenPipeError:\n"
    "    sys.stderr.write('EPIPE\\n'); sys.stdout = None; sys.exit(3)\n"
)


@pytest.mark.parametrize(
    "script",
    [
        "seq 100000 | head -1; echo ${PIPESTATUS[@]}",
        "yes | head -2; echo ${PIPESTATUS[@]}",
        "printf 'a\\nb\\nc\\n' | cat | wc -l; echo ${PIPESTATUS[@]}",
        f'python3 -c "{EPIPE_WRITER}" | head -c 10; echo; echo ${{PIPESTATUS[@]}}',
        # Processes sharing a pipe each take what a native read of theirs would.
        'printf \'a\\nb\\nc\\n\' | (read x; echo "got $x"; head -1; read y; echo "then $y")',
    ],
    ids=["seq-head", "yes-head", "eof", "epipe", "shared-read"],
)
def test_pipes_eof_epipe_sigpipe(script: str, mode: str) -> None:
    out, _, status = differential(["bash", "-c", script], mode)
    assert status == 0 and out


def test_seq_head_is_141_0(mode: str) -> None:
    out, _, _ = differential(["bash", "-c", "seq 100000 | head -1; echo ${PIPESTATUS[@]}"], mode)
    assert out == b"1\n141 0\n"


# --- 10: multiprocessing, 20 runs each ----------------------------------------------

POOL = textwrap.dedent("""
    import concurrent.futures, multiprocessing, sys
    def square(x):
        return x * x
    if __name__ == "__main__":
        how = sys.argv[1]
        if how == "executor":
            with concurrent.futures.ProcessPoolExecutor(2) as ex:
                print(sum(ex.map(square, range(100))))
        else:
            with multiprocessing.get_context(how).Pool(2) as pool:
                print(sum(pool.map(square, range(100))))
""")


@pytest.mark.slow
@pytest.mark.parametrize("how", ["spawn", "forkserver", "executor"])
def test_multiprocessing_twenty_runs(tmp_path: Path, how: str, mode: str) -> None:
    program = tmp_path / "pool.py"
    program.write_text(POOL)
    for _ in range(20):
        assert differential([sys.executable, str(program), how], mode) == (b"328350\n", b"", 0)


# --- 12: argv[0] is what the program passed ---------------------------------------


def test_argv0_is_what_the_program_passed(mode: str) -> None:
    script = (
        "cat /proc/self/cmdline; echo; (exec -a renamed cat /proc/self/cmdline); echo; "
        'sh -c "cat /proc/self/cmdline"; echo'
    )
    out, _, _ = differential(["bash", "-c", script], mode)
    assert out.split(b"\n")[:2] == [b"cat\0/proc/self/cmdline\0", b"renamed\0/proc/self/cmdline\0"]


# --- a non-main thread reads relayed stdin (a hang seen once) ------------------------

THREAD_READS = textwrap.dedent("""
    import sys, threading
    got = []
    reader = threading.Thread(target=lambda: got.append(sys.stdin.read()))
    reader.start()
    reader.join()  # the main thread waits in futex, not in read: the reader is another task
    print(len(got[0]), got[0].splitlines()[-1])
""")


def test_a_worker_thread_reads_stdin_while_the_main_thread_joins(mode: str) -> None:
    # The agent forwards a relayed input once a task of the program blocks reading
    # it; it looked at each process's main thread only, so this one waited forever.
    script = f"seq 1000 | {sys.executable} -c '{THREAD_READS}'"
    out, _, status = differential(["sh", "-c", script], mode)
    assert (out, status) == (b"3893 1000\n", 0)
