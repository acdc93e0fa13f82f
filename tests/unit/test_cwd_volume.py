"""Which working directory joins the namespace by default (issue 14: tracer.compose.with_cwd)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tracer.compose import with_cwd

OSS = "http://127.0.0.1:1"  # under --oss: no root or FUSE needed here


def test_an_ordinary_directory_joins_the_declared_paths(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    assert with_cwd(("/data",), 0, OSS, {}) == (("/data", str(tmp_path)), None)
    # Already declared, or under a declared path: nothing to add.
    assert with_cwd((str(tmp_path),), 0, OSS, {}) == ((str(tmp_path),), None)
    assert with_cwd((str(tmp_path.parent),), 0, OSS, {}) == ((str(tmp_path.parent),), None)
    # Shown by --map under another name: left to the map.
    assert with_cwd((), 0, OSS, {"/v": str(tmp_path)}) == ((), None)


@pytest.mark.parametrize("where", ["/", "/proc", "home", "home-parent", "data-parent"])
def test_a_directory_of_the_instance_or_of_private_files_is_not_shared(
    where: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    home = tmp_path / "home" / "user"
    home.mkdir(parents=True)
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setenv("DCP_DATA", str(tmp_path / "state" / "dcp"))
    (tmp_path / "state").mkdir()
    cwd = {"/": "/", "/proc": "/proc", "home": str(home), "home-parent": str(home.parent),
           "data-parent": str(tmp_path / "state")}[where]  # fmt: skip
    monkeypatch.chdir(cwd)
    volumes, note = with_cwd((), 0, OSS, {}, asked=True)
    assert volumes == ()
    assert note is not None and note.startswith(f"the working directory {cwd} is not shared")
    # By default the same is said, but for `/`: a run from there means it.
    assert with_cwd((), 0, OSS, {})[1] == (None if cwd == "/" else note)
    assert "--volume DIR" in note
    # Local instances share this machine's disk: nothing to say there.
    assert with_cwd((), 3, None, {})[1] is None
