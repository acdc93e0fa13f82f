"""The files a periodic checkpoint carries (vmagent.checkpoint.carried): those a real
process holds open for writing under the storage root, as they are when read, and
their writing back; a checkpoint naming a path outside program storage is refused.
The storage root is a temporary directory here (`/run/dcp/fs/` on an instance)."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from vmagent.checkpoint import carried

# Opens argv[1] for writing, argv[2] for reading, argv[3] for writing; writes argv[4].
HOLD = r"""
import os, sys
w = open(sys.argv[1], "w"); r = open(sys.argv[2]); o = open(sys.argv[3], "w")
w.write(sys.argv[4]); w.flush()
print(1, flush=True)
sys.stdin.read()
"""


@pytest.fixture
def root(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    storage = tmp_path / "fs"
    (storage / "prog" / "v0").mkdir(parents=True)
    monkeypatch.setattr(carried, "ROOT", str(storage) + "/")
    return storage / "prog" / "v0"


@pytest.fixture
def holder(root: Path, tmp_path: Path) -> Iterator[subprocess.Popen[bytes]]:
    (root / "read").write_text("r")
    outside = tmp_path / "outside"
    p = subprocess.Popen(
        [sys.executable, "-c", HOLD, str(root / "held"), str(root / "read"), str(outside), "abc"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
    )
    try:
        assert p.stdout is not None and p.stdout.readline() == b"1\n"
        yield p
    finally:
        p.kill()
        p.wait()


def test_only_files_open_for_writing_in_storage_are_carried_and_put_back(
    root: Path, holder: subprocess.Popen[bytes], tmp_path: Path
) -> None:
    images = tmp_path / "images"
    images.mkdir()
    assert [path for _pid, _fd, path in carried.written_files((holder.pid,))] == [
        str(root / "held")
    ]
    assert carried.carry((holder.pid,), str(images)) == 1
    assert (images / carried.IMAGE).exists()
    (root / "held").write_text("changed since")  # what the program did after
    (root / "read").write_text("not carried")
    assert carried.put_back(str(images)) == 1
    assert (root / "held").read_text() == "abc"
    assert (root / "read").read_text() == "not carried"
    (root / "held").unlink()  # never published on the target: made again
    assert carried.put_back(str(images)) == 1
    assert (root / "held").read_text() == "abc"


def test_a_file_over_the_limit_is_named_in_one_line_and_not_carried(
    root: Path,
    holder: subprocess.Popen[bytes],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    monkeypatch.setattr(carried, "MAX_FILE", 2)
    images = tmp_path / "images"
    images.mkdir()
    with caplog.at_level(logging.WARNING, logger=carried.__name__):
        assert carried.carry((holder.pid,), str(images)) == 0
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 1 and str(root / "held") in lines[0] and "over" in lines[0], lines
    assert carried.put_back(str(images)) == 0


@pytest.mark.parametrize(
    "name", ["/etc/dcp-carried-test", "{root}/../../../escape", "{root}/link/x"]
)
def test_a_path_outside_program_storage_is_refused(root: Path, tmp_path: Path, name: str) -> None:
    (root / "link").symlink_to(tmp_path)
    path = name.format(root=root).encode()
    images = tmp_path / "images"
    images.mkdir()
    record = carried.RECORD.pack(len(path), 1, 0o600, os.getuid(), os.getgid()) + path + b"x"
    (images / carried.IMAGE).write_bytes(record)
    with pytest.raises(carried.CarriedFileRefused):
        carried.put_back(str(images))
    assert not Path("/etc/dcp-carried-test").exists() and not (tmp_path / "x").exists()
    assert not (tmp_path / "escape").exists()


def test_a_truncated_image_is_refused(root: Path, tmp_path: Path) -> None:
    path = str(root / "held").encode()
    (tmp_path / carried.IMAGE).write_bytes(carried.RECORD.pack(len(path), 10, 0o600, 0, 0) + path)
    with pytest.raises(carried.CarriedFileRefused):
        carried.put_back(str(tmp_path))
