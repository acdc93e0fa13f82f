"""--trace, -o, --summary and --record show what the program did."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from tests.conftest import traced

pytestmark = pytest.mark.usefixtures("has_ptrace")


def test_trace_lines_name_calls_arguments_and_errors(tmp_path: Path) -> None:
    target = tmp_path / "hello.txt"
    target.write_text("hi\n")
    missing = tmp_path / "missing"
    log = tmp_path / "trace.txt"
    res = traced(["sh", "-c", f"cat {target}; cat {missing}; exit 0"], "--trace", "-o", str(log))
    err = log.read_text()
    assert res.returncode == 0
    assert res.stdout == b"hi\n"
    assert re.search(rf'^\d+ openat\(AT_FDCWD, "{target}", O_RDONLY\) = \d+$', err, re.M), err
    assert re.search(rf'openat\(AT_FDCWD, "{missing}", O_RDONLY\) = -1 ENOENT', err)
    assert re.search(r'^\d+ write\(1, "hi\\n", 3\) = 3$', err, re.M)
    assert re.search(r'^\d+ execve\("/usr/bin/cat", \["cat", ', err, re.M) or re.search(
        r'^\d+ execve\("/bin/cat", \["cat", ', err, re.M
    )
    # Lines of different processes carry different pids.
    assert len({line.split()[0] for line in err.splitlines() if line[:1].isdigit()}) >= 3


def test_trace_to_file_keeps_stderr_for_the_program(tmp_path: Path) -> None:
    out = tmp_path / "trace.txt"
    res = traced(["sh", "-c", "echo oops >&2"], "--trace", "-o", str(out))
    assert res.stderr == b"oops\n"
    text = out.read_text()
    assert re.search(r'^\d+ write\([12], "oops\\n", 5\) = 5$', text, re.M), text


def test_summary_counts_by_syscall_category_and_service() -> None:
    res = traced(["sh", "-c", "for i in 1 2 3; do /bin/true; done; ls /nonexistent-dir"],
                 "--summary")  # fmt: skip
    err = res.stderr.decode()
    assert res.returncode == 2
    m = re.search(r"^\s*[\d.]+\s+[\d.]+\s+\d+\s+(\d+)\s+\S*\s+execve$", err, re.M)
    assert m and int(m.group(1)) == 5, err  # sh, three true, ls
    assert "by category:" in err and "by OSS service:" in err
    for name in ("storage", "process", "memory", "compute", "local"):
        assert re.search(rf"^\s+{name}\s+\d+ calls", err, re.M), name
    total = re.search(r"^\s*100\.00\s+[\d.]+\s+(\d+)\s+(\d+)\s+total$", err, re.M)
    assert total and int(total.group(2)) >= 1  # ls's ENOENT at least


def test_record_json(tmp_path: Path) -> None:
    rec = tmp_path / "run.json"
    res = traced(["bash", "-c", "sh -c 'exit 3'; (kill -TERM $BASHPID); exit 4"],
                 "--record", str(rec))  # fmt: skip
    assert res.returncode == 4
    data = json.loads(rec.read_text())
    assert data["argv"][:2] == ["bash", "-c"]
    assert data["exit_status"] == 4 and data["signal"] is None
    assert data["wall_seconds"] > 0
    procs = {p["pid"]: p for p in data["processes"]}
    root = next(p for p in procs.values() if p["ppid"] == 0)
    assert root["exit_status"] == 4 and root["argv"][0] == "bash"
    kids = [p for p in procs.values() if p["ppid"] == root["pid"]]
    ends = sorted(str((p["exit_status"], p["signal"])) for p in kids)
    assert ends == [str((3, None)), str((None, "SIGTERM"))]
    assert all(p["instance"] == "local" for p in procs.values())
    sc = data["syscalls"]
    assert sc["by_name"]["execve"] == 2
    assert sum(sc["by_category"].values()) == sc["total"] == sum(sc["by_name"].values())
    assert set(sc["by_category"]) <= {"memory", "storage", "process", "signal", "network",
                                      "ipc", "time", "other"}  # fmt: skip


def test_record_of_a_signal_death(tmp_path: Path) -> None:
    rec = tmp_path / "run.json"
    res = traced(["sh", "-c", "kill -INT $$"], "--record", str(rec))
    assert res.returncode == -2
    data = json.loads(rec.read_text())
    assert data["exit_status"] is None and data["signal"] == "SIGINT"
