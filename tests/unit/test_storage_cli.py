"""`dcp-oss storage ls`: what it shows of a recorded storage state (no server needed)."""

from __future__ import annotations

import json
from pathlib import Path

from click.testing import CliRunner

from oss.cli import main


def _state(root: Path) -> None:
    state = root / "storage" / "run1"
    state.mkdir(parents=True)
    (state / "volumes.json").write_text(json.dumps({"v0": "/work/data"}))
    report = {
        "files": {"/v0/a.txt": {"size": 5, "reads": 4, "writes": 0, "tier": "memory"}},
        "moves": [{"time": 1.0, "path": "/v0/a.txt", "from": "net", "to": "memory",
                   "reason": "promoted: read 3 times"}],
    }  # fmt: skip
    (state / "report-node0.json").write_text(json.dumps(report))
    billing = {"gib_seconds": {"net": 0.5}, "prices": {"net": 2}, "micros": {"net": 1.0}}
    (state / "billing.json").write_text(json.dumps(billing))


def test_ls_shows_tier_size_heat_moves_and_billing(tmp_path: Path) -> None:
    _state(tmp_path)
    runner = CliRunner()
    names = runner.invoke(main, ["storage", "ls", "--data", str(tmp_path)])
    assert names.exit_code == 0 and names.output.split() == ["run1"]
    out = runner.invoke(main, ["storage", "ls", "run1", "--data", str(tmp_path)])
    assert out.exit_code == 0, out.output
    lines = out.output.splitlines()
    assert lines[1].split() == ["node0", "memory", "5", "4", "0", "/work/data/a.txt"]
    assert "node0: /work/data/a.txt net -> memory: promoted: read 3 times" in out.output
    assert "net: 0.500000 GiB-s x 2 micros = 1.000 micros" in out.output


def test_ls_of_an_unknown_program_is_one_line(tmp_path: Path) -> None:
    _state(tmp_path)
    out = CliRunner().invoke(main, ["storage", "ls", "nosuch", "--data", str(tmp_path)])
    assert out.exit_code == 1
    assert len(out.output.strip().splitlines()) == 1 and "nosuch" in out.output
