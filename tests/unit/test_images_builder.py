"""Bad input to the image builder fails at once with a clear error."""

from pathlib import Path

import pytest

from images.builder import BuildConfig, Builder, source_checkout
from images.errors import ImageError, KernelNotFound, OutputDirError


def _builder(tmp_path: Path, **kw: object) -> Builder:
    values: dict[str, object] = dict(source_dir=source_checkout(), cache_dir=tmp_path / "cache")
    values.update(kw)
    return Builder(BuildConfig(**values))  # type: ignore[arg-type]


def test_missing_kernel(tmp_path: Path) -> None:
    with pytest.raises(KernelNotFound, match="no-such-kernel"):
        _builder(tmp_path, kernel=tmp_path / "no-such-kernel").check()


def test_out_is_a_file(tmp_path: Path) -> None:
    f = tmp_path / "file"
    f.write_text("x")
    with pytest.raises(OutputDirError, match="not a directory"):
        _builder(tmp_path, out_dir=f).check()


def test_out_parent_missing(tmp_path: Path) -> None:
    with pytest.raises(OutputDirError, match="does not exist"):
        _builder(tmp_path, out_dir=tmp_path / "a" / "b" / "c").check()


def test_source_is_not_a_checkout(tmp_path: Path) -> None:
    with pytest.raises(ImageError, match="not a DCP checkout"):
        _builder(tmp_path, source_dir=tmp_path).check()


def test_errors_print_their_message() -> None:
    assert str(KernelNotFound("kernel /x is not a file")) == "kernel /x is not a file"
