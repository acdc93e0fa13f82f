"""Every program an agent starts runs under its instance tracer (vmagent.trace).

Real agents on loopback (`trace_agent.py`: the agent with a session-hooks
observer that prints the tracer's records), real deputies, real ptrace.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import secret_file, wait_for
from vmagent.exec import tickets
from vmagent.exec.remote import (
    TicketDrop,
    deputy_argv,
    deputy_command,
    interpreter,
    remote_exec,
    ticket_for_self,
)
from vmagent.trace.pidspace import base_for

HELPER = Path(__file__).with_name("trace_agent.py")
DROP = TicketDrop()


class TracedAgent:
    """trace_agent.py running as a child; its records collected by a reader thread."""

    def __init__(self, name: str, prefix: tuple[str, ...] = (), *extra: str) -> None:
        self.name = name
        self.token = os.urandom(18).hex()
        token_file = secret_file(self.token)
        self.proc = subprocess.Popen(
            [*prefix, sys.executable, str(HELPER), name, token_file, *extra],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline().decode()
        assert line.startswith("listening "), line + self.stop()
        self.address = line.split()[1]
        _, agent, _, zygote = self.proc.stdout.readline().split()
        self.pid, self.zygote = int(agent), int(zygote)  # the agent may run under a prefix
        os.unlink(token_file)
        self.records: list[dict[str, Any]] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.records.append(json.loads(line))

    def deputy(self, *argv: str) -> list[str]:
        path = os.fsencode(argv[0])
        args = tuple(os.fsencode(a) for a in argv)
        ticket = ticket_for_self(self.token, self.name, path, args)
        return deputy_command(DROP, self.address, self.name, ticket, path, args)

    def run(self, *argv: str) -> subprocess.CompletedProcess[bytes]:
        return subprocess.run(self.deputy(*argv), capture_output=True, timeout=120)

    def session(self, marker: str) -> list[dict[str, Any]]:
        """The records of the session whose program's argv holds `marker`."""
        pids = {
            r["session_pid"]
            for r in self.records
            if r.get("kind") == "exec" and any(marker in a for a in r["argv"])
        }
        return [r for r in self.records if r["session_pid"] in pids]

    def stop(self) -> str:
        """Stop the agent; its stderr."""
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        assert self.proc.stderr is not None
        return self.proc.stderr.read().decode(errors="replace")


@pytest.fixture(scope="module")
def agent() -> Iterator[TracedAgent]:
    a = TracedAgent("res0")
    yield a
    a.stop()
    DROP.close()


def status_field(text: str, key: str) -> str:
    for line in text.splitlines():
        if line.startswith(key + ":"):
            return line.split(":", 1)[1].strip()
    raise AssertionError(f"no {key} in {text!r}")


def ppid_of(pid: int) -> int:
    return int(status_field(Path(f"/proc/{pid}/status").read_text(), "PPid"))


def test_a_placed_program_runs_under_a_tracer_of_its_instance(
    agent: TracedAgent, tmp_path: Path
) -> None:
    out = tmp_path / "status"
    # The shell reads its own status with a builtin: $$ is its program pid (its
    # deputy's, issue 11), which /proc on the instance does not know.
    script = (
        f"cat /proc/self/status > {out}; "
        f'while read k v; do [ "$k" = TracerPid: ] && echo "$k $v"; done < /proc/self/status'
        f" > {out}.sh; true"
    )
    res = agent.run("/bin/sh", "-c", script)
    assert res.returncode == 0, res.stderr
    status = out.read_text()
    tracer = int(status_field(status, "TracerPid"))
    assert tracer != 0
    assert status_field(status, "Seccomp") == "2"  # the interception filter is installed
    assert status_field((tmp_path / "status.sh").read_text(), "TracerPid") == str(tracer)
    # The tracer is the instance's: a child of its agent's zygote (it has ended
    # with the session, so the zygote's record of the seize tells whose it is).
    seized = [r for r in agent.session("cat /proc/self/status") if r["op"] == "seized"]
    assert [int(r["tracer"]) for r in seized] == [tracer]
    assert ppid_of(agent.zygote) == agent.pid


def test_nested_execs_arrive_as_records_and_output_equals_native(agent: TracedAgent) -> None:
    script = "/bin/true; /bin/echo nested-marker; echo err >&2; exit 3"
    native = subprocess.run(["/bin/sh", "-c", script], capture_output=True)
    res = agent.run("/bin/sh", "-c", script)
    assert (res.returncode, res.stdout, res.stderr) == (
        native.returncode,
        native.stdout,
        native.stderr,
    )
    assert wait_for(lambda: any(r["op"] == "done" for r in agent.session("nested-marker")), 30)
    records = agent.session("nested-marker")
    execs = [r["argv"] for r in records if r.get("kind") == "exec"]
    assert execs == [["/bin/sh", "-c", script], ["/bin/true"], ["/bin/echo", "nested-marker"]]
    assert records[0]["op"] == "seized"
    root = records[1]
    assert (root["op"], root["kind"], root["ppid"]) == ("event", "spawn", "0")
    children = {r["pid"] for r in records if r.get("kind") == "spawn" and r["ppid"] == root["pid"]}
    assert len(children) == 2
    exits = {r["pid"]: r["status"] for r in records if r.get("kind") == "exit"}
    assert exits == {root["pid"]: "3", **{pid: "0" for pid in children}}
    usage = {r["pid"]: r for r in records if r["op"] == "usage"}
    assert usage.keys() == exits.keys()
    for row in usage.values():
        assert row["final"] == "1"
        assert int(row["maxrss_kb"]) > 0
        assert {"cpu_us", "rchar", "wchar", "rbytes", "wbytes", "sys"} <= row.keys()
    assert int(usage[root["pid"]]["wchar"]) >= len("err\n")
    assert "compute=" in usage[root["pid"]]["sys"]  # its two execve calls were intercepted
    assert records[-1]["op"] == "done"


NOBODY = 65534


def test_a_set_user_id_program_keeps_its_privilege_as_natively(agent: TracedAgent) -> None:
    # The filter goes in before the child takes the user's ids, without
    # no_new_privs: a set-user-ID program run by nobody gains root, as it would
    # natively (its tracer, root, may trace it so).
    if os.geteuid() != 0:
        pytest.skip("needs root (a set-user-ID root program, and a run as nobody)")
    where = Path(tempfile.mkdtemp(prefix="dcp-suid-"))
    try:
        where.chmod(0o755)
        prog = where / "id"
        shutil.copy("/usr/bin/id", prog)
        prog.chmod(0o4755)
        as_nobody = ["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups"]
        native = subprocess.run([*as_nobody, str(prog), "-u"], capture_output=True, cwd=where)
        if native.stdout != b"0\n":
            pytest.skip(f"{where} does not honour set-user-ID here: {native.stdout!r}")
        path, argv = os.fsencode(prog), (os.fsencode(prog), b"-u")
        bound = remote_exec(path, argv)
        ticket = tickets.mint(
            agent.token,
            agent.name,
            uid=NOBODY,
            gid=NOBODY,
            digest=tickets.exec_digest(bound[0], bound[1:]),
        )
        ticket_file = DROP.put(ticket, NOBODY, NOBODY)
        args = deputy_argv(agent.address, agent.name, ticket_file, path, argv)
        cmd = [*as_nobody, os.fsdecode(interpreter()), *map(os.fsdecode, args[1:])]
        remote = subprocess.run(cmd, capture_output=True, cwd=where, timeout=120)
        assert (remote.returncode, remote.stdout) == (0, native.stdout), remote.stderr
        assert [r for r in agent.session(str(prog)) if r.get("kind") == "exec"]  # traced
    finally:
        shutil.rmtree(where)


def test_kill_9_of_the_tracer_kills_the_program_tree(agent: TracedAgent, tmp_path: Path) -> None:
    pids = tmp_path / "pids"
    # $$ and $! are the program's pids (issue 11): the shell's real pid is in
    # /proc/self/stat, the sleeper's is $! less its instance's base.
    script = f"sleep 600 & read me _ < /proc/self/stat; echo $me $! > {pids}; wait"
    proc = subprocess.Popen(agent.deputy("/bin/sh", "-c", script), stderr=subprocess.PIPE)
    assert wait_for(lambda: pids.exists() and pids.read_text().endswith("\n"), 60)
    shell, sleeper = (int(p) for p in pids.read_text().split())
    sleeper -= base_for(agent.name)
    tracer = int(status_field(Path(f"/proc/{shell}/status").read_text(), "TracerPid"))
    assert tracer and ppid_of(tracer) == agent.zygote
    os.kill(tracer, signal.SIGKILL)
    # The deputy's status for a remote SIGKILL is 255 (its own, older, quirk:
    # it cannot re-raise SIGKILL through a handler); what matters: it ended.
    assert proc.wait(timeout=60) != 0
    assert wait_for(lambda: not Path(f"/proc/{shell}").exists(), 30), "the program lives"
    assert wait_for(lambda: not Path(f"/proc/{sleeper}").exists(), 30), "the grandchild lives"


def test_a_killed_zygote_refuses_one_session_then_is_replaced(tmp_path: Path) -> None:
    a = TracedAgent("res1")
    try:
        os.kill(a.zygote, signal.SIGKILL)
        assert wait_for(lambda: not Path(f"/proc/{a.zygote}").exists(), 30)
        ran = tmp_path / "ran"
        refused = a.run("/bin/sh", "-c", f"touch {ran}")
        assert refused.returncode == 255
        lines = refused.stderr.decode().splitlines()
        assert len(lines) == 1 and "instance tracer unavailable" in lines[0], lines
        assert not ran.exists()  # nothing ran untraced
        out = tmp_path / "status"
        served = a.run("/bin/sh", "-c", f"cat /proc/self/status > {out}")
        assert served.returncode == 0, served.stderr
        tracer = int(status_field(out.read_text(), "TracerPid"))
        assert tracer != 0
        seized = [r for r in a.session(str(out)) if r["op"] == "seized"]
        assert [int(r["tracer"]) for r in seized] == [tracer]
    finally:
        log = a.stop()
    assert "zygote" in log  # the agent said why it replaced its tracer


def test_a_stopped_zygote_times_out_the_session_then_the_next_is_served(
    tmp_path: Path,
) -> None:
    a = TracedAgent("res3", (), "1.0")  # trace timeout 1 s
    try:
        os.kill(a.zygote, signal.SIGSTOP)
        ran = tmp_path / "ran"
        try:
            res = a.run("/bin/sh", "-c", f"touch {ran}")
        finally:
            os.kill(a.zygote, signal.SIGCONT)
        assert res.returncode == 125
        lines = res.stderr.decode().splitlines()
        assert len(lines) == 1 and "the instance tracer did not answer" in lines[0], lines
        assert not ran.exists()
        # The stale request reaches a tracer once the zygote runs again (its pidfd
        # says the program is gone: it seizes nothing); the next session is served.
        out = tmp_path / "status"
        served = a.run("/bin/sh", "-c", f"cat /proc/self/status > {out}")
        assert served.returncode == 0, served.stderr
        assert int(status_field(out.read_text(), "TracerPid")) != 0
        assert not ran.exists()
    finally:
        a.stop()


@pytest.mark.skipif(shutil.which("strace") is None, reason="needs strace to hold the program")
def test_a_refused_seize_is_one_clear_line_and_the_program_never_runs(tmp_path: Path) -> None:
    # Under `strace -f` every process the agent forks is already traced, so its
    # instance tracer's PTRACE_SEIZE fails (a process has one tracer).
    a = TracedAgent("res2", ("strace", "-f", "-qq", "-o", os.devnull))
    try:
        ran = tmp_path / "ran"
        res = a.run("/bin/sh", "-c", f"touch {ran}")
        assert res.returncode == 125
        lines = res.stderr.decode().splitlines()
        assert len(lines) == 1, lines
        assert "cannot trace /bin/sh on res2: Operation not permitted" in lines[0]
        assert not ran.exists()
    finally:
        a.stop()


@pytest.mark.root
@pytest.mark.netns
def test_a_namespaced_instance_traces_its_programs() -> None:
    # The agent is pid 1 of its PID namespace there: its zygote must not take
    # that for its parent's death.
    if os.geteuid() != 0:
        pytest.skip("namespaced instances need root")
    from vmagent.cluster.local import LocalCluster

    with LocalCluster(1, isolate=True) as cluster:
        inst = cluster.instances[0]
        path, argv = b"/bin/sh", (b"/bin/sh", b"-c", b"cat /proc/self/status; hostname")
        ticket = ticket_for_self(inst.token, inst.name, path, argv)
        cmd = deputy_command(DROP, inst.address, inst.name, ticket, path, argv)
        res = subprocess.run(cmd, capture_output=True, timeout=120)
        cluster.remove_logs()
    assert res.returncode == 0, res.stderr
    text = res.stdout.decode()
    assert int(status_field(text, "TracerPid")) != 0
    assert status_field(text, "Seccomp") == "2"
    assert text.splitlines()[-1] == inst.name
