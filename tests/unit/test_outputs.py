"""tracer.outputs: a requested output is whole at its path, or not there at all."""

from __future__ import annotations

import io
import os
from pathlib import Path

import pytest

from tracer.errors import OutputError, UsageError
from tracer.outputs import open_output, stderr_output


def entries(d: Path) -> list[str]:
    return sorted(p.name for p in d.iterdir())


def test_a_finished_output_appears_whole_at_its_path(tmp_path: Path) -> None:
    target = tmp_path / "run.json"
    out = open_output(str(target), "record", "--record")
    out.write("{}\n")
    assert not target.exists()  # written beside it until complete
    out.finish()
    assert target.read_text() == "{}\n"
    assert entries(tmp_path) == ["run.json"]


def test_a_new_file_gets_the_mode_open_would_give(tmp_path: Path) -> None:
    mask = os.umask(0o027)
    try:
        out = open_output(str(tmp_path / "t.txt"), "trace", "--output")
    finally:
        os.umask(mask)
    out.finish()
    assert (tmp_path / "t.txt").stat().st_mode & 0o777 == 0o640


def test_a_discarded_output_leaves_the_earlier_file_as_it_was(tmp_path: Path) -> None:
    target = tmp_path / "run.json"
    target.write_text("earlier\n")
    out = open_output(str(target), "record", "--record")
    out.write("half a rec")
    out.discard()
    assert target.read_text() == "earlier\n"
    assert entries(tmp_path) == ["run.json"]
    out.finish()  # nothing left to put in place, and no error recorded


def test_a_symlinked_path_is_written_at_its_target(tmp_path: Path) -> None:
    real = tmp_path / "real.json"
    link = tmp_path / "link.json"
    link.symlink_to(real)
    out = open_output(str(link), "record", "--record")
    out.write("x\n")
    out.finish()
    assert link.is_symlink() and real.read_text() == "x\n"


def test_a_device_that_fails_is_reported_once_and_later_writes_are_dropped() -> None:
    if not os.path.exists("/dev/full"):
        pytest.skip("/dev/full is absent")
    out = open_output("/dev/full", "trace", "--output")
    for _ in range(10_000):
        out.write("a line of trace that fills the buffer\n")
    with pytest.raises(OutputError) as info:
        out.finish()
    assert str(info.value) == "cannot write the trace to /dev/full: No space left on device"
    assert (info.value.what, info.value.path) == ("trace", "/dev/full")


def test_stderr_is_flushed_not_closed() -> None:
    stream = io.StringIO()
    out = stderr_output("summary", stream)
    out.write("table\n")
    out.finish()
    assert not stream.closed and stream.getvalue() == "table\n"


def test_a_path_in_a_missing_directory_is_a_usage_error(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="cannot write the --record file"):
        open_output(str(tmp_path / "no-dir" / "r.json"), "record", "--record")
