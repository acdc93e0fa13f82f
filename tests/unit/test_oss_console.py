"""The `dcp-oss` command tree's shared parts (oss.console) and its help (issue 16)."""

from __future__ import annotations

import asyncio
import io
import os
from pathlib import Path

import click
import pytest
from click.testing import CliRunner

from oss import console as con
from oss.cli import main


def _commands(group: click.Group, path: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    out = []
    for name, cmd in group.commands.items():
        out.append((*path, name))
        if isinstance(cmd, click.Group):
            out += _commands(cmd, (*path, name))
    return out


@pytest.mark.parametrize("path", _commands(main), ids=" ".join)
def test_every_command_has_help_with_an_example(path: tuple[str, ...]) -> None:
    r = CliRunner().invoke(main, [*path, "--help"], prog_name="dcp-oss")
    assert r.exit_code == 0, r.output
    assert "Example" in r.output and "dcp-oss " in r.output.split("Example", 1)[1], r.output


def test_the_root_help_has_an_example() -> None:
    r = CliRunner().invoke(main, ["--help"], prog_name="dcp-oss")
    assert "Example:" in r.output and "dcp-oss programs list" in r.output


def test_commands_against_an_oss_take_the_connection_options() -> None:
    for path in (("programs", "list"), ("instances", "show"), ("bill",), ("logs",),
                 ("users", "token"), ("limits", "set"), ("migrate",), ("drain",)):  # fmt: skip
        r = CliRunner().invoke(main, [*path, "--help"], prog_name="dcp-oss")
        assert "--oss, --url URL" in r.output and "--token-file FILE" in r.output, path


def test_parse_since() -> None:
    now = 1_800_000_000.0
    assert con.parse_since(None) is None
    assert con.parse_since("90s", now) == now - 90
    assert con.parse_since("30m", now) == now - 1800
    assert con.parse_since("2h", now) == now - 7200
    assert con.parse_since("1.5d", now) == now - 1.5 * 86400
    assert con.parse_since("1700000000", now) == 1_700_000_000.0
    assert con.parse_since("2026-01-02T03:04:05+00:00", now) == 1767323045.0
    with pytest.raises(click.BadParameter, match="duration"):
        con.parse_since("yesterday", now)


def test_token_file_must_be_private(tmp_path: Path) -> None:
    f = tmp_path / "t"
    f.write_text("dcp_abc\n")
    f.chmod(0o600)
    assert con.read_token_file(str(f)) == "dcp_abc"
    for mode in (0o640, 0o604):
        f.chmod(mode)
        with pytest.raises(SystemExit) as exc:
            con.read_token_file(str(f))
        assert exc.value.code == con.EXIT_USAGE
    f.chmod(0o600)
    f.write_text("two tokens\n")
    with pytest.raises(SystemExit):
        con.read_token_file(str(f))
    link = tmp_path / "link"
    os.symlink(f, link)
    with pytest.raises(SystemExit):  # O_NOFOLLOW: not a file someone swapped in
        con.read_token_file(str(link))


def test_table_and_money() -> None:
    runner = CliRunner()

    @click.command()
    def show() -> None:
        con.table(["A", "LONGER", "LAST"], [["x", None, "runs on and on"], ["yy", 1.5, ""]])

    assert runner.invoke(show).output.splitlines() == [
        "A   LONGER  LAST",
        "x   -       runs on and on",
        "yy  1.50",
    ]
    assert con.money(1_234_567) == "1.234567" and con.money(None) == "-"
    assert con.age(100.0, 3700.0) == "1h" and con.age(None) == "-"


class _Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_shows_elapsed_time_on_a_terminal_only(monkeypatch: pytest.MonkeyPatch) -> None:
    async def work() -> str:
        await asyncio.sleep(0.5)
        return "done"

    tty = _Tty()
    monkeypatch.setattr("sys.stderr", tty)
    got, took = asyncio.run(con.with_progress("moving p1 to vm2", work()))
    assert got == "done" and took >= 0.5
    drawn = tty.getvalue()
    assert "dcp-oss: moving p1 to vm2 ... 0." in drawn and " s" in drawn
    assert drawn.endswith("\r\x1b[K")  # erased: the summary line follows alone
    plain = io.StringIO()
    monkeypatch.setattr("sys.stderr", plain)
    assert asyncio.run(con.with_progress("x", work()))[0] == "done"
    assert plain.getvalue() == ""
