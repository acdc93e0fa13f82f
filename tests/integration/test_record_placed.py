"""Records and summaries show where each process ran and what it asked to run."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.conftest import traced

pytestmark = pytest.mark.usefixtures("has_ptrace")


def test_placed_processes_are_recorded_with_their_own_argv(tmp_path: Path) -> None:
    rec = tmp_path / "run.json"
    script = "for i in 1 2 3 4; do /bin/echo child $i & done; wait"
    res = traced(["bash", "-c", script], "--instances", "2", "--placement", "spread",
                 "--record", str(rec), timeout=120)  # fmt: skip
    assert res.returncode == 0, res.stderr
    assert sorted(res.stdout.decode().split("\n")[:-1]) == [f"child {i}" for i in range(1, 5)]
    procs = json.loads(rec.read_text())["processes"]
    echoes = [p for p in procs if p["argv"][:1] == ["/bin/echo"]]
    assert len(echoes) == 4, procs
    assert {p["instance"] for p in echoes} == {"node0", "node1"}
    assert not any("vmagent.exec.deputy" in " ".join(p["argv"]) for p in procs)


def test_one_instance_means_one_placed_instance(tmp_path: Path) -> None:
    rec = tmp_path / "run.json"
    res = traced(
        ["sh", "-c", "/bin/true"],
        "--instances",
        "1",
        "--placement",
        "spread",
        "--record",
        str(rec),
        timeout=120,
    )
    assert res.returncode == 0, res.stderr
    procs = json.loads(rec.read_text())["processes"]
    assert {p["instance"] for p in procs if p["argv"][:1] == ["/bin/true"]} == {"node0"}
