"""`dcp-oss migrate` and `dcp-oss drain` (issue 12) with real namespaced local instances.

A real `dcp-oss serve` with the local provider (each agent PID 1 of its own PID and
UTS namespaces, hostname = instance name), a pool of two instances, real CRIU; a
counter placed by a real `dcptrace --oss --record`.  The order reaches the source
agent in its heartbeat reply; the agents move the tree between them; the OSS
updates the record and the program's log.  Skipped with the reason when root or
CRIU is missing.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import dcptrace_argv, traced_env, wait_for
from tests.integration.checkpointing import in_order, local_pool, pool_agents, ready_instances
from tests.integration.test_dcptrace_oss import Lab, _cli, _env

pytestmark = [pytest.mark.usefixtures("has_ptrace"), pytest.mark.slow, pytest.mark.root]

# Counts until the file `stop` exists, each line "pid i instance"; `.host` says where
# it runs now; exits 7.  The program sees its home's hostname and pids (issue 11): the
# instance is read from its agent's command line (PID 1 of a namespaced instance, `...
# --hostname NAME`), the pid from /proc/self/stat (the instance's, as the OSS reports it).
COUNTER = r"""
import os, sys, time
flag = sys.argv[1]
i = 0
while not os.path.exists("stop"):
    cmd = open("/proc/1/cmdline", "rb").read().split(b"\0")
    where = cmd[cmd.index(b"--hostname") + 1].decode() if b"--hostname" in cmd else "home"
    print(int(open("/proc/self/stat").read().split()[0]), i, where, flush=True)
    with open(flag + ".host.tmp", "w") as f:
        f.write(where)
    os.rename(flag + ".host.tmp", flag + ".host")
    i += 1
    time.sleep(0.02)
sys.exit(7)
"""


@pytest.fixture
def lab(tmp_path: Path) -> Iterator[Lab]:
    """dcp-oss serve, the local provider, a pool p of two ready instances."""
    with local_pool(tmp_path, price=1, instances=2, program=COUNTER) as lab:
        try:
            yield lab
        finally:
            (lab.data / "stop").touch()


def _dcptrace(lab: Lab, *options: str) -> subprocess.Popen[bytes]:
    env = dict(traced_env(), DCP_TOKEN=lab.token)
    env.pop("DCP_OSS_FALLBACK", None)
    return subprocess.Popen(
        [*dcptrace_argv("--no-state", "--oss", lab.url, "--placement", "spread",
                        "--record", "run.json", *options),
         "--", "sh", "-c", f"{sys.executable} counter.py c; exit $?"],
        cwd=lab.data, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        stdin=subprocess.DEVNULL,
    )  # fmt: skip


def _dcp_oss(lab: Lab, *args: str, token: str | None = None) -> subprocess.CompletedProcess[str]:
    env = dict(_env(), DCP_TOKEN=token or lab.token)
    return subprocess.run(
        [sys.executable, "-m", "oss", *args, "--url", lab.url],
        capture_output=True, text=True, env=env, timeout=200,
    )  # fmt: skip


def _placed(lab: Lab) -> tuple[str, dict[str, Any]]:
    """The running program and its placed counter's row, once reported."""
    found: list[Any] = []

    def up() -> bool:
        progs = [p for p in lab.get("/v1/programs") if p["state"] == "running"]
        if not progs:
            return False
        rows = lab.get(f"/v1/programs/{progs[0]['id']}/processes")["processes"]
        rows = [r for r in rows if r["state"] == "running" and "counter.py" in " ".join(r["argv"])]
        found[:] = [progs[0]["id"], *rows[:1]]
        return len(found) == 2 and (lab.data / "c.host").exists()

    assert wait_for(up, 60), lab.get("/v1/programs")
    return found[0], found[1]


def _where(lab: Lab) -> str:
    try:
        return (lab.data / "c.host").read_text()
    except OSError:
        return ""


def _finish(lab: Lab, p: subprocess.Popen[bytes]) -> tuple[str, str]:
    (lab.data / "stop").touch()
    try:
        out, err = p.communicate(timeout=120)
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
    return out.decode(), err.decode()


def _counted(out: str) -> list[tuple[int, int, str]]:
    rows = [ln.split() for ln in out.splitlines()]
    return [(int(a), int(b), c) for a, b, c in rows]


def test_migrate_moves_a_running_counter_with_its_pid_output_record_and_status(lab: Lab) -> None:
    p = _dcptrace(lab)
    try:
        program, row = _placed(lab)
        source = row["instance"]
        (target,) = [n for n in ready_instances(lab) if n != source]
        assert _where(lab) == source
        # Another tenant cannot move it (not found: no sign it exists).
        other = _cli("account", "create", "--data", str(lab.data), "--allow-root", "other")
        res = _dcp_oss(lab, "migrate", program, "--to", target, token=other)
        assert res.returncode == 1 and res.stderr.count("\n") == 1, res.stderr
        assert "No such object" in res.stderr and _where(lab) == source
        res = _dcp_oss(lab, "migrate", program, "--to", target)
        assert res.returncode == 0, res.stderr
        assert res.stdout.startswith(f"pid {row['pid']}: {source} -> {target}, frozen "), res
        assert wait_for(lambda: _where(lab) == target, 30)
    finally:
        out, err = _finish(lab, p)
    assert p.returncode == 7, err
    assert "Traceback" not in err, err
    counted = _counted(out)
    assert in_order([i for _pid, i, _h in counted])  # no gap, no repeat
    assert {pid for pid, _i, _h in counted} == {row["pid"]}  # the same pid
    hosts = [h for _pid, _i, h in counted]
    cut = hosts.index(target)
    assert set(hosts[:cut]) == {source} and set(hosts[cut:]) == {target}, hosts
    # The record: the counter's row on the source ended `migrated`, its row on the target
    # exited 7; the log says when it moved and the freeze.
    record = json.loads((lab.data / "run.json").read_text())
    mine = [r for r in record["placed_processes"] if r["pid"] == row["pid"]]
    assert [r["instance"] for r in mine] == [source, target], mine
    moved = mine[0]["migrated"]
    assert moved["from"] == source and moved["to"] == target, moved
    assert moved["freeze_ms"] > 0 and moved["at"] > 0, moved
    assert "migrated" not in mine[1] and mine[1]["exit_status"] == 7, mine
    logs = subprocess.run(
        [sys.executable, "-m", "oss", "logs", program, "--stream", "event", "--url", lab.url],
        capture_output=True, text=True, env=dict(_env(), DCP_TOKEN=lab.token), timeout=60,
    )  # fmt: skip
    lines = [ln for ln in logs.stdout.splitlines() if " migrated from " in ln]
    assert len(lines) == 1, logs.stdout
    assert f" {target} {row['pid']} event migrated from {source} to {target} (freeze " in lines[0]


def test_a_migrate_nowhere_is_one_line_and_the_program_runs_on_where_it_was(lab: Lab) -> None:
    # Without storage: the target's own check is asked (with it, the target's mount
    # fails first, also before anything is frozen).
    p = _dcptrace(lab, "--no-share-cwd")
    try:
        program, row = _placed(lab)
        source = row["instance"]
        (target,) = [n for n in ready_instances(lab) if n != source]
        res = _dcp_oss(lab, "migrate", program, "--to", "nowhere")
        assert res.returncode == 1, res
        assert res.stderr == "dcp-oss migrate: No such object: instance nowhere\n"
        res = _dcp_oss(lab, "migrate", program, "--pid", "1", "--to", target)
        assert res.returncode == 1 and "no running process 1" in res.stderr, res.stderr
        # A target that does not answer (its agent stopped): the source checks it first,
        # so nothing is frozen; one line; the counter runs on at the source.
        agents = _agent_of(target)
        for pid in agents:
            os.kill(pid, signal.SIGSTOP)
        try:
            res = _dcp_oss(lab, "migrate", program, "--to", target)
        finally:
            for pid in agents:
                os.kill(pid, signal.SIGCONT)
        assert res.returncode == 1, res
        assert res.stderr.count("\n") == 1 and res.stderr.startswith(
            "dcp-oss migrate: Migration failed (the program runs on where it was):"
            f" pid {row['pid']} on {source}: "
        ), res.stderr
        before = len((lab.data / "c.host").read_text())  # still written at the source
        assert _where(lab) == source and before
    finally:
        out, err = _finish(lab, p)
    assert p.returncode == 7, err
    counted = _counted(out)
    assert in_order([i for _pid, i, _h in counted])
    assert {h for _pid, _i, h in counted} == {source}


def _storage_mounted(name: str) -> bool:
    """Does instance `name` (its agent's mount namespace) have a program's dcpfs mounted?"""
    for pid in _agent_of(name):
        with contextlib.suppress(OSError):
            for line in Path(f"/proc/{pid}/mountinfo").read_text().splitlines():
                fields = line.split()
                if fields[4].startswith("/run/dcp/fs/") and "fuse" in fields:
                    return True
    return False


def _agent_of(name: str) -> list[int]:
    """The processes of instance `name`'s agent (its wrapper, itself, its zygote)."""
    found = [
        pid
        for pid in pool_agents()
        if f"--instance\0{name}\0".encode() in Path(f"/proc/{pid}/cmdline").read_bytes()
    ]
    assert found, f"no agent for {name}"
    return found


def test_drain_moves_the_program_off_and_releases_the_instance(lab: Lab) -> None:
    p = _dcptrace(lab)
    try:
        program, row = _placed(lab)
        source = row["instance"]
        (target,) = [n for n in ready_instances(lab) if n != source]
        res = _dcp_oss(lab, "drain", source)  # a tenant's token: admin only
        assert res.returncode == 1 and "may not perform" in res.stderr, res.stderr
        res = _dcp_oss(lab, "drain", source, token=lab.admin)
        assert res.returncode == 0, res.stderr
        assert len(res.stdout.splitlines()) == 2, res.stdout
        assert res.stdout.splitlines()[1].startswith(
            f"{source}: released: moved 1 session(s), 0 refused, in "
        ), res.stdout
        assert res.stdout.startswith(f"{source}: pid {row['pid']} -> {target}, frozen ")
        assert wait_for(lambda: _where(lab) == target, 30)
        states = {r["name"]: r["state"] for r in lab.get("/v1/instances", lab.admin)}
        assert states[source] == "destroyed", states
        # The program's storage (its working directory) is still mounted on the target:
        # the source's unmount at its release did not take it from there (local instances
        # share this machine's disk; removing a mountpoint detaches it everywhere).
        assert _storage_mounted(target), target
    finally:
        out, err = _finish(lab, p)
    assert p.returncode == 7, err
    # Released with the instance: the storage it mounted is not asked for at the end.
    assert "not unmounted" not in err, err
    counted = _counted(out)
    assert in_order([i for _pid, i, _h in counted])
    assert {pid for pid, _i, _h in counted} == {row["pid"]}


# Writes out.txt through one descriptor: half of it, then (told so by `half`, whose
# content is where it runs) waits for `go`, then the rest; `end` says where it ended.
# The working directory is the program's storage (the default under --oss): out.txt
# is staged on the instance until its close, so the move publishes it first.
WRITER = r"""
import os, sys, time
def where():
    cmd = open("/proc/1/cmdline", "rb").read().split(b"\0")
    return cmd[cmd.index(b"--hostname") + 1].decode() if b"--hostname" in cmd else "home"
with open("out.txt", "w") as f:
    for i in range(20000):
        f.write(f"{i} {i * i}\n")
        if i == 9999:
            f.flush()
            with open("half.tmp", "w") as h:
                h.write(where())
            os.rename("half.tmp", "half")
            while not os.path.exists("go"):
                time.sleep(0.02)
with open("end", "w") as e:
    e.write(where())
sys.exit(3)
"""


def test_a_process_writing_a_file_in_the_shared_cwd_moves_and_the_file_is_whole(
    lab: Lab, tmp_path: Path
) -> None:
    native = tmp_path / "native"
    native.mkdir()
    (native / "go").touch()
    (native / "writer.py").write_text(WRITER)
    ran = subprocess.run([sys.executable, "writer.py"], cwd=native, timeout=60)
    assert ran.returncode == 3
    (lab.data / "writer.py").write_text(WRITER)
    env = dict(traced_env(), DCP_TOKEN=lab.token)
    env.pop("DCP_OSS_FALLBACK", None)
    p = subprocess.Popen(
        [*dcptrace_argv("--no-state", "--oss", lab.url, "--placement", "spread",
                        "--record", "run.json", "--share-cwd"),
         "--", "sh", "-c", f"{sys.executable} writer.py; exit $?"],
        cwd=lab.data, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        stdin=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        assert wait_for(lambda: (lab.data / "half").exists(), 90), p.poll()
        source = (lab.data / "half").read_text()
        (target,) = [n for n in ready_instances(lab) if n != source]
        (program,) = [q["id"] for q in lab.get("/v1/programs") if q["state"] == "running"]
        # Half of out.txt is written and its descriptor open on the source: not on the
        # volume yet (staged there until its close).
        assert not (lab.data / "out.txt").exists() or (lab.data / "out.txt").stat().st_size == 0
        res = _dcp_oss(lab, "migrate", program, "--to", target)
        assert res.returncode == 0, res.stderr
        (lab.data / "go").touch()
        out, err = p.communicate(timeout=120)
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
    assert p.returncode == 3, err
    assert (lab.data / "end").read_text() == target
    assert (lab.data / "out.txt").read_bytes() == (native / "out.txt").read_bytes()
