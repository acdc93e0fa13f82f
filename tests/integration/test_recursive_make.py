"""`dcptrace --instances 3 --placement spread -- make -j6` on a generated C project.

The compilers run on all three instances (the run record says where each
process ran), and the output and the binary built equal a native build's.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
from cproject import generate
from test_local_state import log_text, programs

from tests.conftest import dcptrace_argv, run, traced, traced_env, wait_for

pytestmark = pytest.mark.usefixtures("has_ptrace")


@pytest.fixture
def project(tmp_path: Path) -> Path:
    if shutil.which("make") is None or shutil.which("cc") is None:
        pytest.skip("needs make and cc")
    return generate(tmp_path / "proj")


def test_make_j6_spreads_its_compilers_and_builds_the_same_binary(project: Path) -> None:
    native = run(["make", "-j6"], cwd=project, timeout=300)
    assert native.returncode == 0, native.stderr
    want_binary = (project / "app").read_bytes()
    want_out = run([str(project / "app")]).stdout
    assert run(["make", "clean"], cwd=project).returncode == 0

    rec = project.parent / "r.json"
    res = traced(
        ["make", "-j6"], "--instances", "3", "--placement", "spread", "--record", str(rec),
        cwd=project, timeout=600,
    )  # fmt: skip
    assert res.returncode == 0, res.stderr
    # make -j6 prints in completion order: the same lines, maybe reordered.
    assert sorted(res.stdout.splitlines()) == sorted(native.stdout.splitlines())
    assert (project / "app").read_bytes() == want_binary
    assert run([str(project / "app")]).stdout == want_out

    procs = json.loads(rec.read_text())["processes"]
    compilers = [p for p in procs if Path(p["argv"][0]).name in ("cc", "gcc") if p["argv"]]
    assert len(compilers) == 14, [p["argv"] for p in compilers]  # 13 compiles + the link
    assert {p["instance"] for p in compilers} == {"node0", "node1", "node2"}, compilers


WRAPPER = """#!/bin/sh
read w < /proc/1/cmdline
host=${w##*--hostname}
echo "$host" >> "$HOSTS"
exec cc "$@"
"""


def test_a_placed_make_places_its_compilers_in_turn(project: Path) -> None:
    """make itself placed on an instance: its compilers are placed from there, same build.

    The compiler is a wrapper that notes, without an exec of its own (a shell
    builtin reads its instance's PID 1, the agent, whose argv ends `--hostname NAME`: the
    program's own hostname is the home's everywhere), the instance it runs on.
    """
    native = run(["make", "-j6"], cwd=project, timeout=300)
    assert native.returncode == 0, native.stderr
    want_binary = (project / "app").read_bytes()
    assert run(["make", "clean"], cwd=project).returncode == 0
    wrapper = project.parent / "ccwrap"
    wrapper.write_text(WRAPPER)
    wrapper.chmod(0o755)
    hosts = project.parent / "hosts"

    rec = project.parent / "r.json"
    res = traced(
        ["sh", "-c", f"HOSTS={hosts} make -j6 CC={wrapper}; true"], "--instances", "3",
        "--placement", "spread", "--record", str(rec), cwd=project, timeout=600,
    )  # fmt: skip
    assert res.returncode == 0, res.stderr
    want = native.stdout.replace(b"cc ", f"{wrapper} ".encode())
    assert sorted(res.stdout.splitlines()) == sorted(want.splitlines())
    assert (project / "app").read_bytes() == want_binary
    procs = json.loads(rec.read_text())["processes"]
    (make,) = [p for p in procs if p["argv"][:1] == ["make"]]
    assert make["instance"].startswith("node"), procs
    ran_on = hosts.read_text().split()
    assert len(ran_on) == 14, ran_on  # 13 compiles and the link
    assert set(ran_on) == {"node0", "node1", "node2"}, (make["instance"], ran_on)


def test_by_default_the_cost_model_keeps_short_compiles_home_and_says_why(
    project: Path, tmp_path: Path
) -> None:
    """`--placement auto` (the default): local instances share this machine's cores, so no
    compile is worth a placement.  Each decision is in the --trace run's log (with its
    reason); the first per shape and kind and a summary are in the run's log in the
    local OSS state, and the run times are kept there for the next run (0600)."""
    native = run(["make", "-j6"], cwd=project, timeout=300)
    assert native.returncode == 0, native.stderr
    want_binary = (project / "app").read_bytes()
    assert run(["make", "clean"], cwd=project).returncode == 0

    data = tmp_path / "state"
    rec = project.parent / "r.json"
    out = project.parent / "trace.txt"
    res = run(
        [*dcptrace_argv("--instances", "3", "--trace", "-o", str(out), "--record", str(rec)),
         "--", "make", "-j6"],
        cwd=project, env=traced_env({"DCP_DATA": str(data)}), timeout=600,
    )  # fmt: skip
    assert res.returncode == 0, res.stderr
    assert sorted(res.stdout.splitlines()) == sorted(native.stdout.splitlines())
    assert (project / "app").read_bytes() == want_binary
    procs = json.loads(rec.read_text())["processes"]
    compilers = [p for p in procs if p["argv"] and Path(p["argv"][0]).name in ("cc", "gcc")]
    # 13 compiles + the link (gcc's forked children carry its argv: distinct argvs count)
    assert len({tuple(p["argv"]) for p in compilers}) == 14, [p["argv"] for p in compilers]
    assert {p["instance"] for p in compilers} == {"local"}, compilers  # this machine
    err = res.stderr.decode()
    assert "'cc -O1 -c *.c -o *.o' never ran before: stays on home" in err, err[-3000:]

    progs: list[dict[str, Any]] = []

    def recorded() -> bool:
        progs[:] = programs(data) if (data / "local-account.token").exists() else []
        return bool(progs) and "execs decided (" in log_text(progs[0])

    assert wait_for(recorded, 30), progs
    text = log_text(progs[0])
    assert "placement on home: 'cc -O1 -c *.c -o *.o' never ran before" in text, text[-3000:]
    profiles = data / "placement-profiles.json"
    assert profiles.stat().st_mode & 0o777 == 0o600
    assert json.loads(profiles.read_text())["cc -O1 -c *.c -o *.o"][0] == 13  # runs
