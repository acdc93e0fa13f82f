"""Bad input: one clear line on stderr and the conventional exit code, never a traceback."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.conftest import dcptrace_argv, run, traced_env


def dcptrace(*args: str) -> tuple[int, str]:
    res = run([*dcptrace_argv(*args)], env=traced_env())
    return res.returncode, res.stderr.decode()


def one_line(err: str) -> str:
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1, lines
    assert lines[0].startswith("dcptrace: ")
    return lines[0]


def test_missing_program() -> None:
    code, err = dcptrace("--", "no-such-program-xyz")
    assert code == 127
    assert "no-such-program-xyz: command not found" in one_line(err)


def test_missing_path() -> None:
    code, err = dcptrace("--", "/nonexistent/prog")
    assert code == 127
    assert "No such file or directory" in one_line(err)


def test_not_executable(tmp_path: Path) -> None:
    f = tmp_path / "data.txt"
    f.write_text("not a program\n")
    code, err = dcptrace("--", str(f))
    assert code == 126
    assert "Permission denied" in one_line(err)


def test_directory(tmp_path: Path) -> None:
    code, err = dcptrace("--", str(tmp_path))
    assert code == 126
    assert "Is a directory" in one_line(err)


@pytest.mark.parametrize(
    "args, needle",
    [
        (["--no-such-option", "--", "true"], "no-such-option"),
        (["--map", "/data", "--", "true"], "SRC=DST"),
        (["--map", "data=/srv", "--", "true"], "absolute"),
        (["--placement", "random", "--", "true"], "placement"),
        ([], "no program"),
    ],
)
def test_usage_errors(args: list[str], needle: str) -> None:
    code, err = dcptrace(*args)
    assert code == 2
    assert needle in one_line(err)


@pytest.mark.parametrize(
    "content, needle",
    [
        ("[map\n", "not valid TOML"),
        ("colour = 'red'\n", "colour"),
        ("[map]\n'data' = '/srv'\n", "absolute"),
    ],
)
def test_bad_config(tmp_path: Path, content: str, needle: str) -> None:
    cfg = tmp_path / "dcp.toml"
    cfg.write_text(content)
    code, err = dcptrace("--config", str(cfg), "--", "true")
    assert code == 2
    assert needle in one_line(err)


def test_missing_config(tmp_path: Path) -> None:
    code, err = dcptrace("--config", str(tmp_path / "nope.toml"), "--", "true")
    assert code == 2
    assert "cannot read config" in one_line(err)


def test_script_without_shebang_runs_with_sh(tmp_path: Path) -> None:
    script = tmp_path / "plain"
    script.write_text("echo plain-script\n")
    script.chmod(0o755)
    res = run([*dcptrace_argv(), "--", str(script)], env=traced_env())
    assert res.stdout == b"plain-script\n"
    assert res.returncode == 0


def test_under_another_tracer_one_clear_line() -> None:
    # The outer dcptrace traces the inner one's children: a second tracer cannot attach.
    inner = " ".join(dcptrace_argv("--", "echo", "never"))
    res = run([*dcptrace_argv(), "--", "sh", "-c", inner], env=traced_env())
    assert res.returncode == 125
    assert b"never" not in res.stdout
    line = one_line(res.stderr.decode())
    assert "itself traced" in line


@pytest.mark.parametrize("flag", [["--trace", "-o"], ["--record"]])
def test_unwritable_output_fails_before_the_program_runs(tmp_path: Path, flag: list[str]) -> None:
    marker = tmp_path / "ran"
    code, err = dcptrace(*flag, str(tmp_path / "missing-dir" / "out"), "--", "touch", str(marker))
    assert code == 2
    assert "cannot write" in one_line(err)
    assert not marker.exists()


def test_output_without_trace_or_summary_is_a_usage_error(tmp_path: Path) -> None:
    marker = tmp_path / "ran"
    code, err = dcptrace("-o", str(tmp_path / "out"), "--", "touch", str(marker))
    assert code == 2
    assert "-o/--output needs --trace or --summary" in one_line(err)
    assert not marker.exists()


def test_output_and_record_to_one_file_is_a_usage_error(tmp_path: Path) -> None:
    out = str(tmp_path / "out")
    code, err = dcptrace("--trace", "-o", out, "--record", out, "--", "true")
    assert code == 2
    assert "name the same file" in one_line(err)
