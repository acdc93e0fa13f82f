"""A requested output that cannot be written is one clear line and exit 125, never a fake.

The attack (or accident): `dcptrace --record FILE`, `--trace -o FILE` or
`--summary -o FILE` to a full disk or /dev/full.  It used to end in a
traceback, a truncated record and exit 0.  Now: one line naming the output,
the file and the reason (and the program's own status when not 0), exit 125
(dcptrace's own failure, as README says), the program still runs to its end,
and no truncated file is left where the record was asked for (a regular file
is written beside it and renamed when complete; an earlier file stays as it
was).
"""

from __future__ import annotations

import os
import shlex
import shutil
import signal
import subprocess
from pathlib import Path

import pytest

from tests.conftest import dcptrace_argv, run, traced_env, wait_for

pytestmark = [pytest.mark.security, pytest.mark.usefixtures("has_ptrace")]

FLAGS = {"record": ["--record"], "trace": ["--trace", "-o"], "summary": ["--summary", "-o"]}


def lines_of(err: str) -> list[str]:
    assert "Traceback" not in err, err
    return err.strip().splitlines()


@pytest.mark.parametrize("what", sorted(FLAGS))
@pytest.mark.parametrize("status", [0, 3])
def test_output_to_dev_full_is_one_line_and_exit_125(
    tmp_path: Path, what: str, status: int
) -> None:
    if not os.path.exists("/dev/full"):
        pytest.skip("/dev/full is absent")
    marker = tmp_path / "ran"
    program = ["sh", "-c", f"touch {shlex.quote(str(marker))}; exit {status}"]
    res = run([*dcptrace_argv(*FLAGS[what], "/dev/full"), "--", *program], env=traced_env())
    assert res.returncode == 125
    assert marker.exists()  # the program ran; what was asked of dcptrace is lost
    expected = f"dcptrace: cannot write the {what} to /dev/full: No space left on device"
    if status:
        expected += f" (the program exited with status {status})"
    assert lines_of(res.stderr.decode()) == [expected]


def test_a_full_disk_leaves_no_truncated_output_and_the_program_finishes(tmp_path: Path) -> None:
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root")
    if shutil.which("unshare") is None:
        pytest.skip("unshare (util-linux) is not installed")
    mnt = tmp_path / "full"
    mnt.mkdir()
    dcptrace = shlex.join(
        dcptrace_argv("--record", f"{mnt}/run.json", "--trace", "-o", f"{mnt}/trace.txt")
    )
    # In a private mount namespace (gone with the shell): a 64 KiB tmpfs
    # holding an earlier record, filled up, then a run whose trace alone is
    # far bigger than the disk: it fails mid-run, not only at the end.
    program = "for d in /usr/bin /usr/lib /etc; do ls -la $d; done >/dev/null; echo finished"
    script = f"""
        set -u
        mount -t tmpfs -o size=64k dcp-test-full {mnt} || exit 90
        echo earlier > {mnt}/run.json
        head -c 1048576 /dev/zero > {mnt}/fill 2>/dev/null
        {dcptrace} -- sh -c {shlex.quote(program)}
        echo "status=$?"
        ls -A {mnt}
        echo "record=$(cat {mnt}/run.json)"
    """
    res = run(
        ["unshare", "--mount", "--propagation", "private", "sh", "-c", script], env=traced_env()
    )
    if res.returncode == 90:
        pytest.skip(f"cannot mount a tmpfs here: {res.stderr.decode().strip()}")
    out = res.stdout.decode().splitlines()
    assert "finished" in out  # a full disk did not stop the program
    assert "status=125" in out
    listing = out[out.index("status=125") + 1 : -1]
    assert sorted(listing) == ["fill", "run.json"]  # no trace.txt, no temporary file
    assert out[-1] == "record=earlier"  # the earlier record is untouched
    assert lines_of(res.stderr.decode()) == [
        f"dcptrace: cannot write the trace to {mnt}/trace.txt: No space left on device",
        f"dcptrace: cannot write the record to {mnt}/run.json: No space left on device",
    ]
    assert not os.path.ismount(mnt)  # the tmpfs lived only in the namespace


def test_a_written_record_replaces_the_file_whole(tmp_path: Path) -> None:
    record = tmp_path / "run.json"
    record.write_text("earlier\n")
    record.chmod(0o640)
    res = run([*dcptrace_argv("--record", str(record)), "--", "true"], env=traced_env())
    assert res.returncode == 0, res.stderr
    assert record.read_text().startswith("{") and record.read_text().endswith("}\n")
    assert oct(record.stat().st_mode & 0o777) == oct(0o640)  # its mode is kept
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run.json"]


def _running_under(ancestor: int, comm: str) -> bool:
    """Whether a process named `comm` runs below `ancestor` (walking /proc's ppids)."""
    parents: dict[int, int] = {}
    names: dict[int, str] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat_line = (entry / "stat").read_text()
        except OSError:
            continue
        pid = int(entry.name)
        names[pid] = stat_line[stat_line.index("(") + 1 : stat_line.rindex(")")]
        parents[pid] = int(stat_line[stat_line.rindex(")") + 2 :].split()[1])
    for pid, name in names.items():
        p = pid
        while name == comm and p > 1:
            p = parents.get(p, 0)
            if p == ancestor:
                return True
    return False


def test_killing_dcptrace_leaves_no_partial_record(tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    argv = [*dcptrace_argv("--record", str(out / "run.json")), "--", "sleep", "60"]
    front = subprocess.Popen(argv, env=traced_env(), stderr=subprocess.DEVNULL)
    try:
        # Killed while the program runs (the record is being written beside).
        # Not in the first milliseconds, while the front alone exists: a front
        # SIGKILLed before it forks its tracer has nobody left to remove the file.
        assert wait_for(lambda: _running_under(front.pid, "sleep"))
        assert any(out.iterdir())
        front.send_signal(signal.SIGKILL)
        front.wait(timeout=30)
        # The tracer sees its lifeline close, removes the temporary file and
        # exits (PTRACE_O_EXITKILL takes the program with it).
        assert wait_for(lambda: not any(out.iterdir())), list(out.iterdir())
    finally:
        if front.poll() is None:
            front.kill()
            front.wait(timeout=30)
