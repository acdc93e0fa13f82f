"""`dcp-image` turns bad input into one clear line and exit status 1."""

from pathlib import Path

from click.testing import CliRunner

from images.cli import main


def test_missing_kernel(tmp_path: Path) -> None:
    res = CliRunner().invoke(
        main, ["build", "--kernel", str(tmp_path / "nope"), "--cache", str(tmp_path / "c")]
    )
    assert res.exit_code == 1
    assert f"Error: kernel {tmp_path / 'nope'} is not a file" in res.output
    assert "Traceback" not in res.output


def test_out_is_a_file(tmp_path: Path) -> None:
    f = tmp_path / "f"
    f.write_text("")
    res = CliRunner().invoke(main, ["build", "--out", str(f), "--cache", str(tmp_path / "c")])
    assert res.exit_code == 1
    assert "exists and is not a directory" in res.output


def test_manifest_of_a_dir_without_one(tmp_path: Path) -> None:
    res = CliRunner().invoke(main, ["manifest", str(tmp_path)])
    assert res.exit_code == 1 and "has no manifest.json" in res.output


def test_manifest_prints_it(tmp_path: Path) -> None:
    (tmp_path / "manifest.json").write_text('{"format": 1}')
    res = CliRunner().invoke(main, ["manifest", str(tmp_path)])
    assert res.exit_code == 0 and '"format": 1' in res.output
