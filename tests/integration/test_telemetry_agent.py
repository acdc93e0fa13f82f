"""Issue 10 (chunks C, D) end to end: what placed programs do reaches the OSS.

A real `dcp-oss serve`, two real agents registered with it and real `dcptrace --oss`:
the placed processes' output lines and lifecycle events land in the program's log
with instance and pid (`dcp-oss logs`), their measured usage in the processes
record and the metrics, while the terminal gets exactly the bytes a native run
writes.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from test_dcptrace_oss import Lab, dcptrace, newest_program, start_lab

from tests.conftest import REPO, dcptrace_argv, traced_env, wait_for

pytestmark = [pytest.mark.usefixtures("has_ptrace"), pytest.mark.slow]

EMIT = """#!/bin/sh
printf 'alpha\\nbeta\\n'
echo "warning: $1" >&2
printf 'gamma'
exit 4
"""


NET_RATE = 1_000_000  # micros per GiB of network traffic, in this lab
STORAGE_RATE = 1 << 30  # micros per GiB-second of storage, in this lab


@pytest.fixture(scope="module")
def tlab(tmp_path_factory: pytest.TempPathFactory) -> Any:
    """Two loopback agents registered with a loopback dcp-oss serve."""
    lab = Lab(tmp_path_factory.mktemp("tel"))
    try:
        start_lab(
            lab,
            "127.0.0.1",
            {n: ("127.0.0.1:0", "") for n in ("n0", "n1")},
            ("--net-rate", str(NET_RATE), "--storage-rate", str(STORAGE_RATE)),
        )
        (lab.data / "emit.sh").write_text(EMIT)
        (lab.data / "emit.sh").chmod(0o755)
        yield lab
    finally:
        lab.stop()


def logs(lab: Lab, program: str, *args: str, timeout: float = 60) -> list[list[str]]:
    """`dcp-oss logs PROGRAM ARGS` split into (time, instance, pid, stream, text)."""
    res = subprocess.run(
        [sys.executable, "-m", "oss", "logs", program, "--url", lab.url, *args],
        capture_output=True, timeout=timeout,
        env=dict(os.environ, PYTHONPATH=str(REPO), DCP_TOKEN=lab.token),
    )  # fmt: skip
    assert res.returncode == 0, res.stderr.decode()
    return [ln.split(" ", 4) for ln in res.stdout.decode().splitlines()]


def leaves(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The placed processes whose output is their own: a process placed from an
    instance has its deputy in a session there, which relays that output (and a
    placed process that placed its exec again stays behind as that deputy)."""
    by_key = {f"{p['instance']}:{p['pid']}": p for p in rows}
    relaying = {  # sessions a process placed from holds the deputy of
        (by_key[p["parent"]]["instance"], by_key[p["parent"]]["session"])
        for p in rows
        if p["parent"] in by_key
    }
    return [p for p in rows if p["parent"] and (p["instance"], p["session"]) not in relaying]


def settled(lab: Lab, program: str, n: int) -> dict[str, Any]:
    """The program's processes once `n` placed ones run its code (`leaves`) and every
    process has its final figures."""
    got: dict[str, Any] = {}

    def done() -> bool:
        got.update(lab.get(f"/v1/programs/{program}/processes?final_wait=1"))
        return len(leaves(got["processes"])) >= n and not got["incomplete"]

    assert wait_for(done, 30), got
    got["leaves"] = leaves(got["processes"])
    assert len(got["leaves"]) == n, got
    return got


def test_placed_output_is_logged_with_instance_and_pid_and_the_terminal_unchanged(
    tlab: Lab,
) -> None:
    script = './emit.sh one; echo "status $?"; ./emit.sh two; echo "status $?"'
    native = subprocess.run(["sh", "-c", script], cwd=tlab.data, capture_output=True)
    res = dcptrace(tlab, tlab.url, "sh", "-c", script, token=tlab.token, placement="spread")
    assert (res.returncode, res.stdout, res.stderr) == (0, native.stdout, native.stderr)
    prog = newest_program(tlab)
    placed = {(p["instance"], p["pid"]) for p in settled(tlab, prog["id"], 2)["leaves"]}
    assert {i for i, _ in placed} <= {"n0", "n1"} and len(placed) == 2
    got = logs(tlab, prog["id"])
    mine = [g for g in got if g[1] in ("n0", "n1")]
    # Per placed process: its exec, its lines (the unterminated one flushed at its end),
    # its exit, all with its instance and pid, in time order.
    for inst, pid in placed:
        of = [(st, t) for _, i, p, st, t in mine if (i, p) == (inst, str(pid))]
        assert [t for st, t in of if st == "stdout"] == ["alpha", "beta", "gamma"], of
        (warning,) = [t for st, t in of if st == "stderr"]
        events = [t for st, t in of if st == "event"]
        assert events[0].startswith("exec ") and "emit.sh" in events[0], of
        assert events[-1] == "exit 4", of
        assert f"{events[0].split()[-1]}" in warning  # the argument it was run with
    stamps = [g[0] for g in got]
    assert stamps == sorted(stamps)
    # --instance and --stream filter.
    only = logs(tlab, prog["id"], "--instance", "n1")
    assert only and {g[1] for g in only} == {"n1"}
    errs = logs(tlab, prog["id"], "--stream", "stderr")
    assert sorted(g[4] for g in errs) == ["warning: one", "warning: two"]


def test_follow_ends_with_the_program(tlab: Lab) -> None:
    script = "./emit.sh first; sleep 1.5; ./emit.sh last; true"
    env = traced_env()
    env["DCP_TOKEN"] = tlab.token
    before = {p["id"] for p in tlab.get("/v1/programs")}
    run = subprocess.Popen(
        [*dcptrace_argv("--no-state", "--oss", tlab.url, "--placement", "spread"),
         "--", "sh", "-c", script],
        cwd=tlab.data, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        stdin=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        found: list[str] = []

        def submitted() -> bool:
            found[:] = [p["id"] for p in tlab.get("/v1/programs") if p["id"] not in before]
            return bool(found)

        assert wait_for(submitted, 30)
        follower = subprocess.Popen(
            [sys.executable, "-m", "oss", "logs", found[0], "--url", tlab.url, "--follow"],
            env=dict(os.environ, PYTHONPATH=str(REPO), DCP_TOKEN=tlab.token),
            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        )  # fmt: skip
        try:
            out, err = follower.communicate(timeout=90)  # returns only if follow ended
        finally:
            if follower.poll() is None:
                follower.kill()
                follower.wait()
        assert run.wait(timeout=60) == 0
        assert follower.returncode == 0, err.decode()
        texts = [ln.split(" ", 4)[4] for ln in out.decode().splitlines()]
        assert texts.count("warning: first") == 1 and texts.count("warning: last") == 1, texts
    finally:
        if run.poll() is None:
            run.kill()
        run.wait()
        if run.stderr is not None:
            run.stderr.close()


def test_a_64_kib_line_is_logged_in_16_kib_pieces(tlab: Lab) -> None:
    line = "import sys; sys.stdout.write('x' * 65536 + '\\n')"
    res = dcptrace(tlab, tlab.url, "sh", "-c", f'python3 -c "{line}"', token=tlab.token)
    assert res.returncode == 0 and res.stdout == b"x" * 65536 + b"\n", res.stderr
    prog = newest_program(tlab)
    settled(tlab, prog["id"], 1)
    out = [g[4] for g in logs(tlab, prog["id"], "--stream", "stdout")]
    assert out == ["x" * 16384] * 4


def test_the_record_holds_the_placed_processes_usage(tlab: Lab) -> None:
    record = tlab.data / "run.json"
    res = dcptrace(
        tlab, tlab.url, "sh", "-c", "./emit.sh rec; true", token=tlab.token, record=str(record)
    )
    assert res.returncode == 0, res.stderr.decode()
    got = json.loads(record.read_text())
    (row,) = leaves(got["placed_processes"])
    # argv as the process ran it: the script through its #! interpreter once traced
    assert row["instance"] in ("n0", "n1") and row["argv"][-2:] == ["./emit.sh", "rec"]
    assert row["exit_status"] == 4 and row["signal"] is None
    assert got["incomplete"] == [] and row["instance"] in got["syscalls"]["by_instance"]


CPU_LOOP = """#!/usr/bin/env python3
import resource, time
t = time.process_time()
while time.process_time() - t < 2.5:
    pass
ru = resource.getrusage(resource.RUSAGE_SELF)
print(ru.ru_utime + ru.ru_stime)
"""


def test_a_placed_cpu_loop_is_measured_within_20_percent_of_its_rusage(tlab: Lab) -> None:
    (tlab.data / "spin.py").write_text(CPU_LOOP)
    (tlab.data / "spin.py").chmod(0o755)
    res = dcptrace(tlab, tlab.url, "sh", "-c", "./spin.py", token=tlab.token)
    assert res.returncode == 0, res.stderr.decode()
    own = float(res.stdout)
    prog = newest_program(tlab)
    got = settled(tlab, prog["id"], 1)
    (row,) = got["leaves"]
    assert abs(row["cpu_seconds"] - own) <= 0.2 * own, (row, own)
    metrics = tlab.get(f"/v1/programs/{prog['id']}/metrics")
    total = sum(p["cpu_seconds"] for p in got["processes"])  # with any deputy's share
    assert abs(metrics["cpu_seconds"] - total) < 1e-6
    assert (
        metrics["by_process"][f"{row['instance']}:{row['pid']}"]["cpu_seconds"]
        == (row["cpu_seconds"])
    )


SERVER = """#!/usr/bin/env python3
import os, socket, sys
srv = socket.create_server(("127.0.0.1", int(sys.argv[1])))
open(sys.argv[2], "w").close()  # listening
conn, _ = srv.accept()
got = 0
while data := conn.recv(1 << 16):
    got += len(data)
conn.sendall(b"k")
print(got, flush=True)
os._exit(0)  # the connection is still open at the exit: its tracer reads it
"""

CLIENT = """#!/usr/bin/env python3
import os, socket, sys, time
while not os.path.exists(sys.argv[2]):
    time.sleep(0.01)
c = socket.create_connection(("127.0.0.1", int(sys.argv[1])))
c.sendall(b"x" * (10 << 20))
c.shutdown(socket.SHUT_WR)
assert c.recv(1) == b"k"
os._exit(0)
"""


def test_10_mb_of_tcp_between_two_placed_processes_is_measured_and_billed(
    tlab: Lab,
) -> None:
    import socket

    for name, text in (("tcpsrv.py", SERVER), ("tcpcli.py", CLIENT)):
        (tlab.data / name).write_text(text)
        (tlab.data / name).chmod(0o755)
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    flag = tlab.data / f"listening.{port}"
    script = f"./tcpsrv.py {port} {flag} & ./tcpcli.py {port} {flag}; wait"
    res = dcptrace(tlab, tlab.url, "sh", "-c", script, token=tlab.token, placement="spread")
    assert res.returncode == 0 and res.stdout == b"%d\n" % (10 << 20), res.stderr.decode()
    prog = newest_program(tlab)
    rows = {
        next(a.rsplit("/", 1)[-1] for a in p["argv"] if a.endswith(".py")): p
        for p in settled(tlab, prog["id"], 2)["leaves"]
    }
    lo, hi = 10 << 20, int(10.5 * (1 << 20))
    assert lo <= rows["tcpsrv.py"]["net_rx_bytes"] <= hi, rows
    assert lo <= rows["tcpcli.py"]["net_tx_bytes"] <= hi, rows
    every = settled(tlab, prog["id"], 2)["processes"]
    measured = sum(p["net_rx_bytes"] + p["net_tx_bytes"] for p in every)
    metrics = tlab.get(f"/v1/programs/{prog['id']}/metrics")
    assert metrics["net_rx_bytes"] + metrics["net_tx_bytes"] == measured

    expected = measured * NET_RATE / (1 << 30)  # micros

    def billed() -> bool:  # the OSS meters each tick (0.5 s in this lab)
        recs = tlab.get(f"/v1/programs/{prog['id']}/billing")["records"]
        return abs(sum(r["net_micros"] for r in recs) - expected) < 1e-6 * expected

    assert wait_for(billed, 15), tlab.get(f"/v1/programs/{prog['id']}/billing")


def test_a_nested_placements_line_is_logged_once(tlab: Lab) -> None:
    """A placed `sh` whose child is placed again: the child's lines come from its own
    instance and, relayed through the placing session's pipes, from the first one."""
    script = "sh -c './emit.sh deep; true'; true"
    # Without the shared cwd, whose first execs placed from an instance run beside
    # their parent while the other instance mounts (test_storage_oss.py).
    res = dcptrace(tlab, tlab.url, "sh", "-c", script, token=tlab.token, placement="spread",
                   flags=("--no-share-cwd",))  # fmt: skip
    assert res.returncode == 0 and res.stdout == b"alpha\nbeta\ngamma", res.stderr.decode()
    prog = newest_program(tlab)
    done = settled(tlab, prog["id"], 1)
    nested = [p for p in done["processes"] if p["parent"] and not p["parent"].startswith("home:")]
    if not nested:
        pytest.skip(
            "the agents ran the child where its parent runs: no placement from an"
            " instance happened, so there is no relayed copy to drop"
        )
    (leaf,) = done["leaves"]  # emit.sh; the sessions above it relayed its output
    got = logs(tlab, prog["id"], "--stream", "stdout")
    assert [g[4] for g in got] == ["alpha", "beta", "gamma"], got
    assert {(g[1], g[2]) for g in got} == {(leaf["instance"], str(leaf["pid"]))}


def test_the_storage_a_placed_programs_view_holds_is_billed(tlab: Lab, tmp_path: Path) -> None:
    """The program declares no storage; its instance walks the directory it maps."""
    data = tmp_path / "data"
    data.mkdir()
    (data / "blob").write_bytes(os.urandom(4 << 20))
    (tlab.data / "hold.sh").write_text("#!/bin/sh\ncat /mnt/v/blob >/dev/null; sleep 2.5\n")
    (tlab.data / "hold.sh").chmod(0o755)
    res = dcptrace(
        tlab, tlab.url, "sh", "-c", "./hold.sh; true", token=tlab.token, map=f"/mnt/v={data}"
    )
    assert res.returncode == 0, res.stderr.decode()
    prog = newest_program(tlab)
    assert prog["storage_mb"] == 0
    recs = tlab.get(f"/v1/programs/{prog['id']}/billing")["records"]
    # Billed per record: MB held (4 MiB of data, rounded up) x seconds x rate / 1024.
    mb_second = STORAGE_RATE / 1024
    billed = [r["storage_micros"] / (mb_second * r["seconds"]) for r in recs if r["seconds"]]
    assert any(4 <= mb <= 5 for mb in billed), recs
