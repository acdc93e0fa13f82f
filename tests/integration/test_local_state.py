"""Each dcptrace run is recorded by the embedded OSS, readable through dcp-oss's API."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import REPO, dcptrace_argv, run, traced_env, wait_for

pytestmark = pytest.mark.usefixtures("has_ptrace")


class Api:
    """A real `dcp-oss serve` over a data directory, on loopback."""

    def __init__(self, data: Path) -> None:
        env = dict(os.environ, PYTHONPATH=str(REPO))
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "oss", "serve", "--listen", "127.0.0.1:0", "--data", str(data)],
            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        )  # fmt: skip
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline().decode()
        assert "listening on " in line, line + self.proc.stderr.read().decode()  # type: ignore[union-attr]
        self.url = line.split("listening on ", 1)[1].strip()
        self.token = (data / "local-account.token").read_text().strip()

    def get(self, path: str) -> Any:
        req = urllib.request.Request(
            self.url + path, headers={"Authorization": f"Bearer {self.token}"}
        )
        with urllib.request.urlopen(req, timeout=10) as resp:
            return json.loads(resp.read())

    def close(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        self.proc.wait(timeout=20)


def record(data: Path, *argv: str, options: tuple[str, ...] = ()) -> int:
    res = run([*dcptrace_argv(*options), "--", *argv], env=traced_env({"DCP_DATA": str(data)}))
    return res.returncode


def programs(data: Path) -> list[dict[str, Any]]:
    api = Api(data)
    try:
        found = api.get("/v1/programs")
        items = found["programs"] if isinstance(found, dict) else found
        for p in items:
            p["_log"] = api.get(f"/v1/programs/{p['id']}/logs")
        return items
    finally:
        api.close()


def log_text(program: dict[str, Any]) -> str:
    raw = program["_log"]
    lines = raw["lines"] if isinstance(raw, dict) else raw
    return "\n".join(line["text"] for line in lines)


def test_a_run_is_recorded_with_its_processes_and_status(tmp_path: Path) -> None:
    data = tmp_path / "state"
    assert record(data, "sh", "-c", "ls / > /dev/null; exit 3") == 3
    # dcptrace returns when the program does; the tracer finishes recording right after.
    assert wait_for(lambda: (data / "local-account.token").exists(), 20)
    progs: list[dict[str, Any]] = []

    def ended() -> bool:
        progs[:] = programs(data)
        return bool(progs) and progs[0]["state"] != "running"

    assert wait_for(ended, 20), progs
    assert len(progs) == 1
    p = progs[0]
    assert p["argv"] == ["sh", "-c", "ls / > /dev/null; exit 3"]
    assert p["state"] == "failed" and p["exit_status"] == 3
    text = log_text(p)
    assert "exec sh -c" in text and "exec ls /" in text
    assert "ended: exit status 0" in text and "exited with status 3" in text


def test_no_state_records_nothing(tmp_path: Path) -> None:
    data = tmp_path / "state"
    assert record(data, "true", options=("--no-state",)) == 0
    assert not data.exists()


def test_signal_deaths_and_many_runs(tmp_path: Path) -> None:
    data = tmp_path / "state"
    assert record(data, "true", options=("--summary",)) == 0
    assert record(data, "sh", "-c", "kill -TERM $$", options=("--summary",)) == -signal.SIGTERM
    progs = sorted(programs(data), key=lambda p: p["argv"][0])
    assert [p["argv"][0] for p in progs] == ["sh", "true"]
    assert progs[0]["signal"] == signal.SIGTERM and progs[0]["state"] == "failed"
    assert progs[1]["exit_status"] == 0 and progs[1]["state"] == "finished"
